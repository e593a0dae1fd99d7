"""The relays behind `vm connect` and `vm forward`: asyncio and the WebSocket to the daemon,
imported by those two commands alone (every other command starts without them)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode

from roost.api.access import client_context, read_token
from roost.api.endpoints import Endpoint
from roost.cli.client import bearer, unreachable
from roost.cli.output import err, print_json
from roost.cli.reach import Globals, vm_path
from roost.errors import ConflictError, InvalidError, RoostError, UnreachableError, error_from_json
from roost.vmm.vsock_client import CHUNK, Source

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

# how much longer than the dial's timeout the CLI waits for the daemon's answer to the upgrade
ANSWER_SLACK = 30.0
END_OF_INPUT = b""  # the empty binary message: the framing's "my input ended"


def relay_stdio(path: str, timeout: float, linger: float) -> None:
    """stdin and stdout to the vsock port at `path` (`vm connect`), until it closes."""
    asyncio.run(_connect(path, timeout, linger))


def listen_and_relay(name: str, host: str, host_port: int, guest_port: int, as_json: bool) -> None:
    """A TCP listener relaying each connection to the VM's vsock port (`vm forward`)."""
    asyncio.run(_forward(name, host, host_port, guest_port, as_json))


async def _connect(path: str, timeout: float, linger: float) -> None:
    async with await _open(path, timeout=timeout, linger=linger) as websocket:
        await _relay(websocket, _Stdin(asyncio.get_running_loop()), _Stdout())


class _Output(Protocol):
    """Where a relay writes what the guest sends (`asyncio.StreamWriter` is one)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class _Stdin:
    """Standard input as a relay reads it, on a thread of its own: a file, a pipe or a
    terminal alike (an event loop cannot watch a regular file). It reads the file descriptor
    itself, so a read still blocked at exit holds no lock the interpreter needs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        self.loop = loop
        threading.Thread(target=self._read, name="roost-stdin", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(sys.stdin.fileno(), CHUNK)
            except (OSError, ValueError):  # closed or no descriptor: the input ends
                chunk = b""
            try:
                asyncio.run_coroutine_threadsafe(self.chunks.put(chunk), self.loop).result()
            except RuntimeError:  # the loop is gone: nobody reads any more
                return
            if not chunk:
                return

    async def read(self, n: int = -1) -> bytes:
        return await self.chunks.get()


class _Stdout:
    def write(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    async def drain(self) -> None:
        """Written at once: a slow reader of stdout slows the relay down, as it should."""


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _forward(name: str, host: str, host_port: int, guest_port: int, as_json: bool) -> None:
    path = vm_path(name, f"vsock/{guest_port}")

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = address(*writer.get_extra_info("peername")[:2])
        try:
            async with await _open(path) as websocket:
                await _relay(websocket, reader, writer)
        except RoostError as error:
            err.print(f"connection from {peer} failed: {error.message}", markup=False)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        server = await asyncio.start_server(relay, host, host_port)
    except OSError as error:
        where = address(host, host_port)
        if error.errno == errno.EADDRINUSE:
            raise ConflictError(f"cannot listen on {where}: the address is in use") from None
        raise InvalidError.at("forward", f"cannot listen on {where}: {error.strerror}") from None
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    listen = address(bound_host, bound_port)
    if as_json:
        print_json({"listen": listen, "guest_port": guest_port})
    err.print(
        f"forwarding {listen} to vsock port {guest_port} of VM {name}; Ctrl-C stops",
        markup=False,
    )
    async with server:
        await server.serve_forever()


# ---- the WebSocket ----------------------------------------------------------------------


async def _open(path: str, **params: float) -> ClientConnection:
    """A WebSocket to `path` on the daemon, open once the daemon reached the guest; its
    refusal, or the daemon being out of reach, as a `RoostError` with its own code."""
    from websockets.asyncio.client import connect, unix_connect
    from websockets.exceptions import InvalidHandshake, InvalidStatus

    endpoint = Endpoint.parse(Globals.api, loc="api")
    target = f"{path}?{urlencode(params)}" if params else path
    token = read_token(Globals.token_file)
    timeout = params.get("timeout", 0.0)
    options: dict[str, Any] = {
        # the daemon answers the upgrade once the guest answered (or its timeout passed)
        "open_timeout": timeout + ANSWER_SLACK if timeout > 0 else ANSWER_SLACK,
        "additional_headers": {"Authorization": bearer(token).decode("latin-1")} if token else None,
        "compression": None,  # bytes of any kind: compressing them would mostly cost CPU
        "max_size": None,  # the daemon's messages are its relay's reads, bounded there
    }
    try:
        if endpoint.path is not None:
            return await unix_connect(str(endpoint.path), f"ws://localhost{target}", **options)
        host = f"[{endpoint.host}]" if ":" in (endpoint.host or "") else endpoint.host
        if endpoint.tls:
            url = f"wss://{host}:{endpoint.port}{target}"
            return await connect(url, proxy=None, ssl=client_context(Globals.ca), **options)
        return await connect(f"ws://{host}:{endpoint.port}{target}", proxy=None, **options)
    except InvalidStatus as refusal:
        raise _refusal(refusal.response.status_code, refusal.response.body) from None
    except TimeoutError:
        raise RoostError(
            f"the roost daemon at {endpoint.url} did not answer in time",
            code="timeout",
        ) from None
    except (OSError, InvalidHandshake) as error:
        raise unreachable(endpoint, error) from None


def _refusal(status: int, body: bytes | bytearray) -> RoostError:
    """The error object a daemon answered an upgrade with, as the error it is."""
    try:
        return error_from_json(status, json.loads(body))
    except ValueError:
        return RoostError(
            f"the daemon answered HTTP {status} without an error object; is it older than "
            "this CLI (vsock access came later)?"
        )


async def _relay(websocket: ClientConnection, source: Source, output: _Output) -> None:
    """Bytes both ways until the daemon closes the WebSocket. The source's end goes out as
    the empty message, and what the guest still sends keeps coming: the daemon decides when
    it is over (the guest closed, or was silent for the linger). A local side that fails
    closes the WebSocket; a daemon that breaks it off is `unreachable`."""
    from websockets.exceptions import ConnectionClosed, ConnectionClosedError

    async def upload() -> None:
        try:
            while chunk := await source.read(CHUNK):
                await websocket.send(chunk)
            await websocket.send(END_OF_INPUT)
        except ConnectionClosed:
            return  # the receiving side tells why
        except OSError:
            await websocket.close()

    uploading = asyncio.create_task(upload())
    try:
        async for message in websocket:
            if isinstance(message, bytes):
                output.write(message)
                await output.drain()
    except ConnectionClosedError as error:
        raise UnreachableError(
            f"the daemon broke off the connection ({error}); see its log"
        ) from None
    except OSError:
        await websocket.close()
    finally:
        uploading.cancel()
        await asyncio.gather(uploading, return_exceptions=True)
