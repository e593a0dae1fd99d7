"""`roost vm connect` through the real daemon to the real Firecracker's hybrid vsock. Its guest
cannot run here, so the VM is paused at once: a port nobody answers fails cleanly within the
timeout, naming the VM and the port; a VM whose VMM does not run is a conflict, and one that
does not exist is not found."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.harness import Daemon, write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]


@pytest.fixture
def vsock_vm(daemon: Daemon, tmp_path: Path) -> str:
    """VM `v1`: vsock only, under Firecracker, paused (its guest cannot run here)."""
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p", network={"mode": "vsock"}))
    vm = daemon.ok("vm", "create", "v1", "--plugin", "p")
    assert (vm["vsock"]["available"], vm["vsock"]["backend"]) == (True, "firecracker")
    daemon.ok("vm", "pause", "v1")
    return "v1"


def test_connect_to_a_port_nobody_answers_fails_within_its_timeout_naming_vm_and_port(
    daemon: Daemon, vsock_vm: str
) -> None:
    began = time.monotonic()
    result = daemon.cli("vm", "connect", vsock_vm, "1024", "--timeout", "2")
    took = time.monotonic() - began
    assert result.exit_code == 6, result.stderr
    assert "cannot connect to vsock port 1024 of VM 'v1' within 2s" in result.stderr
    assert 2 <= took < 5
    assert "Traceback" not in daemon.logs()
    # the VMM is none the worse for it
    assert daemon.ok("vm", "resume", vsock_vm)["status"] == "running"
    daemon.ok("vm", "pause", vsock_vm)


def test_connect_to_a_stopped_vm_is_a_conflict(daemon: Daemon, vsock_vm: str) -> None:
    daemon.ok("vm", "stop", vsock_vm, "--force")
    result = daemon.cli("vm", "connect", vsock_vm, "1024")
    assert result.exit_code == 4
    assert "start it first" in result.stderr


def test_connect_to_a_vm_that_does_not_exist_is_not_found(daemon: Daemon) -> None:
    result = daemon.cli("vm", "connect", "ghost", "1024")
    assert result.exit_code == 3
    assert "ghost" in result.stderr
