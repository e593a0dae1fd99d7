"""The web view's sessions and the checks a browser's request passes, for the daemon's `/ui/`
and `roost ui` alike.

A session is a random 256-bit id kept in memory (a restart logs everyone out), sent back as an
HttpOnly, SameSite=Strict cookie and forgotten after `IDLE_SECONDS` without a request. A cookie
travels with every request the browser makes to the host, whoever's page made it, so a request
it authenticates must also come from the view's own pages (CSRF):

- one that says its `Origin` is accepted only from the server's own origin (the scheme and the
  `Host` the server already checked names it);
- a GET or HEAD without `Origin` (same-origin reads, `EventSource`, page loads: Chromium and
  Firefox send no `Origin` on them) needs `Sec-Fetch-Site: same-origin` (the page's own
  requests) or `none` (typed in the address bar, a bookmark); from a browser that sends no
  `Sec-Fetch-Site`, a `Referer` on the origin;
- anything else (POST, PATCH, DELETE) needs the matching `Origin`, which browsers always send on
  them, and `X-Roost-UI: 1`, which a page on another origin cannot send without a CORS
  preflight nobody answers.

Every answer of the view carries `SECURITY_HEADERS`: the Content-Security-Policy forbids inline
script and every request but to the server itself.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

IDLE_SECONDS = 12 * 3600.0
DAEMON_COOKIE = "roost_session"  # the daemon's /ui/
LOCAL_COOKIE = "roost_ui"  # roost ui's
UI_HEADER = "x-roost-ui"
READS = frozenset({"GET", "HEAD"})
# the page's own requests, and a navigation the user started (address bar, bookmark)
FETCH_SITES = frozenset({"same-origin", "none"})
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
)


@dataclass
class Sessions:
    """The live sessions by id, each with when it was last used (monotonic seconds)."""

    idle_seconds: float = IDLE_SECONDS
    _last_used: dict[str, float] = field(default_factory=dict)

    def create(self) -> str:
        self._forget_idle()
        session = secrets.token_urlsafe(32)
        self._last_used[session] = time.monotonic()
        return session

    def valid(self, session: str | None) -> bool:
        """Whether `session` is live; using it keeps it so for another `idle_seconds`."""
        if not session:
            return False
        now = time.monotonic()
        last = self._last_used.get(session)
        if last is None or now - last > self.idle_seconds:
            self._last_used.pop(session, None)
            return False
        self._last_used[session] = now
        return True

    def end(self, session: str | None) -> None:
        if session:
            self._last_used.pop(session, None)

    def _forget_idle(self) -> None:
        now = time.monotonic()
        for session, last in list(self._last_used.items()):
            if now - last > self.idle_seconds:
                del self._last_used[session]


def set_cookie(name: str, session: str, *, secure: bool) -> str:
    """The `Set-Cookie` value that hands `session` to the browser: never to scripts, never on a
    request another site started, for every path of the server."""
    flags = "; Secure" if secure else ""
    return f"{name}={session}; Path=/; HttpOnly; SameSite=Strict{flags}"


def clear_cookie(name: str, *, secure: bool) -> str:
    flags = "; Secure" if secure else ""
    return f"{name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{flags}"


def cookie(headers: dict[str, str], name: str) -> str | None:
    """The value of cookie `name` in a request's `Cookie` header (lower-case header names)."""
    for pair in headers.get("cookie", "").split(";"):
        key, equals, value = pair.strip().partition("=")
        if equals and key == name:
            return value.strip()
    return None


def own_origin(scheme: str, host: str) -> str:
    """The server's origin as browsers write it in `Origin`: scheme and the `Host` header (which
    the server checked names it), without a default port."""
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    host = host.strip().lower()
    if default and host.endswith(default):
        host = host.removesuffix(default)
    return f"{scheme}://{host}"


def _same_origin_url(url: str, origin: str) -> bool:
    try:
        parsed = urlsplit(url)
    except ValueError:
        return False
    if not parsed.scheme or not parsed.netloc or "@" in parsed.netloc:
        return False
    return own_origin(parsed.scheme, parsed.netloc) == origin


def cross_origin_refusal(
    method: str, headers: dict[str, str], origin: str, *, ui_header: bool = True
) -> str | None:
    """Why a request that a session cookie authenticates does not come from the view's own
    pages at `origin`, or None when it does (see the module's docstring). A form the view
    posts (log-in, log-out) cannot send `X-Roost-UI`: it is not asked of it (`ui_header`)."""
    sent = headers.get("origin")
    if sent is not None and sent.strip().lower() != origin:
        return f"it comes from a page of {sent!r}, not of {origin}"
    if method.upper() in READS:
        site = headers.get("sec-fetch-site")
        if sent is not None or (site or "").lower() in FETCH_SITES:
            return None
        referer = headers.get("referer")  # a browser without fetch metadata: its Referer
        if site is None and referer is not None and _same_origin_url(referer, origin):
            return None
        return "a browser's read says Sec-Fetch-Site: same-origin (or Origin); this one does not"
    if sent is None:
        return "a browser's change says its Origin; this one does not"
    if ui_header and headers.get(UI_HEADER) != "1":
        return "the view's changes send 'X-Roost-UI: 1'; this one does not"
    return None


def with_security_headers(
    headers: Iterable[tuple[bytes, bytes]], *, page: bool
) -> list[tuple[bytes, bytes]]:
    """An answer's headers and `SECURITY_HEADERS` (which replace any of the same name); a
    `page` (or anything holding data) is also never stored by the browser or a proxy."""
    added = [*SECURITY_HEADERS, *([(b"cache-control", b"no-store")] if page else [])]
    names = {name for name, _ in added}
    return [(name, value) for name, value in headers if name.lower() not in names] + added
