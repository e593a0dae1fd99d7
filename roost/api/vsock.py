"""`GET /v1/vms/{name}/vsock/{port}`: a byte stream to a guest's vsock port, as a WebSocket.

The daemon connects to the guest's port before it accepts the upgrade, so a client learns
whether the guest answered the way it learns anything else: a refusal is the usual error object
with its status (404 `not_found`, 409 `conflict` when no VMM runs, 422 `invalid`, 502
`vmm_failed` when the guest did not answer within `timeout`), sent as the upgrade's HTTP
response.

Framing, once the WebSocket is open:

- binary messages carry the bytes, both ways;
- an empty binary message from the client says its input ended; the WebSocket stays open, and
  what the guest still sends keeps coming until the guest closes or nothing has come for
  `linger` seconds (the guest's side is never half-closed: Firecracker would shut the whole
  connection, and its reply with it);
- the daemon closes the WebSocket with 1000 when the guest closed its connection (the reason
  says so) or the linger ran out; a client that closes the WebSocket closes the guest's
  connection at once;
- a text message is refused (close 1003): nothing in this protocol is text.

A relay is a long-lived stream on the event loop, not an operation: it holds no operation slot
and no thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from roost.api.hangups import ClientLeft, unless_client_leaves
from roost.api.replies import error_response
from roost.engine.core import Engine
from roost.errors import ErrorDetail, InvalidError, RoostError
from roost.spec.common import check_name
from roost.vmm.vsock_client import dial, splice

log = logging.getLogger("roost.api")
PATH = "/v1/vms/{name}/vsock/{port}"
MAX_PORT = 2**32 - 2  # 2**32 - 1 is VMADDR_PORT_ANY
DEFAULT_TIMEOUT = 10.0
DEFAULT_LINGER = 1.0
MAX_SECONDS = 300.0  # for `timeout` and `linger`
QUERY_PARAMETERS = ("linger", "timeout")
UNSUPPORTED_DATA = 1003  # the WebSocket close code for a message of a kind nobody takes


def register_vsock_routes(
    app: FastAPI, engine: Engine, read: Callable[..., Awaitable[Any]]
) -> None:
    """Add the vsock WebSocket to `app`; `read` runs the engine's lookup on the API's read
    threads (it reads the database)."""

    async def vsock(websocket: WebSocket) -> None:
        try:
            name, port, timeout, linger = _request(websocket)
            target = await read(engine.vsock_target, name)
            dialling = dial(target, port, timeout=timeout, what=f"vsock port {port} of VM {name!r}")
            await websocket.receive()  # websocket.connect: before an answer, only a hang-up follows
            # a dial may take the whole timeout: nobody would be there for its connection
            guest = await unless_client_leaves(websocket.receive(), dialling)
        except ClientLeft:
            return
        except RoostError as error:
            await websocket.send_denial_response(error_response(error))
            return
        except Exception as error:
            log.exception("internal error in the vsock WebSocket of %s", websocket.url.path)
            bug = RoostError(f"internal error (a bug in roost): {error!r}")
            await websocket.send_denial_response(error_response(bug))
            return
        try:
            await websocket.accept()
        except BaseException:
            guest[1].close()
            raise
        stream = _WebSocketStream(websocket)
        await splice((stream, stream), guest, linger=linger)

    app.router.add_websocket_route(PATH, vsock)


def _request(websocket: WebSocket) -> tuple[str, int, float, float]:
    """The VM's name, the port, the timeout and the linger a request asks for, or
    `InvalidError` saying what is wrong with them."""
    name = check_name(websocket.path_params["name"])
    port = _port(websocket.path_params["port"])
    query = websocket.query_params
    unknown = [key for key in dict.fromkeys(query.keys()) if key not in QUERY_PARAMETERS]
    if unknown:
        problem = f"is not a parameter of this route (it takes {', '.join(QUERY_PARAMETERS)})"
        raise InvalidError.of([ErrorDetail(f"query.{key}", problem) for key in unknown])
    timeout = _seconds(query.get("timeout"), "timeout", DEFAULT_TIMEOUT, may_be_zero=False)
    linger = _seconds(query.get("linger"), "linger", DEFAULT_LINGER, may_be_zero=True)
    return name, port, timeout, linger


def _port(text: str) -> int:
    if text.isascii() and text.isdigit() and len(text) <= len(str(MAX_PORT)):
        port = int(text)
        if 1 <= port <= MAX_PORT:
            return port
    raise InvalidError.at("port", f"must be a whole number from 1 to {MAX_PORT}")


def _seconds(text: str | None, key: str, default: float, *, may_be_zero: bool) -> float:
    if text is None:
        return default
    loc = f"query.{key}"
    try:
        value = float(text)
    except ValueError:
        raise InvalidError.at(loc, "must be a number") from None
    if not math.isfinite(value):
        raise InvalidError.at(loc, "must be a finite number")
    if value < 0 or (value == 0 and not may_be_zero) or value > MAX_SECONDS:
        least = "at least 0" if may_be_zero else "more than 0"
        raise InvalidError.at(loc, f"must be {least} and at most {MAX_SECONDS:g} seconds")
    return value


class _WebSocketStream:
    """The client's side of a relay, as `splice` reads and writes it: each binary message is
    bytes, an empty one the end of the client's input; closing it closes the WebSocket (1000,
    with the reason when the guest closed first)."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.pending: list[bytes] = []
        self.close_code = 1000
        self.close_reason = ""

    async def read(self, n: int = -1) -> bytes:
        """The next message's bytes, however many (uvicorn bounds a message's size)."""
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise ConnectionResetError("the client closed the WebSocket")
        if message.get("text") is not None:
            self.close_code = UNSUPPORTED_DATA
            self.close_reason = "text messages are not part of this protocol: send binary"
            raise ConnectionAbortedError(self.close_reason)
        return bytes(message["bytes"])

    def write(self, data: bytes) -> None:
        self.pending.append(bytes(data))

    async def drain(self) -> None:
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        try:
            await self.websocket.send_bytes(data)
        except WebSocketDisconnect:
            raise ConnectionResetError("the client closed the WebSocket") from None

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.close_reason = "the guest closed the connection"

    def close(self) -> None:
        """The WebSocket closes in `wait_closed` (closing it is sending a message)."""

    async def wait_closed(self) -> None:
        if self.websocket.application_state != WebSocketState.CONNECTED:
            return
        try:
            await self.drain()
            await self.websocket.close(self.close_code, self.close_reason)
        except WebSocketDisconnect:
            log.debug("a vsock client left before its WebSocket was closed")
