"""The web view's pages (roost.ui) as served by the daemon at `/ui/` and by `roost ui` at `/`:
the pages, their static files, the session check every page passes, and the daemon's log-in
and log-out.

On the daemon the view is for its TCP listeners (a browser reaches nothing else): `/ui/login`
takes the API token once and sets the `roost_session` cookie (Secure under TLS), which the
Guard then accepts on `/v1/...` under roost.api.sessions' same-origin rules. It is served on
the Unix socket too, with the same log-in (a daemon without a token has none to give:
`roost ui` is the view there). `/ui/static/...` is open (the project's own code, no data) so
that the log-in page is styled; every page needs the session.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from roost import ui
from roost.api.sessions import (
    DAEMON_COOKIE,
    Sessions,
    clear_cookie,
    cookie,
    cross_origin_refusal,
    own_origin,
    set_cookie,
    with_security_headers,
)
from roost.errors import RoostError

MOUNT = "/ui"
STATIC = "static/"
# the daemon's view routes that take a browser's form (application/x-www-form-urlencoded)
FORM_PATHS = frozenset({f"{MOUNT}/login", f"{MOUNT}/logout"})
# how long a wrong token's answer waits, one after the other: guessing takes that long a try
FAILED_LOGIN_SECONDS = 1.0
# the log-in form's failure message, shown by dropping its `hidden`
LOGIN_FAILED = re.compile(r'(<p id="login-failed"[^>]*?)\s+hidden(\s|>)')


def headers_of(scope: Scope) -> dict[str, str]:
    """A request's headers by lower-case name (the first of a repeated one)."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        found.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return found


def is_view_path(path: str) -> bool:
    return path == MOUNT or path.startswith(MOUNT + "/")


@dataclass
class ViewAuth:
    """Who may see the view: a live session in cookie `cookie_name`, on a request from the
    view's own pages."""

    cookie_name: str
    sessions: Sessions = field(default_factory=Sessions)

    def session(self, headers: dict[str, str]) -> str | None:
        return cookie(headers, self.cookie_name)

    def refusal(self, scope: Scope, headers: dict[str, str]) -> RoostError | None:
        """Why this request may not use the session it carries (401 without a live one, 403
        from another origin), or None."""
        origin = own_origin(scope.get("scheme", "http"), headers.get("host", ""))
        why = cross_origin_refusal(scope.get("method", "GET"), headers, origin)
        if why is not None:
            return RoostError(
                f"the web view's session is not accepted here: {why}", code="forbidden"
            )
        if not self.sessions.valid(self.session(headers)):
            return RoostError(
                "no web view session (or it ended): log in again", code="unauthorized"
            )
        return None

    def form_refusal(self, scope: Scope, headers: dict[str, str]) -> str | None:
        """Why a log-in or log-out form was not posted by the view's own page, or None."""
        origin = own_origin(scope.get("scheme", "http"), headers.get("host", ""))
        return cross_origin_refusal("POST", headers, origin, ui_header=False)


class SecurityHeaders:
    """Adds roost.api.sessions' security headers to every answer of `app`; those under
    `static_prefix` may be cached (revalidated each time), the others and every refusal are
    never stored."""

    def __init__(self, app: ASGIApp, static_prefix: str | None = None) -> None:
        self.app = app
        self.static_prefix = static_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        under = self.static_prefix is not None and scope["path"].startswith(self.static_prefix)

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                static = under and message["status"] < 400  # a refusal is never kept
                headers = with_security_headers(message.get("headers", []), page=not static)
                if static:
                    headers.append((b"cache-control", b"no-cache"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, secured)


def html_page(page: str, *, api_base: str, base_href: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(ui.render(page, api_base=api_base, base_href=base_href), status)


Refused = Callable[[Request, RoostError], Response]


Endpoint = Callable[[Request], Awaitable[Response]]


def page_endpoint(auth: ViewAuth, *, api_base: str, base_href: str, refused: Refused) -> Endpoint:
    """Shows every page of roost.ui (but the log-in) by its path under the mount (path
    parameter `path`, else the index), each behind the session; 404 for the rest."""

    async def show(request: Request) -> Response:
        page = ui.page_for(request.path_params.get("path", ""))
        if page is None or page == "login":
            return PlainTextResponse("no such page", 404)
        error = auth.refusal(request.scope, headers_of(request.scope))
        if error is not None:
            return refused(request, error)
        return html_page(page, api_base=api_base, base_href=base_href)

    return show


def page_routes(
    auth: ViewAuth, *, api_base: str, base_href: str, refused: Refused
) -> list[BaseRoute]:
    show = page_endpoint(auth, api_base=api_base, base_href=base_href, refused=refused)
    return [Route("/{path:path}", show, methods=["GET", "HEAD"])]


def static_files() -> StaticFiles:
    return StaticFiles(directory=ui.STATIC_DIR, check_dir=False)


def daemon_view(token: str | None) -> tuple[ASGIApp, ViewAuth]:
    """The daemon's `/ui/` (to mount at MOUNT) and the sessions its log-in hands out (the
    Guard accepts them on the API). `token` is the daemon's API token, which the log-in
    takes."""
    auth = ViewAuth(DAEMON_COOKIE)
    base_href = MOUNT + "/"
    expected = token.encode() if token else None
    failures = asyncio.Lock()

    def login_page(status: int, failed: bool = False) -> HTMLResponse:
        html = ui.render("login", api_base="", base_href=base_href)
        if failed:
            html = LOGIN_FAILED.sub(r"\1\2", html, count=1)
        return HTMLResponse(html, status)

    def refused(request: Request, error: RoostError) -> Response:
        if error.code == "unauthorized":
            return login_page(401)
        return PlainTextResponse(error.message, error.http_status)

    async def login_form(_: Request) -> Response:
        return login_page(200)

    async def login(request: Request) -> Response:
        headers = headers_of(request.scope)
        why = auth.form_refusal(request.scope, headers)
        if why is not None:
            return PlainTextResponse(f"log-in refused: {why}", 403)
        fields = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (fields.get("token") or [""])[0].strip().encode()
        if expected is None or not hmac.compare_digest(given, expected):
            async with failures:  # a right token is never held up by wrong ones
                await asyncio.sleep(FAILED_LOGIN_SECONDS)
            return login_page(401, failed=True)
        secure = request.url.scheme == "https"
        answer = RedirectResponse(base_href, status_code=303)
        answer.headers["set-cookie"] = set_cookie(
            auth.cookie_name, auth.sessions.create(), secure=secure
        )
        return answer

    async def logout(request: Request) -> Response:
        headers = headers_of(request.scope)
        why = auth.form_refusal(request.scope, headers)
        if why is not None:
            return PlainTextResponse(f"log-out refused: {why}", 403)
        auth.sessions.end(auth.session(headers))
        answer = RedirectResponse(base_href + "login", status_code=303)
        answer.headers["set-cookie"] = clear_cookie(
            auth.cookie_name, secure=request.url.scheme == "https"
        )
        return answer

    routes: list[BaseRoute] = [
        Route("/login", login_form, methods=["GET", "HEAD"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", static_files()),
        *page_routes(auth, api_base="", base_href=base_href, refused=refused),
    ]
    return SecurityHeaders(Starlette(routes=routes), MOUNT + "/static/"), auth
