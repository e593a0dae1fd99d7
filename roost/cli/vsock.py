"""Reaching a guest's vsock ports from where the CLI runs: `vm connect` (stdin and stdout),
`vm forward` (a TCP listener), and the forwards the daemon holds (`--persist`, `vm forwards`,
`vm unforward`).

Every connection is a WebSocket to the daemon (`GET /v1/vms/{name}/vsock/{port}`, framed as
roost.api.vsock says), over the Unix socket, TCP or TLS (verified as the client's HTTPS is),
wherever the API is.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Annotated, Any, Protocol
from urllib.parse import urlencode

import typer

from roost.api.access import client_context, read_token
from roost.api.endpoints import Endpoint
from roost.cli.apps import Globals, vm_app
from roost.cli.client import bearer, unreachable
from roost.cli.options import JSONOpt
from roost.cli.output import err, out, print_json, reporting, table
from roost.cli.remote import NameArg, daemon, show, vm_path
from roost.errors import ConflictError, InvalidError, RoostError, UnreachableError, error_from_json
from roost.vmm.vsock_client import CHUNK, Source

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

# how much longer than the dial's timeout the CLI waits for the daemon's answer to the upgrade
ANSWER_SLACK = 30.0
END_OF_INPUT = b""  # the empty binary message: the framing's "my input ended"
MAX_PORT = 65535

PortArg = Annotated[int, typer.Argument(help="The guest's vsock port.", show_default=False)]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", help="Seconds to keep trying to reach the guest's port."),
]
LingerOpt = Annotated[
    float,
    typer.Option(
        "--linger",
        help="After stdin ends, seconds of silence from the guest before closing.",
    ),
]


# ---- vm connect -------------------------------------------------------------------------


@vm_app.command("connect")
def vm_connect(
    name: NameArg, port: PortArg, timeout: TimeoutOpt = 10.0, linger: LingerOpt = 1.0
) -> None:
    """Connect stdin and stdout to a port of the VM's vsock, through the daemon.

    Bytes pass as they are. When stdin ends, the output goes on until the guest closes or has
    been silent for --linger seconds. Ctrl-C ends it (exit 0)."""
    with reporting(as_json=False), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_connect(vm_path(name, f"vsock/{port}"), timeout, linger))


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


# ---- vm forward -------------------------------------------------------------------------


@vm_app.command("forward")
def vm_forward(
    name: NameArg,
    spec: Annotated[
        str,
        typer.Argument(
            metavar="[ADDR:]HOSTPORT:GUESTPORT",
            help="Listen on ADDR (default 127.0.0.1) port HOSTPORT (0: any free one), relay "
            "to the guest's vsock port GUESTPORT.",
            show_default=False,
        ),
    ],
    persist: Annotated[
        bool,
        typer.Option(
            "--persist",
            help="Let the daemon hold the forward (where it runs, loopback only) until "
            "removed; prints its id.",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the forward as JSON (with --persist: the daemon's; without: once "
            "listening, with the port chosen).",
        ),
    ] = False,
) -> None:
    """Relay TCP connections to a port of the VM's vsock.

    Without --persist the listener runs here until Ctrl-C (exit 0), each connection through
    a WebSocket of its own; one that fails is reported on stderr and the listener stays."""
    with reporting(as_json):
        vm_path(name)  # a name that cannot be one is refused before anything listens
        host, host_port, guest_port = _forward_spec(spec)
    listen = _address(host, host_port)
    if persist:
        with daemon(as_json) as client:
            body = {"listen": listen, "guest_port": guest_port}
            forward = client.call("POST", vm_path(name, "forwards"), body=body)
        if as_json:
            print_json(forward)
        else:
            out.print(str(forward["id"]), markup=False)
        return
    with reporting(as_json), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_forward(name, host, host_port, guest_port, as_json))


def _forward_spec(spec: str) -> tuple[str, int, int]:
    """`[ADDR:]HOSTPORT:GUESTPORT` as (address, host port, guest port); an IPv6 address is
    written in brackets."""
    rest, _, guest_text = spec.rpartition(":")
    host, colon, host_text = rest.rpartition(":")
    if not colon:
        host, host_text = "127.0.0.1", rest
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif "[" in host or "]" in host or ":" in host:
        host = ""  # an IPv6 address without its brackets, or half of them
    ports = [text for text in (host_text, guest_text) if text.isascii() and text.isdigit()]
    if not host or len(ports) != 2 or int(host_text) > MAX_PORT or int(guest_text) < 1:
        raise InvalidError.at(
            "forward",
            f"{spec!r} is not [ADDR:]HOSTPORT:GUESTPORT (e.g. 8080:1024 or "
            "127.0.0.1:8080:1024; HOSTPORT 0 to 65535, GUESTPORT from 1)",
        )
    return host, int(host_text), int(guest_text)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _forward(name: str, host: str, host_port: int, guest_port: int, as_json: bool) -> None:
    path = vm_path(name, f"vsock/{guest_port}")

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _address(*writer.get_extra_info("peername")[:2])
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
        where = _address(host, host_port)
        if error.errno == errno.EADDRINUSE:
            raise ConflictError(f"cannot listen on {where}: the address is in use") from None
        raise InvalidError.at("forward", f"cannot listen on {where}: {error.strerror}") from None
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    listen = _address(bound_host, bound_port)
    if as_json:
        print_json({"listen": listen, "guest_port": guest_port})
    err.print(
        f"forwarding {listen} to vsock port {guest_port} of VM {name}; Ctrl-C stops",
        markup=False,
    )
    async with server:
        await server.serve_forever()


# ---- the daemon's forwards --------------------------------------------------------------


@vm_app.command("forwards")
def vm_forwards(name: NameArg, as_json: JSONOpt = False) -> None:
    """List the forwards the daemon holds for the VM."""
    with daemon(as_json) as client:
        forwards = client.call("GET", vm_path(name, "forwards"))

    def human(items: list[dict[str, Any]]) -> None:
        rows = [(f["id"], f["listen"], f["guest_port"]) for f in items]
        table(["ID", "LISTEN", "GUEST PORT"], rows)

    show(forwards, as_json, human)


@vm_app.command("unforward")
def vm_unforward(
    name: NameArg,
    forward_id: Annotated[
        int, typer.Argument(metavar="ID", help="The forward's id.", show_default=False)
    ],
    as_json: JSONOpt = False,
) -> None:
    """Remove a forward the daemon holds for the VM."""
    with daemon(as_json) as client:
        client.call("DELETE", vm_path(name, f"forwards/{forward_id}"))
    if as_json:
        print_json({"removed": forward_id})
    else:
        err.print(f"removed forward {forward_id} of VM {name}", markup=False)


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
