"""vsock end to end with real guests under QEMU/TCG and roost's own vhost-user-vsock device:
`vm connect`, `vm forward` (in the CLI and held by the daemon) and guest-initiated services,
and the device process's life beside its VMM."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Daemon,
    process_alive,
    short_tmp,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.root, pytest.mark.e2e]

ECHO_PORT = 1024  # the demo guest echoes on it
HELLO_PORT = 5000  # where the demo guest says hello when told to
NOBODY_PORT = 4000  # nothing in the demo guest listens on it
BOOT_ARGS = "console=ttyS0 reboot=k panic=1"


@pytest.fixture
def daemon(netns: str, demo_plugin: Path) -> Iterator[Daemon]:
    instance = Daemon(netns, "--vmm", "qemu").start()
    try:
        instance.ok("plugin", "install", demo_plugin)
        yield instance
    finally:
        instance.close()


def cli(daemon: Daemon, *args: str) -> list[str]:
    """The roost CLI as its own process (it reads stdin and handles signals itself)."""
    return [sys.executable, "-m", "roost.cli.main", "--api", daemon.api, *args]


def connect(
    daemon: Daemon, name: str, port: int, data: bytes, *extra: str, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        cli(daemon, "vm", "connect", name, str(port), *extra),
        input=data,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def echo_over_tcp(port: int, data: bytes) -> bytes:
    """Send `data` to 127.0.0.1:`port` and read until the peer closes (the guest's echo ends
    when it has echoed everything and our side stops sending)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        received = bytearray()
        while len(received) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return bytes(received)


def vsock_vm(daemon: Daemon, name: str, tmp: Path, **config: Any) -> dict[str, Any]:
    document = {"plugin": "roost-demo", "network": {"mode": "vsock"}, **config}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(document))
    vm = daemon.ok("vm", "create", name, "--plugin", "roost-demo", "--config", str(path))
    wait_ready(daemon, name)
    return dict(vm)


class HelloListener:
    """A Unix socket service on the host: what the guest's hello sends arrives here."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.server.settimeout(60)
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            connection, _ = self.server.accept()
            with connection:
                connection.settimeout(30)
                data = b""
                while chunk := connection.recv(4096):
                    data += chunk
                self.received.append(data)

    def close(self) -> None:
        self.server.close()
        self.thread.join(5)
        self.path.unlink(missing_ok=True)


def test_a_vsock_only_guest_is_reached_through_the_api_the_cli_and_forwards(
    daemon: Daemon, tmp_path: Path
) -> None:
    tmp = short_tmp()
    hello = HelloListener(tmp / "hello.sock")
    try:
        vm = vsock_vm(
            daemon,
            "v1",
            tmp_path,
            boot_args=f"{BOOT_ARGS} roost.vsock_hello={HELLO_PORT}",
            vsock_services={str(HELLO_PORT): f"unix://{hello.path}"},
        )
        assert vm["network"]["mac"] is None  # no NIC at all
        assert (vm["vsock"]["available"], vm["vsock"]["backend"]) == (True, "user")

        said = connect(daemon, "v1", ECHO_PORT, b"hello\n")
        assert (said.returncode, said.stdout) == (0, b"hello\n"), said.stderr

        mebibyte = os.urandom(1 << 20)
        bulk = connect(daemon, "v1", ECHO_PORT, mebibyte)
        assert bulk.returncode == 0, bulk.stderr
        assert hashlib.sha256(bulk.stdout).hexdigest() == hashlib.sha256(mebibyte).hexdigest()

        # the guest dialled the host's CID 2 on HELLO_PORT: the service got its hostname
        wait_for(lambda: hello.received, timeout=30, what="the guest's hello")
        assert hello.received == [b"v1\n"]

        # a TCP listener in the CLI, each connection relayed through its own WebSocket
        port = free_port()
        forward = subprocess.Popen(
            cli(daemon, "vm", "forward", "v1", f"127.0.0.1:{port}:{ECHO_PORT}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(lambda: _listening(port), timeout=30, what="the CLI's forward to listen")
            payloads = [f"connection {i}\n".encode() * 100 for i in range(50)]
            with ThreadPoolExecutor(max_workers=50) as pool:
                echoed = list(pool.map(lambda data: echo_over_tcp(port, data), payloads))
            assert echoed == payloads
        finally:
            forward.send_signal(signal.SIGINT)
            try:
                _, errors = forward.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                forward.kill()  # never left running: ended by its PID and reaped, then failed
                forward.communicate()
                raise
        assert forward.returncode == 0, errors

        # nobody listens on this port in the guest: a clean failure within the timeout
        started = time.monotonic()
        refused = connect(daemon, "v1", NOBODY_PORT, b"", "--timeout", "3")
        assert refused.returncode == 6
        assert b"v1" in refused.stderr
        assert str(NOBODY_PORT).encode() in refused.stderr
        assert time.monotonic() - started < 15
    finally:
        hello.close()
        tmp.rmdir()


def test_a_persisted_forward_survives_a_daemon_restart(daemon: Daemon, tmp_path: Path) -> None:
    vsock_vm(daemon, "v1", tmp_path)
    port = free_port()
    made = daemon.ok("vm", "forward", "v1", f"127.0.0.1:{port}:{ECHO_PORT}", "--persist")
    assert (made["listen"], made["guest_port"]) == (f"127.0.0.1:{port}", ECHO_PORT)
    assert echo_over_tcp(port, b"before\n") == b"before\n"
    device_pid = _device_pid(daemon, "v1")

    assert daemon.stop() == 0
    daemon.start()
    wait_for(
        lambda: daemon.http.get("/healthz").json()["status"] == "ok", what="recovery to finish"
    )
    assert daemon.ok("vm", "show", "v1")["status"] == "running"
    assert _device_pid(daemon, "v1") == device_pid  # adopted with its VM, not restarted
    assert echo_over_tcp(port, b"after\n") == b"after\n"
    said = connect(daemon, "v1", ECHO_PORT, b"still\n")
    assert said.stdout == b"still\n", said.stderr
    assert [f["id"] for f in daemon.ok("vm", "forwards", "v1")] == [made["id"]]

    daemon.ok("vm", "rm", "v1")
    assert not _listening(port)


def test_a_bridged_guest_has_vsock_beside_its_nic(daemon: Daemon) -> None:
    vm = daemon.ok("vm", "create", "b1", "--plugin", "roost-demo")
    assert vm["network"]["mode"] == "bridged"
    wait_ready(daemon, "b1")
    said = connect(daemon, "b1", ECHO_PORT, b"bridged\n")
    assert (said.returncode, said.stdout) == (0, b"bridged\n"), said.stderr


def test_the_vsock_device_lives_and_ends_with_its_vm(daemon: Daemon, tmp_path: Path) -> None:
    vsock_vm(daemon, "v1", tmp_path)
    run_dir = daemon.run_dir / "vms" / "v1"
    device_pid = _device_pid(daemon, "v1")
    cmdline = Path(f"/proc/{device_pid}/cmdline").read_bytes().split(b"\0")
    assert any(b"vsock" in word for word in cmdline)
    assert any(word.startswith(f"{run_dir}/".encode()) for word in cmdline)
    assert not any(b"qemu-system" in word or word == b"serve" for word in cmdline)

    # a normal stop ends it after QEMU, and is no crash; nothing of it is left
    qemu_pid = daemon.ok("vm", "show", "v1")["vmm"]["pid"]
    stopped = daemon.ok("vm", "stop", "v1")
    assert (stopped["status"], stopped["status_reason"]) == ("stopped", None)
    assert not process_alive(device_pid)
    assert not process_alive(qemu_pid)
    assert not list(run_dir.glob("*.sock*"))

    # its death while the VM runs stops QEMU and marks the VM crashed, naming the device
    daemon.ok("vm", "start", "v1")
    wait_ready(daemon, "v1", fresh=True)
    device_pid, qemu_pid = _device_pid(daemon, "v1"), daemon.ok("vm", "show", "v1")["vmm"]["pid"]
    os.kill(device_pid, signal.SIGKILL)
    crashed = wait_for(
        lambda: (vm := daemon.ok("vm", "show", "v1"))["status"] == "crashed" and vm,
        timeout=5,
        what="the VM to be marked crashed",
    )
    assert "vsock device" in crashed["status_reason"]
    assert crashed["exit_code"] is not None
    wait_for(lambda: not process_alive(qemu_pid), timeout=5, what="QEMU to be stopped")
    assert not list(run_dir.glob("*.sock*"))


def _device_pid(daemon: Daemon, name: str) -> int:
    pid = int((daemon.run_dir / "vms" / name / "vsock.pid").read_text())
    assert process_alive(pid)
    return pid


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0
