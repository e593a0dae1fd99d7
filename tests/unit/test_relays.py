"""The daemon's vsock relays against real Unix and TCP sockets: guest-initiated connections
relayed to a VM's `vsock_services`, and forwards from loopback TCP to a guest's vsock port,
with `FakeHybridVsock` standing in for a VMM's hybrid vsock socket."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select

from roost.engine import relays as relays_module
from roost.engine.relays import VsockRelays
from roost.errors import ConflictError, HostError, InvalidError, NotFoundError
from roost.spec import VMConfig
from roost.state.models import VsockForward
from roost.vmm.base import HybridVsock, KernelVsock, VsockTarget
from tests.engine_fakes import World

T = TypeVar("T")
LINGER = 0.2


class Background:
    """An event loop in a thread of its own, for the test's servers (services, fake VMMs)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class Server:
    """A server on the background loop; `close` ends it and the connections it accepted."""

    def __init__(self, background: Background, handle: Callable[..., Coroutine[Any, Any, None]]):
        self.background = background
        self.handle = handle
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            await self.handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def unix(self, path: Path) -> Server:
        async def start() -> asyncio.Server:
            return await asyncio.start_unix_server(self._accepted, path=str(path))

        self.server = self.background.run(start())
        return self

    def tcp(self) -> Server:
        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._accepted, "127.0.0.1", 0)

        self.server = self.background.run(start())
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await self.server.wait_closed()

        self.background.run(stop())


async def upper_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A host service: answers each chunk in upper case until its client's input ends."""
    while chunk := await reader.read(65536):
        writer.write(chunk.upper())
        await writer.drain()


class FakeHybridVsock:
    """Stands in for a VMM's hybrid vsock socket: `CONNECT <port>` to a port its guest listens
    on is answered `OK` and echoed chunk by chunk (the guest never sees a half-close); other
    ports are closed at once, as Firecracker does."""

    def __init__(self, background: Background, path: Path, ports: set[int]) -> None:
        self.ports = ports
        self.connects = 0
        self.server = Server(background, self._handle).unix(path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        port = int(line.split()[1])
        if port not in self.ports:
            return
        self.connects += 1
        writer.write(b"OK 1073741824\n")
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()

    def close(self) -> None:
        self.server.close()


def received(sock: socket.socket, limit: int | None = None) -> bytes:
    """What comes until the other side closes (or `limit` bytes); a close that left our own
    bytes unread (a reset) is a close too."""
    data = b""
    try:
        while (limit is None or len(data) < limit) and (chunk := sock.recv(65536)):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def exchange(connect: Callable[[], socket.socket], data: bytes, timeout: float = 10) -> bytes:
    """Send `data`, end the input and read until the other side closes."""
    with connect() as sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # closed already; what came before that is still there to read
            pass
        return received(sock)


def ask(connect: Callable[[], socket.socket], data: bytes, timeout: float = 10) -> bytes:
    """As a guest does through its VMM: send `data` and read as much back (less when the other
    side closes first), without ending the input (a VMM would take that as the guest's close)."""
    with connect() as sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(data)
        except OSError:  # closed already
            return b""
        return received(sock, len(data))


def unix(path: Path | str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def tcp(address: str) -> Callable[[], socket.socket]:
    host, _, port = address.rpartition(":")
    return lambda: socket.create_connection((host.strip("[]"), int(port)), timeout=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def refused(connect: Callable[[], socket.socket]) -> bool:
    try:
        connect().close()
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    return False


class Targets:
    """What the engine's `vsock_target` would say: a VM with a VMM has a target, others are a
    conflict."""

    def __init__(self) -> None:
        self.running: dict[str, VsockTarget] = {}

    def __call__(self, name: str) -> VsockTarget:
        if name not in self.running:
            raise ConflictError(f"VM {name!r} is stopped: its vsock is reachable only while ...")
        return self.running[name]


@pytest.fixture
def background() -> Iterator[Background]:
    instance = Background()
    yield instance
    instance.close()


@pytest.fixture
def world(tmp_short: Path) -> Iterator[World]:
    """VM records (`v1`, `v2`) for forwards to belong to."""
    instance = World(tmp_short)
    for name in ("v1", "v2"):
        instance.engine.create_vm(name, VMConfig(plugin="p"), start=False)
    yield instance
    instance.close()


@pytest.fixture
def targets() -> Targets:
    return Targets()


@pytest.fixture
def relays(world: World, targets: Targets) -> Iterator[VsockRelays]:
    instance = VsockRelays(world.db, targets, dial_timeout=2, linger=LINGER)
    instance.start()
    yield instance
    instance.close()


# ---- vsock_services ---------------------------------------------------------------------


def test_guest_connections_are_relayed_to_unix_and_tcp_services(
    relays: VsockRelays, background: Background, tmp_short: Path
) -> None:
    unix_service = Server(background, upper_echo).unix(tmp_short / "svc.sock")
    tcp_service = Server(background, upper_echo).tcp()
    uds = tmp_short / "vsock.sock"
    relays.vm_started(
        "v1",
        HybridVsock(uds),
        {1024: f"unix://{tmp_short}/svc.sock", 1025: f"tcp://127.0.0.1:{tcp_service.port}"},
    )
    try:
        assert ask(unix(f"{uds}_1024"), b"hello") == b"HELLO"
        assert ask(unix(f"{uds}_1025"), b"over tcp") == b"OVER TCP"
        assert (Path(f"{uds}_1024").stat().st_mode & 0o777) == 0o600
    finally:
        unix_service.close()
        tcp_service.close()


def test_a_service_that_cannot_be_reached_closes_that_connection_not_the_listener(
    relays: VsockRelays, background: Background, tmp_short: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uds = tmp_short / "vsock.sock"
    relays.vm_started("v1", HybridVsock(uds), {7: f"unix://{tmp_short}/later.sock"})
    with caplog.at_level(logging.WARNING, "roost.relays"):
        assert ask(unix(f"{uds}_7"), b"anyone?") == b""
    assert "could not reach its service" in caplog.text
    service = Server(background, upper_echo).unix(tmp_short / "later.sock")
    try:
        assert ask(unix(f"{uds}_7"), b"now") == b"NOW"
    finally:
        service.close()


def test_a_service_that_leads_to_the_daemon_s_api_socket_is_refused_however_it_got_there(
    relays: VsockRelays, background: Background, tmp_short: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api = Server(background, upper_echo).unix(tmp_short / "api.sock")
    relays.api_sockets = frozenset({str(tmp_short / "api.sock")})
    uds = tmp_short / "vsock.sock"
    relays.vm_started("v1", HybridVsock(uds), {1024: f"unix://{tmp_short}/svc.sock"})
    (tmp_short / "svc.sock").symlink_to(tmp_short / "api.sock")  # after the config was judged
    try:
        with caplog.at_level(logging.WARNING, "roost.relays"):
            assert ask(unix(f"{uds}_1024"), b"POST /v1/vms") == b""
        assert "leads to this daemon's API socket" in caplog.text
    finally:
        api.close()


def test_a_guest_holds_at_most_max_guest_connections_to_its_services_at_once(
    relays: VsockRelays,
    background: Background,
    tmp_short: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(relays_module, "MAX_GUEST_CONNECTIONS", 2)
    service = Server(background, upper_echo).unix(tmp_short / "svc.sock")
    uds = tmp_short / "vsock.sock"
    relays.vm_started("v1", HybridVsock(uds), {1024: f"unix://{tmp_short}/svc.sock"})
    guest = unix(f"{uds}_1024")
    try:
        with guest() as first, guest() as second:
            for sock in (first, second):
                sock.settimeout(10)
                sock.sendall(b"x")
                assert sock.recv(10) == b"X"
            with caplog.at_level(logging.WARNING, "roost.relays"):
                assert ask(guest, b"one more") == b""  # closed at once: the daemon's fds stay
                assert ask(guest, b"and another") == b""
            assert caplog.text.count("2 connections to its vsock services are open") == 1
        deadline = time.monotonic() + 10  # once one has ended, there is room again
        while (reply := ask(guest, b"room")) != b"ROOM":
            assert time.monotonic() < deadline, reply
            time.sleep(0.01)
    finally:
        service.close()


def test_a_stopped_vm_s_listeners_connections_and_socket_files_are_gone(
    relays: VsockRelays, background: Background, tmp_short: Path
) -> None:
    service = Server(background, upper_echo).unix(tmp_short / "svc.sock")
    uds = tmp_short / "vsock.sock"
    relays.vm_started("v1", HybridVsock(uds), {1024: f"unix://{tmp_short}/svc.sock"})
    try:
        with unix(f"{uds}_1024")() as open_connection:
            open_connection.settimeout(10)
            open_connection.sendall(b"x")
            assert open_connection.recv(10) == b"X"
            relays.vm_stopped("v1")
            assert open_connection.recv(10) == b""
        assert not Path(f"{uds}_1024").exists()
        assert refused(unix(f"{uds}_1024"))
    finally:
        service.close()


def test_a_vm_started_again_listens_for_its_new_services_only(
    relays: VsockRelays, tmp_short: Path
) -> None:
    uds = tmp_short / "vsock.sock"
    relays.vm_started("v1", HybridVsock(uds), {1: "tcp://127.0.0.1:9", 2: "tcp://127.0.0.1:9"})
    relays.vm_started("v1", HybridVsock(uds), {3: "tcp://127.0.0.1:9"})
    assert sorted(p.name for p in tmp_short.glob("vsock.sock_*")) == ["vsock.sock_3"]


def test_a_service_listener_that_cannot_be_bound_fails_the_start_and_leaves_no_socket(
    relays: VsockRelays, tmp_short: Path
) -> None:
    uds = tmp_short / "vsock.sock"
    Path(f"{uds}_2").mkdir()  # in the way of the second listener
    with pytest.raises(HostError, match="cannot listen for its vsock service on port 2"):
        relays.vm_started("v1", HybridVsock(uds), {1: "tcp://h:1", 2: "tcp://h:1"})
    assert not Path(f"{uds}_1").exists()


def test_kernel_vsock_shares_one_listener_per_port_and_routes_by_the_peer_s_cid(
    relays: VsockRelays,
    background: Background,
    tmp_short: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AF_VSOCK is not available here: its listener is a Unix socket standing in for it, and
    the peer's CID is what the test says."""
    bound: list[int] = []
    peer = {"cid": 0}

    def vsock_listener(port: int) -> socket.socket:
        bound.append(port)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_short / f"vsock-{port}"))
        listener.listen(8)
        return listener

    monkeypatch.setattr(relays_module, "_vsock_listener", vsock_listener)
    monkeypatch.setattr(relays_module, "_peer_cid", lambda writer: peer["cid"])

    async def lower_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk.lower())
            await writer.drain()

    upper = Server(background, upper_echo).unix(tmp_short / "a.sock")
    lower = Server(background, lower_echo).unix(tmp_short / "b.sock")
    try:
        relays.vm_started("v1", KernelVsock(3), {5000: f"unix://{tmp_short}/a.sock"})
        relays.vm_started("v2", KernelVsock(4), {5000: f"unix://{tmp_short}/b.sock"})
        assert bound == [5000]
        guest = unix(tmp_short / "vsock-5000")
        peer["cid"] = 3
        assert ask(guest, b"Hi") == b"HI"
        peer["cid"] = 4
        assert ask(guest, b"Hi") == b"hi"
        peer["cid"] = 9  # no VM's
        assert ask(guest, b"Hi") == b""
        relays.vm_stopped("v1")
        peer["cid"] = 4
        assert ask(guest, b"Still") == b"still"
        relays.vm_stopped("v2")
        assert refused(guest)
    finally:
        upper.close()
        lower.close()


# ---- forwards ---------------------------------------------------------------------------


@pytest.fixture
def guest(background: Background, tmp_short: Path, targets: Targets) -> Iterator[FakeHybridVsock]:
    """VM `v1` runs, and its guest listens (and echoes) on vsock port 1024."""
    fake = FakeHybridVsock(background, tmp_short / "vsock.sock", {1024})
    targets.running["v1"] = HybridVsock(tmp_short / "vsock.sock")
    yield fake
    fake.close()


def test_a_forward_relays_tcp_connections_to_the_guest_s_vsock_port(
    relays: VsockRelays, guest: FakeHybridVsock
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    forward = relays.add_forward("v1", listen, 1024)
    assert (forward.vm, forward.listen, forward.guest_port) == ("v1", listen, 1024)
    assert exchange(tcp(listen), b"ping") == b"ping"
    assert relays.list_forwards("v1") == [forward]
    assert relays.list_forwards("v2") == []


def test_fifty_parallel_connections_through_one_forward_all_arrive_intact(
    world: World, targets: Targets, guest: FakeHybridVsock, background: Background
) -> None:
    # the daemon's own dial timeout: fifty handshakes at once may take the fixture's 2 s on a
    # loaded machine, and a forward that gives up on a dial closes that connection empty
    listen = f"127.0.0.1:{free_port()}"
    host, port = listen.split(":")

    async def one(number: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"connection {number} ".encode() * 1000)
        writer.write_eof()
        received = await reader.read()
        writer.close()
        return received

    async def all_of_them() -> list[bytes]:
        return await asyncio.gather(*(one(number) for number in range(50)))

    relays = VsockRelays(world.db, targets, linger=LINGER)
    relays.start()
    try:
        relays.add_forward("v1", listen, 1024)
        answers = background.run(all_of_them())
    finally:
        relays.close()
    assert answers == [f"connection {number} ".encode() * 1000 for number in range(50)]
    assert guest.connects == 50


def test_an_ipv6_loopback_forward_is_written_with_brackets(
    relays: VsockRelays, guest: FakeHybridVsock
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no ::1 here")
        port = probe.getsockname()[1]
    forward = relays.add_forward("v1", f"[0::1]:{port}", 1024)
    assert forward.listen == f"[::1]:{port}"
    assert exchange(lambda: socket.create_connection(("::1", port)), b"six") == b"six"


def test_a_connection_while_the_vm_has_no_vmm_is_closed_at_once(
    relays: VsockRelays, caplog: pytest.LogCaptureFixture
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    relays.add_forward("v2", listen, 1024)
    began = time.monotonic()
    with caplog.at_level(logging.INFO, "roost.relays"):
        assert exchange(tcp(listen), b"hello?") == b""
    assert time.monotonic() - began < 1
    assert "is stopped" in caplog.text


def test_a_connection_to_a_port_the_guest_does_not_listen_on_is_closed_after_the_dial_timeout(
    relays: VsockRelays, guest: FakeHybridVsock
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    relays.add_forward("v1", listen, 2000)
    began = time.monotonic()
    assert exchange(tcp(listen), b"hello?") == b""
    assert 1.5 < time.monotonic() - began < 5  # the relays' dial timeout is 2 s here


def test_an_address_another_program_holds_is_a_conflict(relays: VsockRelays) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        listen = f"127.0.0.1:{other.getsockname()[1]}"
        with pytest.raises(ConflictError, match="in use by another program"):
            relays.add_forward("v1", listen, 1024)
    assert relays.list_forwards("v1") == []


def test_an_address_that_is_a_forward_already_is_a_conflict_naming_it(
    relays: VsockRelays,
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    first = relays.add_forward("v1", listen, 1024)
    with pytest.raises(ConflictError, match=f"forward {first.id} of VM 'v1'"):
        relays.add_forward("v2", listen, 22)
    assert relays.list_forwards("v2") == []


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        ("0.0.0.0:8080", "not a loopback address"),
        ("10.0.0.1:8080", "not a loopback address"),
        ("[::]:8080", "not a loopback address"),
        ("localhost:8080", "is not ADDR:PORT"),
        ("127.0.0.1", "is not ADDR:PORT"),
        ("::1:8080", "is not ADDR:PORT"),
        ("127.0.0.1:http", "is not ADDR:PORT"),
        ("127.0.0.1:0", "from 1 to 65535"),
        ("127.0.0.1:65536", "from 1 to 65535"),
    ],
)
def test_a_forward_listens_on_a_loopback_address_and_port_only(
    relays: VsockRelays, listen: str, words: str
) -> None:
    with pytest.raises(InvalidError, match=words) as caught:
        relays.add_forward("v1", listen, 1024)
    assert [detail.loc for detail in caught.value.details] == ["listen"]


def test_a_guest_port_out_of_range_is_refused_at_guest_port(relays: VsockRelays) -> None:
    with pytest.raises(InvalidError) as caught:
        relays.add_forward("v1", f"127.0.0.1:{free_port()}", 0)
    assert [detail.loc for detail in caught.value.details] == ["guest_port"]


def test_a_forward_of_an_unknown_vm_is_not_found_and_leaves_its_address_free(
    relays: VsockRelays,
) -> None:
    port = free_port()
    with pytest.raises(NotFoundError):
        relays.add_forward("nope", f"127.0.0.1:{port}", 1024)
    assert refused(tcp(f"127.0.0.1:{port}"))
    with pytest.raises(NotFoundError):
        relays.list_forwards("nope")


def test_a_removed_forward_stops_listening_and_a_second_removal_is_not_found(
    relays: VsockRelays, guest: FakeHybridVsock
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    forward = relays.add_forward("v1", listen, 1024)
    with pytest.raises(NotFoundError):
        relays.remove_forward("v2", forward.id)  # another VM's
    relays.remove_forward("v1", forward.id)
    assert refused(tcp(listen))
    assert relays.list_forwards("v1") == []
    with pytest.raises(NotFoundError, match=f"has no forward {forward.id}"):
        relays.remove_forward("v1", forward.id)


def test_a_removed_vm_takes_its_forwards_rows_and_listeners_along(
    relays: VsockRelays, world: World
) -> None:
    kept, gone = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    relays.add_forward("v2", kept, 1)
    relays.add_forward("v1", gone, 1)
    world.engine.listeners = relays
    world.engine.destroy_vm("v1")
    assert refused(tcp(gone))
    assert not refused(tcp(kept))
    with world.db.read() as session:  # the foreign key cascades: SQLite enforces it
        assert session.scalar(select(func.count()).select_from(VsockForward)) == 1


def test_a_restarted_daemon_listens_on_its_recorded_forwards_again(
    relays: VsockRelays,
    world: World,
    targets: Targets,
    guest: FakeHybridVsock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    restored, blocked = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    relays.add_forward("v1", restored, 1024)
    relays.add_forward("v2", blocked, 1024)
    relays.close()
    assert refused(tcp(restored))
    again = VsockRelays(world.db, targets, dial_timeout=2, linger=LINGER)
    again.start()
    with socket.socket() as squatter, caplog.at_level(logging.ERROR, "roost.relays"):
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        host, port = blocked.split(":")
        squatter.bind((host, int(port)))
        squatter.listen()
        try:
            again.restore()
        finally:
            again_forwards = again.list_forwards("v2")
    try:
        assert exchange(tcp(restored), b"back") == b"back"
        assert f"cannot listen on {blocked} again" in caplog.text
        assert [forward.listen for forward in again_forwards] == [blocked]  # kept
    finally:
        again.close()


def test_closing_the_relays_closes_every_listener_and_removes_every_socket_file(
    world: World, targets: Targets, tmp_short: Path
) -> None:
    relays = VsockRelays(world.db, targets)
    relays.start()
    listen = f"127.0.0.1:{free_port()}"
    relays.add_forward("v1", listen, 1024)
    relays.vm_started("v2", HybridVsock(tmp_short / "vsock.sock"), {5: "tcp://127.0.0.1:9"})
    relays.close()
    assert refused(tcp(listen))
    assert list(tmp_short.glob("vsock.sock_*")) == []
    with pytest.raises(HostError, match="not running"):
        relays.add_forward("v1", listen, 1024)
    relays.vm_stopped("v2")  # an engine that stops VMs while the daemon closes: nothing held
    with pytest.raises(HostError, match="not running"):
        relays.vm_started("v2", HybridVsock(tmp_short / "vsock.sock"), {})


def test_a_listener_replaced_by_a_symlink_after_its_bind_changes_no_file_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A jailed VMM owns the directory its vsock listeners are bound in: swapping a socket for a
    symlink right after the bind must not make root chmod or chown what the symlink names."""
    victim = tmp_path / "victim"
    victim.write_text("a host file\n")
    victim.chmod(0o644)
    path = tmp_path / "jail" / "vsock.sock_1024"
    path.parent.mkdir()

    class Swapped(socket.socket):
        def bind(self, address: Any) -> None:
            super().bind(address)
            path.unlink()
            path.symlink_to(victim)

    monkeypatch.setattr(relays_module.socket, "socket", Swapped)
    with pytest.raises(OSError, match="replaced by a symlink"):
        relays_module._unix_listener(path)
    assert victim.stat().st_mode & 0o777 == 0o644
