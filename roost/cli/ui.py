"""`roost ui`: the web view on a loopback port of this machine, for the daemon the CLI reaches
(its Unix socket by default), as Jupyter serves notebooks.

It prints a URL carrying a random one-time token; the first load exchanges it for the
`roost_ui` session cookie and drops it from the address bar, and the token works no more.
Every request but that one needs the session (pages, static files and `/api/`), under
roost.api.sessions' same-origin rules, and a `Host` naming this server (a page on another
site that renames itself 127.0.0.1 through DNS gets 421). `/api/v1/...` is sent on to the
daemon's `/v1/...`, with the CLI's token when it has one, and its answer streamed back (events,
a followed console). Ctrl-C stops it.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import webbrowser
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import typer

from roost.api.endpoints import Endpoint
from roost.api.hangups import ClientLeft
from roost.api.sessions import LOCAL_COOKIE, set_cookie, with_security_headers
from roost.cli.apps import app
from roost.cli.output import reporting
from roost.cli.reach import Globals, daemon
from roost.errors import InvalidError, RoostError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import httpx
    from starlette.responses import Response
    from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("roost.ui")
LOOPBACK = "127.0.0.1"
API_PREFIX = "/api"
CONNECT_SECONDS = 5.0
# the request headers the daemon is sent: what an API call means, nothing of the browser's
# (its cookie is this server's, its Origin and Sec-Fetch-* were checked here)
FORWARDED_HEADERS = frozenset(
    {"accept", "content-type", "content-length", "last-event-id", "user-agent"}
)
# a connection's own headers (RFC 9110 7.6.1), never passed on
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"}
)


@app.command("ui")
def ui_command(
    port: Annotated[
        int,
        typer.Option(
            "--port",
            min=0,
            max=65535,
            metavar="PORT",
            help="The loopback port to serve on (default 0: a free one).",
        ),
    ] = 0,
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the URL in the default web browser.")
    ] = False,
) -> None:
    """Serve the web view on 127.0.0.1 until Ctrl-C: VMs, networks, plugins, hosts and
    events, live. Open the URL it prints (its token works once)."""
    with daemon(False) as client:  # out of reach or refusing the token: say so now
        client.call("GET", "/v1/plugins")
    with reporting(False):
        listener = _bind(port)
        try:
            _serve(listener, open_browser)
        finally:
            listener.close()


def _bind(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((LOOPBACK, port))
    except OSError as error:
        listener.close()
        raise InvalidError.at(
            "port", f"cannot listen on {LOOPBACK}:{port} ({error.strerror}); choose another"
        ) from None
    listener.listen(128)
    return listener


class _Stop(Exception):  # noqa: N818 - a signal, not an error
    """Raised by the SIGINT/SIGTERM handler once uvicorn has stopped (it raises the signal it
    caught again)."""


def _raise_stop(_signum: int, _frame: object) -> None:
    raise _Stop


def _serve(listener: socket.socket, open_browser: bool) -> None:
    import uvicorn

    port = listener.getsockname()[1]
    token = secrets.token_urlsafe(32)
    forwarder = DaemonForwarder(Globals.api, Globals.token_file, Globals.ca)
    view = local_view(port, token, forwarder)

    class Server(uvicorn.Server):
        """Breaks off the forwarded streams as it begins to stop: its graceful shutdown waits
        for every answer to end, and an event stream never does."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            forwarder.stopping.set()
            await super().shutdown(sockets)
            await forwarder.aclose()

    server = Server(
        uvicorn.Config(view, log_config=None, access_log=False, timeout_graceful_shutdown=5)
    )
    url = f"http://{LOOPBACK}:{port}/?token={token}"
    # 0700, for --open's page only (made only then: a roost ui killed leaves nothing)
    private = Path(tempfile.mkdtemp(prefix="roost-ui-")) if open_browser else None
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sys.stdout.write(url + "\n")
        sys.stdout.flush()
        sys.stderr.write(f"roost ui: the daemon at {Globals.api}; Ctrl-C stops it\n")
        if private is not None and not webbrowser.open(_opener(private, url).as_uri()):
            sys.stderr.write("roost ui: found no web browser to open; open the URL yourself\n")
        server.run(sockets=[listener])
    except (_Stop, KeyboardInterrupt):
        pass  # how one stops it: not an error
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _opener(directory: Path, url: str) -> Path:
    """A page only this user can read that sends the browser on to `url`: `--open` hands the
    browser this page's path, never the tokened URL, which any local user could read from the
    browser's command line and use first (as Jupyter does)."""
    page = directory / "open.html"
    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as writer:
        target = html.escape(url, quote=True)
        writer.write(
            '<!doctype html><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="0; url={target}">'
            f'<title>roost ui</title><p><a href="{target}">Open roost</a></p>\n'
        )
    return page


class DaemonForwarder:
    """Sends `/api/...` requests on to the daemon at `api` (as the CLI reaches it: a Unix
    socket, or TCP/HTTPS with the CLI's token and CA) and streams the answers back."""

    def __init__(self, api: str, token_file: Path | None, ca: Path | None) -> None:
        from roost.api.access import read_token

        self.endpoint = Endpoint.parse(api, loc="api")
        self.token = read_token(token_file)
        self.ca = ca
        self.stopping = asyncio.Event()
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            from roost.api.access import client_context

            endpoint = self.endpoint
            if endpoint.path is not None:
                transport = httpx.AsyncHTTPTransport(uds=str(endpoint.path))
            else:
                verify = client_context(self.ca) if endpoint.tls else False
                transport = httpx.AsyncHTTPTransport(verify=verify)
            self._client = httpx.AsyncClient(
                transport=transport,
                base_url=endpoint.base_url,
                # events and a followed console answer for as long as they last
                timeout=httpx.Timeout(None, connect=CONNECT_SECONDS),
                trust_env=False,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`scope` is a request for `/api/v1/...`: the daemon's `/v1/...` answers it."""
        import httpx

        from roost.api.replies import error_response
        from roost.api.ui import SecurityHeaders
        from roost.cli.client import unreachable

        client = self.client()
        raw_path = bytes(scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0]
        query = scope["query_string"]
        url = client.base_url.copy_with(
            raw_path=raw_path[len(API_PREFIX) :] + (b"?" + query if query else b"")
        )
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name.decode("latin-1").lower() in FORWARDED_HEADERS
        ]
        if self.token is not None and self.endpoint.is_tcp:
            headers.append((b"authorization", b"Bearer " + self.token.encode()))
        has_body = any(
            name.lower() == b"content-length" and value.strip() not in (b"", b"0")
            for name, value in scope["headers"]
        )
        request = client.build_request(
            scope["method"], url, headers=headers, content=_body(receive) if has_body else None
        )
        try:
            response = await client.send(request, stream=True)
        except ClientLeft:
            return
        except httpx.TransportError as error:
            refusal = error_response(unreachable(self.endpoint, error))
            await SecurityHeaders(refusal)(scope, receive, send)
            return
        try:
            kept = [
                (name, value)
                for name, value in response.headers.raw
                if name.decode("latin-1").lower() not in HOP_BY_HOP
            ]
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": with_security_headers(kept, page=True),
                }
            )
            await self._stream_back(response, send, receive)
        finally:
            await response.aclose()

    async def _stream_back(self, response: httpx.Response, send: Send, receive: Receive) -> None:
        """The answer's body as it comes, until it ends, the browser leaves or the server
        stops (the answer is then cut short: a browser's EventSource reconnects elsewhere)."""
        import anyio
        import httpx

        async with anyio.create_task_group() as tasks:

            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tasks.cancel_scope.cancel()

            async def until_stopping() -> None:
                await self.stopping.wait()
                tasks.cancel_scope.cancel()

            tasks.start_soon(until_disconnect)
            tasks.start_soon(until_stopping)
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except (httpx.TransportError, OSError) as error:
                log.warning("the daemon's answer was broken off: %s", error)
            tasks.cancel_scope.cancel()


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _entered(fetch_site: str | None) -> Response:
    """The answer that sets the session: a redirect to the VM table for a URL typed or pasted;
    for one another site sent the browser to (`--open`'s private page is a file), a page that
    moves on to it itself, as the redirect would arrive cross-site still and the SameSite=Strict
    cookie would not go with it."""
    from starlette.responses import HTMLResponse, RedirectResponse

    if fetch_site in (None, "none", "same-origin"):
        return RedirectResponse("/", status_code=303)
    return HTMLResponse(
        '<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url=/">'
        '<title>roost ui</title><p><a href="/">Open roost</a></p>\n'
    )


def local_view(port: int, token: str, daemon: ASGIApp) -> ASGIApp:
    """`roost ui`'s whole server on 127.0.0.1:`port`: the one-time `token`'s exchange, the
    pages at `/` and `daemon` at `/api/v1/`, each behind the session."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, RedirectResponse
    from starlette.routing import Mount, Route

    from roost.api.replies import error_response
    from roost.api.sessions import clear_cookie
    from roost.api.ui import SecurityHeaders, ViewAuth, headers_of, page_endpoint, static_files

    auth = ViewAuth(LOCAL_COOKIE)
    hosts = {f"{LOOPBACK}:{port}", f"localhost:{port}"}
    unused = [token]  # the one-time token, until it is exchanged

    def refused(_: Request, error: RoostError) -> Response:
        if error.code == "unauthorized":
            return PlainTextResponse(
                "roost ui: no session: open the URL `roost ui` printed (its token works once; "
                "start `roost ui` again for a new one)",
                401,
            )
        return PlainTextResponse(f"roost ui: {error.message}", error.http_status)

    show = page_endpoint(auth, api_base=API_PREFIX, base_href="/", refused=refused)

    async def index(request: Request) -> Response:
        """The VM table; with `?token=`, the token's exchange for a session first (on a GET: a
        HEAD, as a link preview sends, gets no session and leaves the token unused)."""
        if "token" not in request.query_params or request.method != "GET":
            return await show(request)
        given = request.query_params["token"].encode()
        if unused and hmac.compare_digest(given, unused[0].encode()):
            unused.clear()
            answer = _entered(headers_of(request.scope).get("sec-fetch-site"))
            session = auth.sessions.create()
            answer.headers["set-cookie"] = set_cookie(LOCAL_COOKIE, session, secure=False)
            return answer
        if auth.refusal(request.scope, headers_of(request.scope)) is None:
            return RedirectResponse("/", status_code=303)  # the first URL loaded again
        return PlainTextResponse(
            "roost ui: this URL's token was used already (or is not this server's): start "
            "`roost ui` again for a new one",
            401,
        )

    async def logout(request: Request) -> Response:
        headers = headers_of(request.scope)
        why = auth.form_refusal(request.scope, headers)
        if why is not None:
            return PlainTextResponse(f"roost ui: log-out refused: {why}", 403)
        auth.sessions.end(auth.session(headers))
        answer = PlainTextResponse("roost ui: logged out; start `roost ui` again to log in")
        answer.headers["set-cookie"] = clear_cookie(LOCAL_COOKIE, secure=False)
        return answer

    files = static_files()

    async def guarded_static(scope: Scope, receive: Receive, send: Send) -> None:
        error = auth.refusal(scope, headers_of(scope))
        if error is not None:
            await refused(Request(scope), error)(scope, receive, send)
            return
        await files(scope, receive, send)

    pages = SecurityHeaders(
        Starlette(
            routes=[
                Route("/", index, methods=["GET", "HEAD"]),
                Route("/logout", logout, methods=["POST"]),
                Mount("/static", guarded_static),
                Route("/{path:path}", show, methods=["GET", "HEAD"]),
            ]
        ),
        "/static/",
    )

    async def local(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = headers_of(scope)
        if headers.get("host", "").lower() not in hosts:
            refusal: ASGIApp = PlainTextResponse(
                f"roost ui serves http://{LOOPBACK}:{port}/ only, not {headers.get('host')!r}",
                421,
            )
        elif not scope["path"].startswith(API_PREFIX + "/"):
            await pages(scope, receive, send)
            return
        elif not scope["path"].startswith(API_PREFIX + "/v1/"):
            refusal = PlainTextResponse("roost ui forwards /api/v1/... only", 404)
        else:
            error = auth.refusal(scope, headers)
            if error is None:
                await daemon(scope, receive, send)
                return
            refusal = error_response(error)
        await SecurityHeaders(refusal)(scope, receive, send)

    return local


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop but what the server does."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
