"""Host-side vsock access without a VMM: `dial` against a fake of a VMM's hybrid-vsock socket
(one that answers and echoes, one that never answers, one that closes), `splice` between
socket pairs (the guest's side never half-closed, the linger after the client's end), and the
kernel's AF_VSOCK chosen for a kernel target."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest

from roost.errors import VMMFailedError
from roost.vmm import vsock_client
from roost.vmm.base import HybridVsock, KernelVsock
from roost.vmm.vsock_client import dial, splice

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
GuestService = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HOST_PORT = 1073741824  # what Firecracker answers OK with: the host side's ephemeral port


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


class FakeHybridVsock:
    """A fake of a VMM's hybrid-vsock socket at `path`. It reads `CONNECT <port>\\n`; refuses
    (closes) the first `refusals` connections; then, as `guest` says, answers `OK <hostport>\\n`
    (with `greeting` in the same write) and hands the connection to the guest's service, never
    answers (as a paused guest), or closes (as when nobody listens on the port)."""

    def __init__(
        self,
        path: Path,
        guest: GuestService | Literal["silent", "closes"] = echo,
        *,
        greeting: bytes = b"",
        refusals: int = 0,
    ) -> None:
        self.path = path
        self.guest = guest
        self.greeting = greeting
        self.refusals = refusals
        self.connects: list[str] = []  # the CONNECT lines received
        self.open = 0  # connections not yet closed by either side
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> FakeHybridVsock:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for handler in list(self.handlers):
            handler.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def __aenter__(self) -> FakeHybridVsock:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers.add(handler)
        self.open += 1
        try:
            line = await reader.readline()
            self.connects.append(line.decode())
            if len(self.connects) <= self.refusals or self.guest == "closes":
                return
            if self.guest == "silent":
                await reader.read()  # until the host gives up
                return
            writer.write(f"OK {HOST_PORT}\n".encode() + self.greeting)
            await writer.drain()
            await self.guest(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()
            self.handlers.discard(handler)


@pytest.fixture
def uds(tmp_short: Path) -> Path:
    return tmp_short / "vsock.sock"


def run(scenario: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(30):
            return await scenario

    return asyncio.run(bounded())


# ---- dial -------------------------------------------------------------------------------


def test_dial_asks_for_the_port_and_returns_a_connection_to_the_guest(uds: Path) -> None:
    async def scenario() -> tuple[list[str], bytes]:
        async with FakeHybridVsock(uds) as vmm:
            reader, writer = await dial(HybridVsock(uds), 1024)
            writer.write(b"hello\n")
            line = await reader.readline()
            writer.close()
            return vmm.connects, line

    connects, line = run(scenario())
    assert connects == ["CONNECT 1024\n"]
    assert line == b"hello\n"


def test_bytes_the_guest_sent_right_after_ok_stay_in_the_reader(uds: Path) -> None:
    async def scenario() -> bytes:
        async with FakeHybridVsock(uds, greeting=b"welcome\n"):
            reader, writer = await dial(HybridVsock(uds), 1024)
            line = await reader.readline()
            writer.close()
            return line

    assert run(scenario()) == b"welcome\n"


def test_a_guest_that_never_answers_fails_after_the_timeout_naming_the_port(uds: Path) -> None:
    async def scenario() -> tuple[VMMFailedError, float, int]:
        async with FakeHybridVsock(uds, "silent") as vmm:
            began = time.monotonic()
            with pytest.raises(VMMFailedError) as failed:
                await dial(
                    HybridVsock(uds), 1024, timeout=1.0, attempt=0.3, what="port 1024 of VM 'v1'"
                )
            took = time.monotonic() - began
            return failed.value, took, len(vmm.connects)

    error, took, tries = run(scenario())
    assert 1.0 <= took < 1.5
    assert tries >= 3  # each wait for OK was bounded, then tried again
    assert (error.code, error.http_status, error.exit_code) == ("vmm_failed", 502, 6)
    assert error.message.startswith("cannot connect to port 1024 of VM 'v1' within 1s")
    assert "the last: the VMM gave no answer" in error.message


def test_a_vmm_that_closes_the_connection_is_tried_again_until_the_timeout(uds: Path) -> None:
    async def scenario() -> tuple[VMMFailedError, int]:
        async with FakeHybridVsock(uds, "closes") as vmm:
            with pytest.raises(VMMFailedError) as failed:
                await dial(HybridVsock(uds), 7, timeout=0.5)
            return failed.value, len(vmm.connects)

    error, tries = run(scenario())
    assert tries >= 3
    assert "closed the connection" in error.message
    assert f"vsock port 7 through {uds}" in error.message  # named without a `what`


def test_a_guest_that_starts_listening_during_the_dial_is_connected_to(uds: Path) -> None:
    async def scenario() -> bytes:
        async with FakeHybridVsock(uds, greeting=b"up\n", refusals=3) as vmm:
            reader, writer = await dial(HybridVsock(uds), 1024, timeout=5)
            line = await reader.readline()
            writer.close()
            assert len(vmm.connects) == 4
            return line

    assert run(scenario()) == b"up\n"


def test_a_vmm_socket_that_is_not_there_fails_saying_so(uds: Path) -> None:
    async def scenario() -> VMMFailedError:
        with pytest.raises(VMMFailedError) as failed:
            await dial(HybridVsock(uds), 1024, timeout=0.2)
        return failed.value

    assert "No such file or directory" in run(scenario()).message


class FakeVsockSocket(socket.socket):
    """One end of a socket pair standing in for an AF_VSOCK socket: it records the address it
    is connected to instead of connecting."""

    connected_to: Any = None

    def connect(self, address: Any) -> None:
        self.connected_to = address


def test_a_kernel_target_is_dialled_with_af_vsock_at_its_cid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created: list[tuple[int, int, FakeVsockSocket]] = []
    guest_end, host_end = socket.socketpair()

    def fake_socket(family: int, kind: int) -> socket.socket:
        fake = FakeVsockSocket(host_end.family, host_end.type, fileno=host_end.detach())
        created.append((family, kind, fake))
        return fake

    # the socket module as vsock_client alone sees it
    monkeypatch.setattr(
        vsock_client,
        "socket",
        SimpleNamespace(
            socket=fake_socket, AF_VSOCK=socket.AF_VSOCK, SOCK_STREAM=socket.SOCK_STREAM
        ),
    )

    async def scenario() -> bytes:
        reader, writer = await dial(KernelVsock(cid=42), 5000)
        guest_end.sendall(b"from the guest")
        data = await reader.readexactly(14)
        writer.close()
        return data

    try:
        data = run(scenario())
    finally:
        guest_end.close()
    [(family, kind, fake)] = created
    assert (family, kind) == (socket.AF_VSOCK, socket.SOCK_STREAM)
    assert fake.connected_to == (42, 5000)
    assert data == b"from the guest"


# ---- splice -----------------------------------------------------------------------------


def tcp_socket_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection (a TCP end, unlike a Unix one, can be reset)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        far = socket.create_connection(listener.getsockname())
        near, _ = listener.accept()
    return near, far


@contextlib.asynccontextmanager
async def spliced(
    linger: float = 1.0,
    client_pair: Callable[[], tuple[socket.socket, socket.socket]] = socket.socketpair,
) -> AsyncIterator[tuple[Streams, Streams, asyncio.Task[None]]]:
    """A splice between two socket pairs (the client's made by `client_pair`): yields the
    client's far end, the guest's far end and the splice's task; everything is closed
    afterwards."""
    ends: list[asyncio.StreamWriter] = []

    async def streams(near: socket.socket, far: socket.socket) -> tuple[Streams, Streams]:
        near_streams = await asyncio.open_connection(sock=near)
        far_streams = await asyncio.open_connection(sock=far)
        ends.extend([near_streams[1], far_streams[1]])
        return near_streams, far_streams

    client_side, client = await streams(*client_pair())
    guest_side, guest = await streams(*socket.socketpair())
    task = asyncio.create_task(splice(client_side, guest_side, linger=linger))
    try:
        yield client, guest, task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for writer in ends:
            writer.close()


def test_splice_carries_a_mebibyte_both_ways_intact() -> None:
    payload = os.urandom(1 << 20)

    async def scenario() -> tuple[bytes, bytes]:
        async with spliced() as ((client_reader, client_writer), guest, _):
            guest_echo = asyncio.create_task(echo(*guest))
            client_writer.write(payload)
            await client_writer.drain()
            echoed = await client_reader.readexactly(len(payload))
            guest_echo.cancel()
            return hashlib.sha256(echoed).digest(), hashlib.sha256(payload).digest()

    echoed, sent = run(scenario())
    assert echoed == sent


def test_after_the_clients_end_the_guest_sees_no_end_and_its_late_reply_arrives() -> None:
    async def scenario() -> tuple[bytes, bool, bytes]:
        async with spliced(linger=1.0) as (client, (guest_reader, guest_writer), task):
            client[1].write(b"ping")
            client[1].write_eof()
            request = await guest_reader.readexactly(4)
            # a half-close would reach the guest as an end of input: none comes
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await guest_reader.read(1)
            saw_end = guest_reader.at_eof()
            guest_writer.write(b"pong")
            await guest_writer.drain()
            reply = await client[0].read()  # to the end: the splice closes after the linger
            await task
            return request, saw_end, reply

    request, saw_end, reply = run(scenario())
    assert request == b"ping"
    assert not saw_end
    assert reply == b"pong"


def test_a_silent_guest_is_given_up_linger_seconds_after_the_clients_end() -> None:
    async def scenario() -> tuple[float, bytes]:
        async with spliced(linger=0.3) as (client, (guest_reader, _), task):
            client[1].write_eof()
            ended = time.monotonic()
            await task
            took = time.monotonic() - ended
            return took, await guest_reader.read()  # closed: the guest sees the end now

    took, rest = run(scenario())
    assert 0.3 <= took < 1.0
    assert rest == b""


def test_each_arrival_from_the_guest_restarts_the_linger() -> None:
    async def scenario() -> tuple[bytes, float]:
        async with spliced(linger=0.4) as (client, (_, guest_writer), task):
            client[1].write_eof()
            began = time.monotonic()
            for _ in range(6):  # 1.2 s in all, never 0.4 s apart
                await asyncio.sleep(0.2)
                guest_writer.write(b".")
                await guest_writer.drain()
            received = await client[0].read()
            await task
            return received, time.monotonic() - began

    received, took = run(scenario())
    assert received == b"......"
    assert took >= 1.2 + 0.4


def test_the_guests_end_reaches_the_client_as_an_end_of_file_after_its_bytes() -> None:
    async def scenario() -> bytes:
        async with spliced() as (client, (_, guest_writer), task):
            guest_writer.write(b"bye")
            guest_writer.close()
            received = await client[0].read()
            await task  # ends without the client's end of input
            return received

    assert run(scenario()) == b"bye"


def test_a_client_that_resets_ends_the_splice_and_closes_the_guests_connection() -> None:
    async def scenario() -> bytes:
        async with spliced(linger=30, client_pair=tcp_socket_pair) as (client, guest, task):
            far = client[1].get_extra_info("socket")
            far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client[1].transport.abort()  # a reset, not an end of input: no linger
            await task
            return await guest[0].read()

    assert run(scenario()) == b""


def test_a_cancelled_splice_closes_both_sides() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        async with spliced(linger=30) as (client, guest, task):
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return await client[0].read(), await guest[0].read()

    assert run(scenario()) == (b"", b"")
