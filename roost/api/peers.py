"""Forwarding between the agents of a cluster: a request one agent received for a VM another
host runs goes to that host's advertised API (`unix:///path`, `tcp://HOST:PORT`, or
`https://HOST:PORT` verified with `serve --ca`), and its answer comes back unchanged.

- HTTP: the request's body and the answer's are streamed both ways (a followed console or a
  plugin install's progress keeps coming as the peer sends it); status, headers (but the
  hop-by-hop ones) and error objects pass through as the peer sent them.
- WebSocket (the vsock route): the peer's refusal passes through as the upgrade's denial;
  once open, binary and text messages are relayed both ways, and each side's close code and
  reason reach the other.
- The peer is called with `X-Roost-Forwarded: <this host's name>`, and over TCP with this
  agent's own bearer token (the client's token was this agent's to check). A TCP client's
  request says `X-Roost-Client: tcp`, so that a peer called on its Unix socket still grants
  it only what a TCP client may (a header that only takes rights away is believed from
  anyone). A request that arrives forwarded is never forwarded again: if this host would send
  it elsewhere, the two hosts disagree about where the VM lives, and it is refused with 421
  `misdirected`.

Which requests go where is `destination` (a pure rule) and a `Router` (the cluster's view of
which host runs which VM, from the database): `GET /v1/vms` and `GET /v1/vms/{name}` are
answered here from the database; every other route under `/v1/vms/{name}` goes to the VM's
host; `POST /v1/vms` is placement's to decide (`Router.place`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from roost.api.endpoints import Endpoint
from roost.api.hangups import ClientLeft, unless_client_leaves
from roost.api.replies import TCP_CLIENT, error_response, on_unix_socket
from roost.errors import HostError, InvalidError, RoostError

if TYPE_CHECKING:
    import ssl

    from websockets.asyncio.client import ClientConnection

log = logging.getLogger("roost.api")

FORWARDED = "x-roost-forwarded"
CLIENT = "x-roost-client"  # `tcp`: the client reached the forwarding agent over TCP
# a connection's own headers (RFC 9110 7.6.1), and those this agent sets for the peer anew
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# the browser's session cookie is this agent's, not the peer's: the peer answers on this
# agent's own authority (its token over TCP), as it does for every forwarded request
REPLACED = frozenset({"host", "authorization", "cookie", FORWARDED, CLIENT})
CONNECT_SECONDS = 5.0  # a peer that does not accept a connection by then is out of reach
# the peer answers a vsock upgrade once the guest answered, which may take the route's whole
# `timeout` (at most 300 s)
UPGRADE_SECONDS = 330.0
ROUTE_THREADS = 16
NO_STATUS = 1005  # close codes a close frame cannot carry: none was given, or none came
ABNORMAL = 1006
NORMAL = 1000
PEER_FAILED = 1011


@dataclass(frozen=True)
class Peer:
    """Another agent: its host's `name` (named in errors), its advertised `api`, and whether
    the cluster sees it `offline` (a stale heartbeat: nothing is sent, 503 `host_offline`)."""

    name: str
    api: str
    offline: bool = False


@dataclass(frozen=True)
class Local:
    """Answered by the agent that received it."""


@dataclass(frozen=True)
class VMHost:
    """For the host of VM `name`."""

    name: str


@dataclass(frozen=True)
class Placement:
    """A create: the host is chosen by placement."""


Destination = Local | VMHost | Placement
VMS = "/v1/vms"


def destination(method: str, path: str) -> Destination:
    """Where a request for `method` and `path` is answered. Reads of a VM's record come from
    the database on any host (they work while its host is offline); everything else about a
    VM (lifecycle, removal, config, console, vsock, forwards, metrics of its VMM) needs the
    host that runs it."""
    if path == VMS:
        return Placement() if method == "POST" else Local()
    if not path.startswith(VMS + "/"):
        return Local()
    name, _, rest = path[len(VMS) + 1 :].partition("/")
    if not name:
        return Local()
    if not rest and method in ("GET", "HEAD"):
        return Local()
    return VMHost(name)


class Router:
    """Where the requests this agent receives go: `host_of(vm)` for the routes of a VM that
    need its host, `place(scope)` for a create; None means this host. A refusal (404 for an
    unknown host, 503 `host_offline`...) is raised as a `RoostError`. Called on a thread: it
    may read the database. The cluster's router overrides `host_of` and `place`;
    `host_name` is this host's (sent on as `X-Roost-Forwarded`)."""

    def __init__(self, host_name: str) -> None:
        self.host_name = host_name

    def route(self, scope: Scope) -> Peer | None:
        method = scope.get("method", "GET")
        target = destination(method, scope["path"])
        if isinstance(target, VMHost):
            if method == "DELETE" and scope["path"] == f"{VMS}/{target.name}":
                return self.remover_of(target.name)
            return self.host_of(target.name)
        if isinstance(target, Placement):
            return self.place(scope)
        return None

    def host_of(self, vm: str) -> Peer | None:
        """The host that runs `vm`, or None when it is this one (or no VM has that name: the
        local answer is then 404)."""
        return None

    def remover_of(self, vm: str) -> Peer | None:
        """The host that removes `vm` (None: this one); its host, as for every other route,
        unless the cluster's router says otherwise."""
        return self.host_of(vm)

    def place(self, scope: Scope) -> Peer | None:
        """The host a `POST /v1/vms` goes to; None creates here (placement decides)."""
        return None


def _header(scope: Scope, wanted: str) -> str | None:
    for name, value in scope["headers"]:
        if name.lower() == wanted.encode():
            return str(value.decode("latin-1"))
    return None


def forwarded_from(scope: Scope) -> str | None:
    """The host that forwarded this request here, from its `X-Roost-Forwarded` header."""
    return _header(scope, FORWARDED)


def request_headers(
    headers: list[tuple[bytes, bytes]], origin: str, token: str | None, *, tcp_client: bool
) -> list[tuple[bytes, bytes]]:
    """The headers a forwarded request carries: the client's, but the hop-by-hop ones (and
    those its `Connection` names), its `Host`, token, cookie, any `X-Roost-Forwarded` and
    `X-Roost-Client`; then `X-Roost-Forwarded: origin`, `X-Roost-Client: tcp` for a
    `tcp_client` and, for a TCP peer, this agent's `token`."""
    kept = _end_to_end(headers, HOP_BY_HOP | REPLACED)
    kept.append((FORWARDED.encode(), origin.encode("latin-1")))
    if tcp_client:
        kept.append((CLIENT.encode(), b"tcp"))
    if token is not None:
        kept.append((b"authorization", b"Bearer " + token.encode("latin-1")))
    return kept


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers of a peer's answer that reach the client: all but the hop-by-hop ones."""
    return _end_to_end(headers, HOP_BY_HOP)


def _end_to_end(
    headers: list[tuple[bytes, bytes]], dropped: frozenset[str]
) -> list[tuple[bytes, bytes]]:
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.decode("latin-1").split(",")
    }
    return [
        (name, value)
        for name, value in headers
        if (text := name.decode("latin-1").lower()) not in dropped and text not in named
    ]


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length" and value.strip() not in (b"", b"0"):
            return True
        if lower == b"transfer-encoding" and b"chunked" in value.lower():
            return True
    return False


class Forwarder:
    """Calls to peers on behalf of this agent (`origin` is its host name): one pooled HTTP
    client per peer API, `token` sent to TCP peers, HTTPS peers verified against `ca` (else
    the system's CAs)."""

    def __init__(self, origin: str, token: str | None, ca: Path | None = None) -> None:
        self.origin = origin
        self.token = token
        self.ca = ca
        self._clients: dict[str, tuple[Endpoint, httpx.AsyncClient]] = {}
        self._tls: ssl.SSLContext | None = None

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            from roost.api.access import client_context

            self._tls = client_context(self.ca)
        return self._tls

    def endpoint(self, peer: Peer) -> Endpoint:
        try:
            return Endpoint.parse(peer.api, loc="api")
        except InvalidError as error:
            raise HostError(
                f"host {peer.name} advertises an API this agent cannot call: {error.message}"
            ) from None

    def _client(self, peer: Peer) -> tuple[Endpoint, httpx.AsyncClient]:
        known = self._clients.get(peer.api)
        if known is not None:
            return known
        endpoint = self.endpoint(peer)
        if endpoint.path is not None:
            transport = httpx.AsyncHTTPTransport(uds=str(endpoint.path))
        else:
            verify: ssl.SSLContext | bool = self._tls_context() if endpoint.tls else False
            transport = httpx.AsyncHTTPTransport(verify=verify)
        client = httpx.AsyncClient(
            transport=transport,
            base_url=endpoint.base_url,
            # a followed console or an operation answers when it is done: only connecting
            # is bounded
            timeout=httpx.Timeout(None, connect=CONNECT_SECONDS),
            trust_env=False,
        )
        self._clients[peer.api] = (endpoint, client)
        return endpoint, client

    def _token_for(self, endpoint: Endpoint) -> str | None:
        return self.token if endpoint.is_tcp else None

    async def http(self, peer: Peer, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the request on to `peer` and its answer back, both streamed."""
        endpoint, client = self._client(peer)
        headers = request_headers(
            scope["headers"],
            self.origin,
            self._token_for(endpoint),
            tcp_client=not on_unix_socket(scope),
        )
        body = _Body(receive) if _has_body(scope["headers"]) else None
        query = scope["query_string"]
        url = client.base_url.copy_with(
            raw_path=_raw_path(scope) + (b"?" + query if query else b"")
        )
        request = client.build_request(
            scope["method"], url, headers=headers, content=body.chunks() if body else None
        )
        try:
            response = await client.send(request, stream=True)
        except ClientLeft:
            return
        except httpx.TransportError as error:
            raise _unreachable(peer, error) from None
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": response_headers(response.headers.raw),
                }
            )
            watch = receive if body is None or body.done else None
            await self._stream_back(peer, response, send, watch)
        finally:
            await response.aclose()

    async def _stream_back(
        self, peer: Peer, response: httpx.Response, send: Send, receive: Receive | None
    ) -> None:
        """The answer's body as it comes; stopped when the client hangs up (`receive`, once
        the request's body is read whole, gives only the disconnect)."""
        async with anyio.create_task_group() as tasks:
            if receive is not None:
                tasks.start_soon(_cancel_on_disconnect, receive, tasks.cancel_scope)
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.TransportError as error:
                # the status went out already: the client sees its answer broken off
                log.warning("host %s broke off its answer to %s: %s", peer.name, peer.api, error)
                raise
            except OSError:
                tasks.cancel_scope.cancel()  # the client is gone
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            tasks.cancel_scope.cancel()

    async def websocket(self, peer: Peer, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the same WebSocket on `peer`, then relay until either side closes."""
        from websockets.exceptions import InvalidHandshake, InvalidStatus

        if (await receive())["type"] != "websocket.connect":
            return
        try:
            # the peer answers an upgrade only once its guest did (maybe the route's whole
            # timeout); before an answer, the client's next message can only be a hang-up
            upstream = await unless_client_leaves(receive(), self._dial(peer, scope))
        except ClientLeft:
            return
        except InvalidStatus as refusal:
            answer = refusal.response
            await Response(
                bytes(answer.body or b""),
                status_code=answer.status_code,
                headers={
                    name: value
                    for name, value in answer.headers.raw_items()
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length"
                },
            )(scope, receive, send)
            return
        except (OSError, InvalidHandshake, TimeoutError) as error:
            await error_response(_unreachable(peer, error))(scope, receive, send)
            return
        try:
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        except BaseException:
            await upstream.close()
            raise
        await _relay(upstream, receive, send)

    async def _dial(self, peer: Peer, scope: Scope) -> ClientConnection:
        from websockets.asyncio.client import connect, unix_connect

        endpoint = self.endpoint(peer)
        token = self._token_for(endpoint)
        headers = [
            (FORWARDED, self.origin),
            *([(CLIENT, "tcp")] if not on_unix_socket(scope) else []),
            *([("Authorization", f"Bearer {token}")] if token else []),
        ]
        query = scope["query_string"].decode("latin-1")
        target = _raw_path(scope).decode("latin-1") + (f"?{query}" if query else "")
        options: dict[str, Any] = {
            "additional_headers": headers,
            "subprotocols": scope.get("subprotocols") or None,
            "open_timeout": UPGRADE_SECONDS,
            "compression": None,
            "max_size": None,  # the client's messages were bounded by this agent's server
        }
        if endpoint.path is not None:
            return await unix_connect(str(endpoint.path), f"ws://roost{target}", **options)
        host = f"[{endpoint.host}]" if ":" in (endpoint.host or "") else endpoint.host
        if endpoint.tls:
            url = f"wss://{host}:{endpoint.port}{target}"
            return await connect(url, proxy=None, ssl=self._tls_context(), **options)
        return await connect(f"ws://{host}:{endpoint.port}{target}", proxy=None, **options)

    async def aclose(self) -> None:
        for _, client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def _raw_path(scope: Scope) -> bytes:
    raw = scope.get("raw_path")
    if raw:
        return bytes(raw).split(b"?", 1)[0]
    from urllib.parse import quote

    return quote(scope["path"]).encode()


def _unreachable(peer: Peer, error: BaseException) -> HostError:
    return HostError(
        f"the VM's host {peer.name} did not answer at {peer.api} ({error or type(error).__name__});"
        " an operation it may have begun still finishes there (GET /v1/vms/{name} tells)"
    )


class _Body:
    """The client's request body, read as the peer's connection takes it."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft
            self.done = not message.get("more_body", False)
            chunk = message.get("body", b"")
            if chunk:
                yield chunk


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _relay(upstream: ClientConnection, receive: Receive, send: Send) -> None:
    """Messages both ways between the client (ASGI) and the peer's WebSocket; whichever side
    closes first, the other is closed with its code and reason."""
    from websockets.exceptions import ConnectionClosed

    client_gone = False

    async def from_client() -> None:
        nonlocal client_gone
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                client_gone = True
                code = message.get("code", NORMAL)
                await upstream.close(
                    NORMAL if code in (NO_STATUS, ABNORMAL) else code, message.get("reason") or ""
                )
                return
            data = message.get("bytes")
            try:
                await upstream.send(data if data is not None else message.get("text", ""))
            except ConnectionClosed:
                return  # the peer's side tells why

    async def from_peer() -> None:
        try:
            async for message in upstream:
                if isinstance(message, bytes):
                    await send({"type": "websocket.send", "bytes": message})
                else:
                    await send({"type": "websocket.send", "text": message})
        except ConnectionClosed:
            pass
        except OSError:  # the client is gone
            return
        if client_gone:
            return
        code = upstream.close_code
        if code is None or code == NO_STATUS:
            code = NORMAL
        reason = upstream.close_reason or ""
        if code == ABNORMAL:
            code, reason = PEER_FAILED, "the VM's host broke the connection off"
        try:
            await send({"type": "websocket.close", "code": code, "reason": reason})
        except OSError:
            return

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(from_client)
        await from_peer()
        tasks.cancel_scope.cancel()
    await upstream.close()


class Forwarding:
    """Pure ASGI (streams and WebSockets pass through): each request `router` sends to a
    peer is forwarded there by `forwarder`; the rest reach `app`. Runs inside `Guard`, so a
    request is checked here (token, Host, body) before it is sent on."""

    def __init__(self, app: ASGIApp, *, router: Router, forwarder: Forwarder) -> None:
        self.app = app
        self.router = router
        self.forwarder = forwarder
        self.threads = anyio.CapacityLimiter(ROUTE_THREADS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket") and _header(scope, CLIENT) == "tcp":
            scope = {**scope, TCP_CLIENT: True}
        if kind not in ("http", "websocket") or isinstance(
            destination(scope.get("method", "GET"), scope["path"]), Local
        ):
            await self.app(scope, receive, send)
            return
        try:
            peer = await anyio.to_thread.run_sync(self.router.route, scope, limiter=self.threads)
            if peer is not None:
                self._check(peer, scope)
        except RoostError as error:
            await error_response(error)(scope, receive, send)
            return
        if peer is None:
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await self.forwarder.websocket(peer, scope, receive, send)
        else:
            try:
                await self.forwarder.http(peer, scope, receive, send)
            except RoostError as error:
                await error_response(error)(scope, receive, send)

    def _check(self, peer: Peer, scope: Scope) -> None:
        origin = forwarded_from(scope)
        if origin is not None:
            raise RoostError(
                f"host {origin} forwarded this request here, but this host sends it to "
                f"{peer.name}: the two disagree about where it belongs, and a request is "
                "forwarded once only; try again (the hosts' records may have just changed)",
                code="misdirected",
            )
        if peer.offline:
            raise RoostError(
                f"the VM's host {peer.name} is offline (no heartbeat lately); reads of the VM "
                "work on any host, this needs its host back",
                code="host_offline",
            )
