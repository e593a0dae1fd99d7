"""Cloud Hypervisor VMs through the real daemon in a throwaway namespace: create, pause,
resume, stop, start and remove; `--vmm cloud-hypervisor` on serve and on a config patch; a
restarted daemon adopts them; `vm connect` to a port nobody answers fails cleanly; without a
binary a create is 503 `vmm_unavailable` and makes nothing.

No Cloud Hypervisor runs here: every test runs against the FAKE one
(tests/fake_cloud_hypervisor.py), and again against a real binary when
`$ROOST_CLOUD_HYPERVISOR` names one (its guest is paused at once, as Firecracker's in these
tests: nested KVM here runs no standard guest)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_cloud_hypervisor import install
from tests.harness import (
    INITRAMFS,
    KERNEL,
    Daemon,
    leftover_pids,
    links,
    missing,
    process_alive,
    short_tmp,
    write_plugin,
)

pytestmark = pytest.mark.root
REAL = os.environ.get("ROOST_CLOUD_HYPERVISOR")


@dataclass
class VMM:
    """The Cloud Hypervisor binary under test; `record` is where the fake writes what it was
    asked (None for a real binary)."""

    binary: Path
    record: Path | None

    def plugin(self, directory: Path, name: str, **fields: Any) -> Path:
        """A plugin the binary can take: the demo guest for a real one."""
        if self.record is None:
            return write_plugin(directory, name, **fields)
        return stand_in_plugin(directory, name, **fields)

    def asked(self, vm: dict[str, Any]) -> list[str]:
        """The PUTs the fake got on the VM's API socket, in order."""
        assert self.record is not None
        lines = [json.loads(line) for line in self.record.read_text().splitlines()]
        return [
            line["path"].removeprefix("/api/v1/")
            for line in lines
            if line["socket"] == vm["vmm"]["api_socket"] and line["method"] == "PUT"
        ]


def stand_in_plugin(directory: Path, name: str, **fields: Any) -> Path:
    """A plugin for VMMs that read neither its kernel (an ELF header) nor its initramfs (an
    empty file), so no build is needed."""
    kernel, initramfs = directory / "vmlinux", directory / "initramfs"
    kernel.write_bytes(b"\x7fELF" + b"\0" * 4096)
    initramfs.write_bytes(b"")
    return write_plugin(
        directory, name, kernel={"path": str(kernel)}, initramfs={"path": str(initramfs)}, **fields
    )


@pytest.fixture(params=["fake", "real"])
def vmm(request: pytest.FixtureRequest) -> Iterator[VMM]:
    if request.param == "real":
        if not REAL or not os.access(REAL, os.X_OK):
            pytest.skip(
                "no real Cloud Hypervisor here: set $ROOST_CLOUD_HYPERVISOR to its binary to run "
                "these tests against it too"
            )
        if missing([KERNEL, INITRAMFS]):
            pytest.skip(f"needs the demo guest ({', '.join(missing([KERNEL, INITRAMFS]))})")
        yield VMM(Path(REAL), None)
        return
    directory = short_tmp()
    try:
        record = directory / "requests.jsonl"
        yield VMM(install(directory, "--record", str(record)), record)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def start_daemon(netns: str, vmm: VMM, *args: str) -> Daemon:
    return Daemon(netns, "--cloud-hypervisor", str(vmm.binary), *args).start()


@pytest.fixture
def daemon(netns: str, vmm: VMM) -> Iterator[Daemon]:
    """A daemon whose default VMM is still Firecracker: VMs name Cloud Hypervisor."""
    instance = start_daemon(netns, vmm)
    try:
        yield instance
    finally:
        instance.close()


def vm_info(vm: dict[str, Any]) -> dict[str, Any]:
    """What Cloud Hypervisor itself says of the VM (`GET vm.info` on its API socket)."""
    transport = httpx.HTTPTransport(uds=vm["vmm"]["api_socket"])
    with httpx.Client(transport=transport, base_url="http://localhost/api/v1") as client:
        info: dict[str, Any] = client.get("/vm.info").raise_for_status().json()
        return info


def nothing_left(daemon: Daemon, name: str) -> None:
    assert daemon.ok("vm", "list") == []
    assert not [link for link in links(daemon.netns) if link.startswith("rtap")]
    assert not (daemon.run_dir / "vms" / name).exists()
    assert leftover_pids(daemon.netns) == []


def test_a_vm_is_created_paused_resumed_stopped_started_and_removed(
    daemon: Daemon, vmm: VMM, tmp_path: Path
) -> None:
    daemon.ok("plugin", "install", vmm.plugin(tmp_path, "p"))
    vm = daemon.ok("vm", "create", "c1", "--plugin", "p", "--vmm", "cloud-hypervisor")
    daemon.ok("vm", "pause", "c1")  # before a real guest spins
    run_dir = daemon.run_dir / "vms" / "c1"
    assert (vm["status"], vm["vmm"]["kind"]) == ("running", "cloud-hypervisor")
    assert vm["vmm"]["api_socket"] == str(run_dir / "api.sock")
    assert vm["vsock"] == {
        "cid": vm["vsock"]["cid"],
        "uds_path": str(run_dir / "vsock.sock"),
        "available": True,
        "backend": "cloud-hypervisor",
        "reason": None,
    }
    info = vm_info(vm)
    assert info["state"] == "Paused"
    config = info["config"]
    [net] = config["net"]
    assert (net["tap"], net["mac"]) == (vm["network"]["tap"], vm["network"]["mac"])
    assert config["vsock"]["cid"] == vm["vsock"]["cid"]
    assert config["vsock"]["socket"] == vm["vsock"]["uds_path"]
    assert config["serial"]["mode"] == "File"
    assert config["serial"]["file"] == vm["console_log"]
    assert config["console"]["mode"] == "Off"
    assert config["memory"]["size"] == 128 << 20
    assert f"ip={vm['network']['ip']}::" in config["payload"]["cmdline"]
    assert daemon.ok("vm", "resume", "c1")["status"] == "running"
    assert vm_info(vm)["state"] == "Running"
    daemon.ok("vm", "pause", "c1")

    stopped = daemon.ok("vm", "stop", "c1")
    assert stopped["status"] == "stopped"
    assert not process_alive(vm["vmm"]["pid"])
    assert vm["network"]["tap"] not in links(daemon.netns)
    if vmm.record is not None:
        assert stopped["exit_code"] == 0  # the fake's "guest" powered off
        assert vmm.asked(vm) == [
            "vm.create",
            "vm.boot",
            "vm.pause",
            "vm.resume",
            "vm.pause",
            "vm.resume",  # the engine resumes a paused VM to stop it gracefully
            "vm.power-button",
        ]
        console = daemon.cli("vm", "console", "c1")
        assert "fake cloud-hypervisor: booted" in console.stdout

    again = daemon.ok("vm", "start", "c1")
    daemon.ok("vm", "pause", "c1")
    assert again["status"] == "running"
    assert again["vmm"]["pid"] != vm["vmm"]["pid"]
    daemon.ok("vm", "rm", "c1")
    nothing_left(daemon, "c1")
    assert "Traceback" not in daemon.logs()


def test_serve_vmm_cloud_hypervisor_and_connect_to_a_port_nobody_answers(
    netns: str, vmm: VMM, tmp_path: Path
) -> None:
    daemon = start_daemon(netns, vmm, "--vmm", "cloud-hypervisor")
    try:
        daemon.ok("plugin", "install", vmm.plugin(tmp_path, "p", network={"mode": "vsock"}))
        vm = daemon.ok("vm", "create", "v1", "--plugin", "p")
        daemon.ok("vm", "pause", "v1")
        assert (vm["vmm"]["kind"], vm["vsock"]["backend"]) == ("cloud-hypervisor",) * 2
        assert vm["network"]["tap"] is None
        assert "net" not in vm_info(vm)["config"] or not vm_info(vm)["config"]["net"]
        began = time.monotonic()
        result = daemon.cli("vm", "connect", "v1", "1024", "--timeout", "2")
        took = time.monotonic() - began
        assert result.exit_code == 6, result.stderr
        assert "cannot connect to vsock port 1024 of VM 'v1' within 2s" in result.stderr
        assert 1 < took < 5  # retried until about its timeout, not beyond
        assert daemon.ok("vm", "resume", "v1")["status"] == "running"  # none the worse for it
        daemon.ok("vm", "rm", "v1")
        nothing_left(daemon, "v1")
        assert "Traceback" not in daemon.logs()
    finally:
        daemon.close()


def test_a_config_patch_moves_a_vm_to_cloud_hypervisor(
    netns: str, vmm: VMM, tmp_path: Path
) -> None:
    # made for Firecracker and never started under it: any executable passes for its binary
    true = shutil.which("true")
    assert true is not None
    daemon = start_daemon(netns, vmm, "--firecracker", true)
    try:
        daemon.ok("plugin", "install", vmm.plugin(tmp_path, "p", network={"mode": "vsock"}))
        created = daemon.ok("vm", "create", "m1", "--plugin", "p", "--no-start")
        assert created["vmm"]["kind"] == "firecracker"
        daemon.ok("vm", "config", "patch", "m1", "--vmm", "cloud-hypervisor")
        started = daemon.ok("vm", "start", "m1")
        daemon.ok("vm", "pause", "m1")
        assert (started["vmm"]["kind"], started["vsock"]["backend"]) == ("cloud-hypervisor",) * 2
        assert vm_info(started)["state"] == "Paused"
    finally:
        daemon.close()


def test_a_restarted_daemon_adopts_its_cloud_hypervisor_vms(
    daemon: Daemon, vmm: VMM, tmp_path: Path
) -> None:
    daemon.ok("plugin", "install", vmm.plugin(tmp_path, "p", network={"mode": "vsock"}))
    vm = daemon.ok("vm", "create", "a1", "--plugin", "p", "--vmm", "cloud-hypervisor")
    daemon.ok("vm", "pause", "a1")
    daemon.stop()
    daemon.start()
    adopted = daemon.ok("vm", "show", "a1")
    assert (adopted["status"], adopted["vmm"]["pid"]) == ("paused", vm["vmm"]["pid"])
    assert daemon.ok("vm", "resume", "a1")["status"] == "running"
    daemon.ok("vm", "pause", "a1")
    assert vm_info(vm)["state"] == "Paused"
    daemon.ok("vm", "rm", "a1")
    nothing_left(daemon, "a1")


@pytest.mark.parametrize("binary", ["missing", "none"])
def test_without_a_binary_a_create_is_503_and_makes_nothing(
    netns: str, tmp_path: Path, binary: str
) -> None:
    if binary == "none" and shutil.which("cloud-hypervisor") is not None:
        pytest.skip("cloud-hypervisor is on PATH here: a daemon always finds one")
    args = ["--cloud-hypervisor", str(tmp_path / "no-such")] if binary == "missing" else []
    daemon = Daemon(netns, *args, env={"ROOST_CLOUD_HYPERVISOR": ""}).start()
    try:
        daemon.ok("plugin", "install", stand_in_plugin(tmp_path, "p"))
        answer = daemon.http.post(
            "/v1/vms", json={"name": "n1", "plugin": "p", "vmm": "cloud-hypervisor"}
        )
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["code"] == "vmm_unavailable"
        expected = (
            f"Cloud Hypervisor binary {tmp_path / 'no-such'} does not exist"
            if binary == "missing"
            else "no Cloud Hypervisor binary: pass --cloud-hypervisor PATH to roost serve"
        )
        assert expected in error["message"]
        result = daemon.cli("vm", "create", "n1", "--plugin", "p", "--vmm", "cloud-hypervisor")
        assert result.exit_code == 6
        assert expected in result.stderr
        nothing_left(daemon, "n1")
        assert [n["leases"] for n in daemon.ok("network", "list")] == [[]]
    finally:
        daemon.close()
