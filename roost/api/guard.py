"""What every request passes before a route sees it: who may ask (on TCP, the right `Host`
and the bearer token), in what form (JSON bodies only) and how much (a size limit). A WebSocket
passes the same checks of who may ask (it has no body).

Pure ASGI, so streamed answers pass through untouched. When the answer is ready before the
request's body was read whole (a refusal), the rest of the body is read and thrown away, for a
bounded time, before the answer ends and the connection closes: a client still sending would
otherwise get a connection reset instead of the answer.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from roost.api.endpoints import Endpoint
from roost.api.replies import error_response, on_unix_socket
from roost.api.ui import FORM_PATHS, ViewAuth, is_view_path
from roost.errors import RoostError

log = logging.getLogger("roost.api")

# the only routes a TCP client may call without the token: probes and scrapers carry none
OPEN_PATHS = frozenset({"/healthz", "/metrics"})
# where the web view's session cookie stands for the token: the API its pages call, not
# /docs or /redoc (pages of third-party script from a CDN, which would act with the session)
VIEW_API = "/v1/"
# how long the unread rest of a refused request's body is read and thrown away
DISCARD_SECONDS = 10.0
DENIAL_RESPONSE = "websocket.http.response"  # the ASGI extension: an HTTP answer to an upgrade
POLICY_VIOLATION = 1008  # the WebSocket close code


def too_large(limit: int) -> RoostError:
    return RoostError(
        f"the request body is larger than this daemon's limit of {limit} bytes "
        "(roost serve --max-body-bytes)",
        code="too_large",
    )


class Guard:
    """Refuses before any route runs: on a TCP listener, a request whose `Host` does not name
    the listener (421 `misdirected`: a web page's request through DNS rebinding names its own
    host; `names`, the TLS certificate's and --server-name's, stand for every TCP listener) or
    without the bearer token (401 `unauthorized`; `/healthz` and `/metrics` are open); on
    every listener, a body that is not `application/json` (415 `unsupported_media_type`:
    browsers post forms and text/plain anywhere) or larger than `max_body_bytes` (413
    `too_large`, by its Content-Length or counted as it arrives). A refused WebSocket gets the
    same error object and status, as the upgrade's denial response.

    The web view (roost.api.ui, `view`): its pages check their own session, and a request
    without the token but with the view's session cookie is let through on the API under
    `view`'s rules (same origin; 403 `forbidden` from another); WebSockets take the token
    only. Its log-in and log-out take a form."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        endpoints: list[Endpoint],
        token: str | None,
        max_body_bytes: int,
        names: tuple[str, ...] = (),
        view: ViewAuth | None = None,
    ) -> None:
        self.app = app
        self.view = view
        self.tcp = [endpoint for endpoint in endpoints if endpoint.is_tcp]
        self.names = names
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        body = _Body(receive, headers, self.max_body_bytes)
        send = _DiscardingSend(send, body)
        error = self._refusal(scope, headers, body)
        if error is None:
            await self.app(scope, body.receive, send)
        else:
            await error_response(error)(scope, body.receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = None
        if not on_unix_socket(scope):
            error = self._tcp_refusal(scope["path"], _headers(scope), scope.get("server"))
        if error is None:
            await self.app(scope, receive, send)
        elif DENIAL_RESPONSE in scope.get("extensions", {}):
            await error_response(error)(scope, receive, send)
        else:  # a server that cannot send a denial response answers 403 to this
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})

    def _refusal(self, scope: Scope, headers: dict[str, str], body: _Body) -> RoostError | None:
        if not on_unix_socket(scope):
            error = self._tcp_refusal(scope["path"], headers, scope.get("server"), scope)
            if error is not None:
                return error
        if not body.present:
            return None
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        form = media_type == "application/x-www-form-urlencoded" and scope["path"] in FORM_PATHS
        if media_type != "application/json" and not form:
            got = f"it says {media_type!r}" if media_type else "it has none"
            return RoostError(
                f"request bodies are JSON, sent with Content-Type: application/json ({got})",
                code="unsupported_media_type",
            )
        if body.declared is not None and body.declared > self.max_body_bytes:
            return too_large(self.max_body_bytes)
        return None

    def _tcp_refusal(
        self,
        path: str,
        headers: dict[str, str],
        server: tuple[str, int] | None,
        http: Scope | None = None,
    ) -> RoostError | None:
        endpoint = _listener(self.tcp, server) if server is not None else None
        host = headers.get("host")
        if endpoint is None or host is None or not _names(host, endpoint, self.names):
            listener = endpoint.url if endpoint is not None else "a listener it does not know"
            other = " (or localhost)" if endpoint is not None and endpoint.is_loopback else ""
            named = f"is meant for host {host!r}" if host is not None else "names no host"
            return RoostError(
                f"this request {named}, not this daemon's listener {listener}; address the "
                f"daemon by its --listen host{other}, a name in its TLS certificate or a "
                "--server-name",
                code="misdirected",
            )
        if path in OPEN_PATHS or (
            self.view is not None and http is not None and is_view_path(path)
        ):
            return None  # the view's pages check their own session; it serves no WebSocket
        if (
            self.view is not None
            and http is not None
            and path.startswith(VIEW_API)
            and "authorization" not in headers
            and self.view.session(headers) is not None
        ):
            return self.view.refusal(http, headers)
        if self.token is None:
            return RoostError(
                "this daemon has no token, so its TCP listener takes no requests; start it "
                "with $ROOST_TOKEN set or with --token-file",
                code="unauthorized",
            )
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode("latin-1"), self.token
        ):
            return RoostError(
                "a TCP client must send 'Authorization: Bearer <token>' with the daemon's token "
                "(the CLI sends the one in roost --token-file, else $ROOST_TOKEN)",
                code="unauthorized",
            )
        return None


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the first of a repeated one)."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        found.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return found


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _same_host(a: str, b: str) -> bool:
    """Host names compared without case, addresses by value (`::1` is `0::1`); `b` may be a
    certificate's wildcard name (`*.example.com` stands for one label)."""
    address = _address(a)
    if address is not None:
        return address == _address(b)
    if b.startswith("*."):
        label, dot, rest = a.partition(".")
        return bool(label) and bool(dot) and rest.lower() == b[2:].lower()
    return a.lower() == b.lower()


def _listener(tcp: list[Endpoint], server: tuple[str, int]) -> Endpoint | None:
    """The TCP endpoint a connection came in on, from the address it reached (a `localhost`
    endpoint is bound to a loopback address)."""
    host, port = server
    on_port = [endpoint for endpoint in tcp if endpoint.port == port]
    reached = _address(host)
    for endpoint in on_port:
        assert endpoint.host is not None
        if _same_host(endpoint.host, host) or (
            endpoint.host.lower() == "localhost" and reached is not None and reached.is_loopback
        ):
            return endpoint
    return on_port[0] if len(on_port) == 1 else None


def _split_host(value: str) -> tuple[str, int | None] | None:
    """A `Host` header's host and port (None when it has none), or None when it is not one.
    An IPv6 address comes in brackets."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or not isinstance(_address(host), ipaddress.IPv6Address):
            return None
        if not rest:
            return host, None
        colon, port_text = rest[:1], rest[1:]
    else:
        host, colon, port_text = value.partition(":")
        if not colon:
            return host, None
    if colon != ":" or not (port_text.isascii() and port_text.isdigit()):
        return None
    return host, int(port_text)


def _names(host_header: str, endpoint: Endpoint, names: tuple[str, ...]) -> bool:
    """Whether a `Host` header names `endpoint`: its --listen host, `localhost` for a loopback
    one, or one of `names`, with the endpoint's port or none."""
    parsed = _split_host(host_header.strip())
    if parsed is None:
        return False
    host, port = parsed
    if port is not None and port != endpoint.port:
        return False
    assert endpoint.host is not None
    own = [endpoint.host, *(["localhost"] if endpoint.is_loopback else [])]
    return any(_same_host(host, name) for name in (*own, *names))


class _Body:
    """The request body as a route reads it: counted against the limit as it arrives, and
    what is left of it thrown away once the answer is ready."""

    def __init__(self, receive: Receive, headers: dict[str, str], limit: int) -> None:
        self.raw = receive
        self.limit = limit
        self.received = 0
        self.declared: int | None = None  # the Content-Length, when it is a number
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        if length is None:
            self.present = chunked
        else:
            try:
                self.declared = int(length)
            except ValueError:
                self.present = True
            else:
                self.present = chunked or self.declared > 0
        self.finished = not self.present
        self.asked = False  # whether anyone read from it (which sends a 100 Continue)
        self.expects_continue = headers.get("expect", "").lower() == "100-continue"

    async def receive(self) -> Message:
        self.asked = True
        message = await self.raw()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.finished = not message.get("more_body", False)
            if self.received > self.limit:
                raise too_large(self.limit)
        elif message["type"] == "http.disconnect":
            self.finished = True
        return message

    @property
    def unread(self) -> bool:
        """Whether the client may still be sending a body nobody will read. A client that
        waits for a 100 Continue, which nobody asked to send, sends none."""
        return not self.finished and (self.asked or not self.expects_continue)

    async def discard(self) -> None:
        try:
            async with asyncio.timeout(DISCARD_SECONDS):
                while not self.finished:
                    message = await self.raw()
                    self.finished = message["type"] != "http.request" or not message.get(
                        "more_body", False
                    )
        except TimeoutError:
            log.debug("stopped reading a refused request's body after %ss", DISCARD_SECONDS)


class _DiscardingSend:
    """`send` for an answer that may be ready before the request's body was read whole: it
    then says `Connection: close` (what is left of the body cannot be told from a next
    request) and, before the answer's end, reads and throws away what the client still sends
    (the answer's bytes are all out by then)."""

    def __init__(self, send: Send, body: _Body) -> None:
        self.send = send
        self.body = body
        self.closing = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and not self.body.finished:
            self.closing = True
            headers = [*message.get("headers", []), (b"connection", b"close")]
            message = {**message, "headers": headers}
        elif (
            self.closing
            and message["type"] == "http.response.body"
            and not message.get("more_body", False)
        ):
            await self.send({**message, "more_body": True})
            if self.body.unread:
                await self.body.discard()
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await self.send(message)
