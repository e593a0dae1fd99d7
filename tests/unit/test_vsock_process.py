"""The vsock backend as a process (`python -I -m roost.vmm.vsock`), with the test playing QEMU
on the vhost-user socket: readiness, the messages QEMU 7.2 sends, a whole device start on a
memfd guest, and how the process ends."""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.vmm.vsock.hybrid import listen
from roost.vmm.vsock.packets import HEADER, OP_REQUEST, Header
from tests.vsock_guest import DEBIAN_RX_BUFFER, F_WRITE, Ring

CID = 42
MEMORY = 16 * 1024 * 1024
GUEST_BASE = 0x100000  # where the test's "QEMU" pretends guest RAM starts (guest-physical)
QEMU_BASE = 0x7F12_0000_0000  # and where it pretends to have mapped it

GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, SET_VRING_ENABLE, GET_CONFIG = 15, 16, 18, 24


class Backend:
    """The backend process and its two socket paths in a short temporary directory."""

    def __init__(self, *extra: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vsp-", dir="/tmp"))
        self.vhost_user = self.dir / "vu.sock"
        self.uds = self.dir / "v.sock"
        self.log = self.dir / "backend.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.extra = extra

    def start(self) -> Backend:
        argv = [sys.executable, "-I", "-m", "roost.vmm.vsock", "--vhost-user", str(self.vhost_user)]
        argv += ["--uds", str(self.uds), "--cid", str(CID), *self.extra]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=log)
        return self

    def wait_ready(self) -> None:
        """Until the vhost-user socket is there; the uds socket must be there by then."""
        deadline = time.monotonic() + 10
        while not _is_socket(self.vhost_user):
            assert self.process is not None and self.process.poll() is None, self.text()
            assert time.monotonic() < deadline, "the backend did not listen in time"
            time.sleep(0.002)
        assert _is_socket(self.uds)

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait(10)

    def text(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Qemu:
    """The vhost-user client side, speaking the messages QEMU 7.2 sends."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        message = struct.pack("<III", request, 1, len(payload)) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([message], ancillary)

    def ask(self, request: int, payload: bytes = b"") -> bytes:
        self.send(request, payload)
        header = self._exactly(12)
        answered, flags, size = struct.unpack("<III", header)
        assert (answered, flags) == (request, 0x5)  # version 1, reply
        return self._exactly(size)

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            assert chunk, "the backend closed the socket"
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def _is_socket(path: Path) -> bool:
    try:
        return path.is_socket()
    except OSError:
        return False


@pytest.fixture
def backend() -> Iterator[Backend]:
    instance = Backend()
    yield instance
    instance.close()


def leave_stale_socket(path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()


def test_the_backend_is_ready_once_its_vhost_user_socket_exists_and_answers_like_a_device(
    backend: Backend,
) -> None:
    backend.start().wait_ready()
    qemu = Qemu(backend.vhost_user)
    try:
        features = struct.unpack("<Q", qemu.ask(GET_FEATURES))[0]
        assert features == (1 << 32) | (1 << 30)  # VIRTIO_F_VERSION_1, PROTOCOL_FEATURES
        protocol = struct.unpack("<Q", qemu.ask(GET_PROTOCOL_FEATURES))[0]
        assert protocol == 1 << 9  # CONFIG
        qemu.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << 9))
        qemu.send(SET_OWNER)
        config = qemu.ask(GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8))
        assert struct.unpack("<IIIQ", config) == (0, 8, 0, CID)
    finally:
        qemu.close()
    assert backend.wait() == 0
    assert not backend.vhost_user.exists()
    assert not backend.uds.exists()
    text = backend.text()
    assert "QEMU connected" in text
    assert "QEMU disconnected" in text


def _eventfds(pid: int) -> int:
    """How many eventfds process `pid` holds open."""
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            held += os.readlink(fd) == "anon_inode:[eventfd]"
    return held


def test_the_error_eventfds_qemu_sends_are_closed_not_kept(backend: Backend) -> None:
    backend.start().wait_ready()
    assert backend.process is not None
    qemu = Qemu(backend.vhost_user)
    errors = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        for index in (0, 1):  # as QEMU 7.2 does: an eventfd for each queue's errors
            qemu.send(SET_VRING_ERR, struct.pack("<Q", index), (errors[index],))
        qemu.ask(GET_FEATURES)  # answered: every message before it has been served
        assert _eventfds(backend.process.pid) == 0
    finally:
        qemu.close()
        for fd in errors:
            os.close(fd)
    assert backend.wait() == 0


def test_socket_files_left_by_an_earlier_run_are_replaced(backend: Backend) -> None:
    leave_stale_socket(backend.vhost_user)  # nobody listens on them: connecting is refused
    leave_stale_socket(backend.uds)
    backend.start()
    deadline = time.monotonic() + 10
    while not _listening(backend.vhost_user):
        assert time.monotonic() < deadline, backend.text()
        time.sleep(0.002)
    assert _listening(backend.uds)
    assert backend.wait() == 0  # the probe was its QEMU, gone at once


def test_a_socket_file_appears_only_once_its_socket_listens(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the file is the backend's readiness: QEMU connecting between bind() and listen() is refused
    at_listen: list[int] = []

    class Watched(socket.socket):
        def listen(self, backlog: int = 128) -> None:
            at_listen.append(backend.vhost_user.stat().st_ino)
            super().listen(backlog)

    leave_stale_socket(backend.vhost_user)
    stale = backend.vhost_user.stat().st_ino
    monkeypatch.setattr(socket, "socket", Watched)
    sock = listen(str(backend.vhost_user))
    try:
        listening = backend.vhost_user.stat().st_ino
        assert at_listen != [listening]  # at listen() the path was not yet the new socket's
        assert at_listen == [stale]  # but still the stale one's: it was replaced in one step
        assert _listening(backend.vhost_user)
        assert sorted(path.name for path in backend.dir.iterdir()) == ["vu.sock"]
    finally:
        sock.close()


def test_a_path_that_is_not_a_socket_is_not_replaced(backend: Backend) -> None:
    backend.vhost_user.write_text("someone else's")
    with pytest.raises(OSError, match="not a socket"):
        listen(str(backend.vhost_user))
    assert backend.vhost_user.read_text() == "someone else's"
    assert sorted(path.name for path in backend.dir.iterdir()) == ["vu.sock"]


def _listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def test_sigterm_ends_the_backend_with_status_0_and_no_sockets_left(backend: Backend) -> None:
    backend.start().wait_ready()
    assert backend.process is not None
    backend.process.send_signal(signal.SIGTERM)
    assert backend.wait() == 0
    assert not backend.vhost_user.exists()
    assert not backend.uds.exists()
    assert "stopping on SIGTERM" in backend.text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cid", "2"], "--cid must be from 3"),
        (["--cid", "three"], "invalid int value"),
        (["--max-buffered", "10"], "--max-buffered must be at least"),
    ],
)
def test_bad_arguments_exit_1_with_a_message(
    backend: Backend, extra: list[str], message: str
) -> None:
    backend.extra = tuple(extra)
    backend.start()
    assert backend.wait() == 1
    assert message in backend.text()
    assert not backend.vhost_user.exists()


def test_a_socket_path_too_long_for_unix_sockets_exits_1(backend: Backend) -> None:
    backend.uds = backend.dir / ("x" * 120)
    backend.start()
    assert backend.wait() == 1
    assert "--uds must be a path of 1 to 107 bytes" in backend.text()


def test_a_whole_device_start_on_a_memfd_guest_then_a_reset_that_closes_host_clients(
    backend: Backend,
) -> None:
    backend.start().wait_ready()
    memfd = os.memfd_create("guest")
    os.ftruncate(memfd, MEMORY)
    guest = mmap.mmap(memfd, MEMORY)
    kicks = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    calls = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    qemu = Qemu(backend.vhost_user)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    rx = Ring(guest, 0, 128, 0x10000, gpa_base=GUEST_BASE)
    tx = Ring(guest, 0x8000, 128, 0x10000, gpa_base=GUEST_BASE)  # no buffers: the guest sends none
    try:
        qemu.ask(GET_FEATURES)
        qemu.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << 9))
        qemu.send(SET_OWNER)
        for index in (0, 1):
            qemu.send(SET_VRING_CALL, struct.pack("<Q", index), (calls[index],))
            qemu.send(SET_VRING_ERR, struct.pack("<Q", index | 0x100))
        qemu.send(SET_FEATURES, struct.pack("<Q", (1 << 32) | (1 << 30)))
        region = struct.pack("<QQQQ", GUEST_BASE, MEMORY, QEMU_BASE, 0)
        qemu.send(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region, (memfd,))
        for index, ring in enumerate((rx, tx)):
            qemu.send(SET_VRING_NUM, struct.pack("<II", index, 128))
            qemu.send(SET_VRING_BASE, struct.pack("<II", index, 0))
            addresses = [QEMU_BASE + offset for offset in (ring.desc, ring.used, ring.avail)]
            qemu.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, *addresses, 0))
            qemu.send(SET_VRING_KICK, struct.pack("<Q", index), (kicks[index],))
        for index in (0, 1):
            qemu.send(SET_VRING_ENABLE, struct.pack("<II", index, 1))
        qemu.send(SET_VRING_NUM, struct.pack("<II", 0, 256))  # refused: the queue runs

        for _ in range(4):  # the guest driver posts rx buffers
            rx.publish(rx.chain([(DEBIAN_RX_BUFFER, F_WRITE)]))
        os.eventfd_write(kicks[0], 1)
        client.connect(str(backend.uds))
        client.sendall(b"CONNECT 1024\n")
        deadline = time.monotonic() + 10
        while rx.used_idx() == 0:
            assert time.monotonic() < deadline, "no REQUEST reached the guest"
            time.sleep(0.01)
        (descriptors, length), *_ = rx.take_used()
        start = rx.slot(descriptors[0][0])
        request = Header._make(HEADER.unpack_from(guest[start : start + length]))
        assert (request.op, request.dst_cid, request.dst_port) == (OP_REQUEST, CID, 1024)
        assert os.eventfd_read(calls[0]) >= 1  # the guest was interrupted

        for index in (0, 1):  # the device stops (a pause or a reset: the start will tell)
            qemu.send(SET_VRING_ENABLE, struct.pack("<II", index, 0))
            state = qemu.ask(GET_VRING_BASE, struct.pack("<II", index, 0))
            assert struct.unpack("<II", state) == (index, 1 if index == 0 else 0)
        for index in (0, 1):  # it starts over from 0: a reset, so the host client is closed
            qemu.send(SET_VRING_BASE, struct.pack("<II", index, 0))
            qemu.send(SET_VRING_KICK, struct.pack("<Q", index), (kicks[index],))
        assert client.recv(1) == b""
    finally:
        qemu.close()
        client.close()
        guest.close()
        for fd in (memfd, *kicks, *calls):
            os.close(fd)
    assert backend.wait() == 0
    text = backend.text()
    assert "device started" in text
    assert "device reset; host connections closed" in text
    assert "refused SET_VRING_NUM: queue 0 is running" in text
