"""The daemon's relays with the real Firecracker (whose guest cannot run here): a persisted
forward listens while the daemon runs, again after a restart, and goes with its VM; a VM's
`vsock_services` listener sockets exist exactly while its VMM runs, an adopted VM's too; a
service that leads to the daemon's API socket is refused when a guest connects."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, wait_for, write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def create(daemon: Daemon, tmp_path: Path, name: str, **config: Any) -> dict[str, Any]:
    """A vsock-only VM, paused at once (a Firecracker guest here only spins)."""
    if not daemon.ok("plugin", "list"):
        plugin = write_plugin(tmp_path, "p", network={"mode": "vsock"})
        daemon.ok("plugin", "install", plugin)
    answer = daemon.http.post("/v1/vms", json={"name": name, "plugin": "p", **config})
    assert answer.status_code == 201, answer.text
    daemon.ok("vm", "pause", name)
    return dict(answer.json())


def test_a_persisted_forward_survives_a_daemon_restart_and_goes_with_its_vm(
    daemon: Daemon, tmp_path: Path
) -> None:
    create(daemon, tmp_path, "fw")
    listen = f"127.0.0.1:{free_port()}"
    added = daemon.http.post("/v1/vms/fw/forwards", json={"listen": listen, "guest_port": 1024})
    assert added.status_code == 201, added.text
    forward = added.json()
    assert daemon.http.get("/v1/vms/fw/forwards").json() == [forward]

    # the guest cannot answer: the connection is taken, then closed once the dial gives up
    with socket.create_connection(("127.0.0.1", int(listen.split(":")[1])), timeout=30) as sock:
        sock.sendall(b"hello\n")
        began = time.monotonic()
        try:
            answer = sock.recv(100)
        except ConnectionResetError:  # closed with our bytes unread: closed all the same
            answer = b""
        assert answer == b""
        assert time.monotonic() - began < 20

    assert daemon.stop() == 0
    assert not listening(listen)
    daemon.start()
    assert daemon.http.get("/v1/vms/fw/forwards").json() == [forward]
    wait_for(lambda: listening(listen), timeout=10, what="the forward to listen again")

    assert daemon.http.delete("/v1/vms/fw").status_code == 204
    assert not listening(listen)
    assert daemon.http.get("/v1/vms/fw/forwards").status_code == 404
    assert "Traceback" not in daemon.logs()


def test_vsock_service_sockets_exist_while_the_vmm_runs_and_across_a_restart(
    daemon: Daemon, tmp_path: Path
) -> None:
    create(daemon, tmp_path, "svc", vsock_services={"5000": f"unix://{daemon.dir}/svc.sock"})
    service_socket = daemon.run_dir / "vms" / "svc" / "vsock.sock_5000"
    assert service_socket.is_socket()
    assert service_socket.stat().st_mode & 0o777 == 0o600

    assert daemon.stop() == 0
    assert not service_socket.exists()  # a stopped daemon relays nothing, and says so
    daemon.start()
    wait_for(service_socket.is_socket, timeout=15, what="the adopted VM's service socket")

    daemon.ok("vm", "stop", "svc", "--force")
    assert not service_socket.exists()
    config = daemon.http.get("/v1/vms/svc/config").json()["config"]
    assert config["vsock_services"] == {"5000": f"unix://{daemon.dir}/svc.sock"}
    assert "Traceback" not in daemon.logs()


def test_a_vsock_service_that_leads_to_the_api_socket_is_refused_at_connect_time(
    daemon: Daemon, tmp_path: Path
) -> None:
    service = daemon.dir / "svc.sock"  # nothing there yet: the config's check lets it pass
    create(daemon, tmp_path, "sly", vsock_services={"5000": f"unix://{service}"})
    service.symlink_to(daemon.socket)  # then it leads to the API
    guest_side = daemon.run_dir / "vms" / "sly" / "vsock.sock_5000"  # where the VMM dials
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(guest_side))
        try:  # the refusal may close the connection before the request is even sent
            sock.sendall(b"GET /v1/vms HTTP/1.1\r\nHost: roost\r\n\r\n")
            answer = sock.recv(100)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
    assert answer == b""
    wait_for(
        lambda: "leads to this daemon's API socket" in daemon.logs(),
        timeout=10,
        what="the refusal in the daemon's log",
    )
