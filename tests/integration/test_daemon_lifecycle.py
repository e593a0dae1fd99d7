"""Lifecycle guarantees: failures undo everything, statuses follow the VMM, one operation at
a time, the state dir is exclusive, and running VMMs survive a daemon restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    INITRAMFS,
    KERNEL,
    Daemon,
    leftover_pids,
    links,
    process_alive,
    wait_for,
    write_plugin,
)

pytestmark = [pytest.mark.root, pytest.mark.firecracker]


def nothing_left(daemon: Daemon, name: str) -> None:
    assert daemon.ok("vm", "list") == []
    networks = {n["name"]: n["leases"] for n in daemon.ok("network", "list")}
    networks.pop("dhcp", None)  # a --dhcp-bridge daemon's external network, never leased
    assert networks == {"default": []}
    assert not [link for link in links(daemon.netns) if link.startswith("rtap")]
    assert not (daemon.run_dir / "vms" / name).exists()
    assert leftover_pids(daemon.netns) == []


def install_unbootable_plugin(daemon: Daemon, tmp_path: Path) -> None:
    """Plugin `broken`: bridged, with a kernel that looks like ELF and is not one, so
    Firecracker takes the configuration and then refuses InstanceStart."""
    bogus = tmp_path / "bogus-vmlinux"
    bogus.write_bytes(b"\x7fELF" + b"\0" * 4096)
    plugin = write_plugin(
        tmp_path,
        "broken",
        kernel={"path": str(bogus)},
        network={"mode": "bridged", "subnet": "10.9.0.0/24", "auto_assign": True},
    )
    daemon.ok("plugin", "install", plugin)


@pytest.mark.kvm
def test_a_kernel_firecracker_cannot_boot_fails_the_create_and_leaves_nothing(
    daemon: Daemon, tmp_path: Path
) -> None:
    install_unbootable_plugin(daemon, tmp_path)
    result = daemon.cli("vm", "create", "b1", "--plugin", "broken", "--json")
    assert result.exit_code == 6
    error = result.json()["error"]
    assert error["code"] == "vmm_failed"
    assert "Cannot load kernel" in error["message"]
    nothing_left(daemon, "b1")
    assert "rbr" not in " ".join(links(daemon.netns))


@pytest.mark.kvm
def test_a_start_whose_boot_fails_leaves_the_vm_in_error(daemon: Daemon, tmp_path: Path) -> None:
    """The VM is recorded as running while Firecracker boots it; a boot that then fails must
    still end as `error`, with its leases kept and no VMM."""
    install_unbootable_plugin(daemon, tmp_path)
    created = daemon.ok("vm", "create", "b2", "--plugin", "broken", "--no-start")
    result = daemon.cli("vm", "start", "b2", "--json")
    assert (result.exit_code, result.json()["error"]["code"]) == (6, "vmm_failed")
    vm = daemon.ok("vm", "show", "b2")
    assert vm["status"] == "error"
    assert "Cannot load kernel" in vm["status_reason"]
    assert vm["vmm"]["pid"] is None
    assert vm["network"]["ip"] == created["network"]["ip"]
    assert vm["network"]["tap"] not in links(daemon.netns)


def test_a_kernel_that_is_not_elf_is_refused_at_install(daemon: Daemon, tmp_path: Path) -> None:
    bzimage = tmp_path / "vmlinuz"
    bzimage.write_bytes(b"MZ" + b"\0" * 1024)
    plugin = write_plugin(tmp_path, "bz", kernel={"path": str(bzimage)})
    result = daemon.cli("plugin", "install", plugin, "--json")
    assert result.exit_code == 1
    error = result.json()["error"]
    assert [d["loc"] for d in error["details"]] == ["kernel"]
    assert "ELF" in error["message"]
    assert daemon.ok("plugin", "list") == []


def test_a_missing_firecracker_fails_the_create_and_leaves_nothing(
    netns: str, tmp_path: Path
) -> None:
    daemon = Daemon(netns, firecracker=tmp_path / "no-such-firecracker").start()
    try:
        daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
        result = daemon.cli("vm", "create", "m1", "--plugin", "p", "--json")
        assert result.exit_code == 6
        error = result.json()["error"]
        assert error["code"] == "vmm_unavailable"
        assert "no-such-firecracker" in error["message"]
        nothing_left(daemon, "m1")
    finally:
        daemon.close()


def test_concurrent_creates_get_distinct_allocations(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    results: list[Any] = [None] * 100

    def create(index: int) -> None:
        response = daemon.http.post(
            "/v1/vms", json={"name": f"c{index}", "plugin": "p", "start": False}
        )
        results[index] = (response.status_code, response.json())

    threads = [threading.Thread(target=create, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {status for status, _ in results} == {201}, [body for _, body in results][:3]
    vms = [body for _, body in results]
    for key in ("ip", "mac", "tap"):
        assert len({vm["network"][key] for vm in vms}) == 100, key
    assert len({vm["vsock"]["cid"] for vm in vms}) == 100
    assert all(vm["status"] == "created" for vm in vms)
    assert len(daemon.ok("network", "list")[0]["leases"]) == 100


@pytest.mark.kvm
def test_statuses_follow_the_vmm(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    vm = daemon.ok("vm", "create", "life", "--plugin", "p")
    assert vm["status"] == "running"
    # what a status change answers is what reading the VM says (the change reads less)
    assert vm == daemon.ok("vm", "show", "life")
    # asking for the status it has is a no-op
    assert daemon.ok("vm", "start", "life")["vmm"]["pid"] == vm["vmm"]["pid"]
    paused = daemon.ok("vm", "pause", "life")
    assert paused["status"] == "paused"
    assert paused == daemon.ok("vm", "show", "life")
    assert daemon.firecracker_state(vm) == "Paused"
    assert daemon.ok("vm", "pause", "life")["status"] == "paused"
    assert daemon.ok("vm", "resume", "life")["status"] == "running"
    assert daemon.firecracker_state(vm) == "Running"
    restarted = daemon.ok("vm", "restart", "life")
    assert restarted["status"] == "running"
    assert restarted["vmm"]["pid"] != vm["vmm"]["pid"]
    assert not process_alive(vm["vmm"]["pid"])

    # a VMM killed behind roost's back: crashed, exit code = minus the signal, tap removed,
    # leases kept
    os.kill(restarted["vmm"]["pid"], signal.SIGKILL)
    crashed = wait_for(
        lambda: (v := daemon.ok("vm", "show", "life"))["status"] == "crashed" and v,
        what="the VM to be crashed",
    )
    assert crashed["exit_code"] == -9
    assert "signal 9" in crashed["status_reason"]
    assert crashed["network"]["tap"] not in links(daemon.netns)
    assert crashed["network"]["ip"] == vm["network"]["ip"]
    assert daemon.cli("vm", "pause", "life").exit_code == 4
    assert daemon.ok("vm", "stop", "life")["status"] == "crashed"  # already not running


@pytest.mark.kvm
def test_one_operation_at_a_time(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    daemon.ok("vm", "create", "busy", "--plugin", "p")
    stopper = threading.Thread(
        target=lambda: daemon.http.post("/v1/vms/busy/stop", params={"timeout": 2})
    )
    stopper.start()
    try:
        wait_for(
            lambda: daemon.ok("vm", "show", "busy")["status"] == "stopping",
            what="the stop to begin",
        )
        result = daemon.cli("vm", "pause", "busy", "--json")
        assert result.exit_code == 4
        assert result.json()["error"]["code"] == "vm_busy"
    finally:
        stopper.join()
    assert daemon.ok("vm", "show", "busy")["status"] == "stopped"


@pytest.mark.kvm
def test_rm_of_a_running_vm_stops_it_first(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    vm = daemon.ok("vm", "create", "gone", "--plugin", "p")
    assert daemon.cli("vm", "rm", "gone").exit_code == 0
    assert not process_alive(vm["vmm"]["pid"])
    nothing_left(daemon, "gone")
    assert daemon.cli("vm", "show", "gone").exit_code == 3


def test_a_second_daemon_on_the_same_state_dir_exits_touching_nothing(daemon: Daemon) -> None:
    before = sorted(p.name for p in daemon.state_dir.iterdir())
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "roost.cli.main",
            "serve",
            "--state-dir",
            str(daemon.state_dir),
            "--run-dir",
            str(daemon.dir / "run2"),
            "--listen",
            f"unix://{daemon.dir}/b.sock",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 4
    assert "another roost daemon uses state dir" in second.stderr
    assert sorted(p.name for p in daemon.state_dir.iterdir()) == before
    assert not (daemon.dir / "b.sock").exists()
    assert not (daemon.dir / "run2").exists()  # made only to be locked, then removed
    assert daemon.http.get("/healthz").status_code == 200


@pytest.mark.kvm
def test_running_vmms_outlive_the_daemon_and_are_adopted(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    vm = daemon.ok("vm", "create", "keep", "--plugin", "p")
    daemon.ok("vm", "pause", "keep")
    assert daemon.stop() == 0
    assert process_alive(vm["vmm"]["pid"])
    daemon.start()
    adopted = daemon.ok("vm", "show", "keep")
    assert (adopted["status"], adopted["vmm"]["pid"]) == ("paused", vm["vmm"]["pid"])
    resumed = daemon.ok("vm", "resume", "keep")
    assert resumed == {**adopted, "status": "running", "updated_at": resumed["updated_at"]}
    assert daemon.ok("vm", "pause", "keep") == daemon.ok("vm", "show", "keep")
    stopped = daemon.ok("vm", "stop", "keep", "--force")
    assert stopped["exit_code"] == -9
    wait_for(lambda: not process_alive(vm["vmm"]["pid"]), what="the adopted VMM to end")


def test_plugin_install_conflicts_force_and_in_use(daemon: Daemon, tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "p")
    installed = daemon.ok("plugin", "install", path)
    assert set(installed) == {"name", "version", "manifest", "artifacts", "vms"}
    assert installed["artifacts"]["kernel"]["size"] == KERNEL.stat().st_size
    again = daemon.cli("plugin", "install", path, "--json")
    assert (again.exit_code, again.json()["error"]["code"]) == (4, "exists")
    daemon.ok("vm", "create", "user", "--plugin", "p", "--no-start")
    write_plugin(tmp_path, "p", version="2.0.0", resources={"memory_mib": 64})
    assert daemon.ok("plugin", "install", path, "--force")["version"] == "2.0.0"
    # the existing VM keeps the manifest it was created with; a new one gets the new one
    assert daemon.ok("vm", "show", "user")["resources"]["memory_mib"] == 128
    assert (
        daemon.ok("vm", "create", "newer", "--plugin", "p", "--no-start")["resources"]["memory_mib"]
        == 64
    )
    in_use = daemon.cli("plugin", "rm", "p", "--json")
    assert (in_use.exit_code, in_use.json()["error"]["code"]) == (4, "plugin_in_use")
    assert daemon.ok("plugin", "show", "p")["vms"] == ["newer", "user"]


def test_declared_sha256_is_checked(daemon: Daemon, tmp_path: Path) -> None:
    path = write_plugin(
        tmp_path,
        "p",
        initramfs={"path": str(KERNEL.parent / "initramfs.cpio.gz"), "sha256": "0" * 64},
    )
    result = daemon.cli("plugin", "install", path, "--json")
    assert result.exit_code == 1
    assert result.json()["error"]["details"][0]["loc"] == "initramfs.sha256"


def test_install_streams_progress_as_json_lines(daemon: Daemon, tmp_path: Path) -> None:
    body = {
        "name": "p",
        "version": "1",
        "kernel": {"path": str(KERNEL)},
        "initramfs": {"path": str(KERNEL.parent / "initramfs.cpio.gz")},
    }
    with daemon.http.stream(
        "POST", "/v1/plugins", json=body, headers={"accept": "application/x-ndjson"}
    ) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["name"] == "p"
    events = {(line["event"], line["role"]) for line in lines[:-1]}
    assert ("artifact", "kernel") in events
    assert ("progress", "kernel") in events
    done = [line for line in lines[:-1] if line["event"] == "progress" and line["role"] == "kernel"]
    assert done[-1]["done"] == done[-1]["total"] == KERNEL.stat().st_size


def test_cli_exit_codes_for_missing_things_and_an_unreachable_daemon(daemon: Daemon) -> None:
    assert daemon.cli("vm", "show", "nope").exit_code == 3
    assert daemon.cli("plugin", "show", "nope").exit_code == 3
    missing = daemon.cli("vm", "create", "x", "--plugin", "nope", "--json")
    assert (missing.exit_code, missing.json()["error"]["code"]) == (3, "not_found")
    unreachable = Daemon(daemon.netns)  # never started: nothing listens on its socket
    try:
        result = unreachable.cli("vm", "list", "--json")
        assert result.exit_code == 5
        assert result.json()["error"]["code"] == "unreachable"
    finally:
        unreachable.close()
    bad = daemon.http.post(
        "/v1/vms", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_json")
    invalid = daemon.http.post("/v1/vms", json={"name": "Bad_Name", "plugin": "p"})
    assert (invalid.status_code, invalid.json()["error"]["details"][0]["loc"]) == (422, "name")


def test_one_daemon_per_network_namespace(daemon: Daemon) -> None:
    other = Daemon(daemon.netns)
    try:
        with pytest.raises(RuntimeError, match="one daemon per namespace"):
            other.start()
    finally:
        other.close()
    assert daemon.http.get("/healthz").status_code == 200


@pytest.mark.kvm
def test_a_plugin_without_kernel_uses_the_daemons(netns: str, tmp_path: Path) -> None:
    manifest = json.loads(write_plugin(tmp_path, "nokernel").read_text())
    del manifest["kernel"]
    plugin = tmp_path / "nokernel.json"
    plugin.write_text(json.dumps(manifest))
    bare = Daemon(netns).start()
    try:
        bare.ok("plugin", "install", plugin)
        refused = bare.cli("vm", "create", "k0", "--plugin", "nokernel", "--json")
        assert refused.exit_code == 1
        assert refused.json()["error"]["details"][0]["loc"] == "kernel"
        assert "--kernel" in refused.json()["error"]["message"]
        assert bare.ok("vm", "list") == []
    finally:
        bare.close()
    with_kernel = Daemon(netns, "--kernel", str(KERNEL)).start()
    try:
        with_kernel.ok("plugin", "install", plugin)
        vm = with_kernel.ok("vm", "create", "k1", "--plugin", "nokernel")
        with_kernel.ok("vm", "pause", "k1")
        config = with_kernel.firecracker_config(vm)
        assert config["boot-source"]["kernel_image_path"] == str(KERNEL)
    finally:
        with_kernel.close()


@pytest.mark.kvm
def test_a_failed_start_keeps_the_vm_and_its_leases(daemon: Daemon, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus-vmlinux"
    bogus.write_bytes(b"\x7fELF" + b"\0" * 4096)
    daemon.ok("plugin", "install", write_plugin(tmp_path, "broken", kernel={"path": str(bogus)}))
    created = daemon.ok("vm", "create", "f1", "--plugin", "broken", "--no-start")
    result = daemon.cli("vm", "start", "f1", "--json")
    assert result.exit_code == 6
    failed = daemon.ok("vm", "show", "f1")
    assert failed["status"] == "error"
    assert "Cannot load kernel" in failed["status_reason"]
    assert failed["network"]["ip"] == created["network"]["ip"]
    assert failed["network"]["tap"] not in links(daemon.netns)
    assert failed["vmm"]["pid"] is None
    assert leftover_pids(daemon.netns) == []
    assert created["network"]["ip"] in daemon.ok("network", "list")[0]["leases"]


@pytest.mark.kvm
def test_a_vmm_that_ends_while_the_daemon_is_down_is_settled(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    vm = daemon.ok("vm", "create", "late", "--plugin", "p")
    daemon.ok("vm", "pause", "late")
    assert daemon.stop() == 0
    os.kill(vm["vmm"]["pid"], signal.SIGKILL)
    wait_for(
        (daemon.run_dir / "vms" / "late" / "exit").exists,
        what="the supervisor to record the exit",
    )
    daemon.start()
    settled = daemon.ok("vm", "show", "late")
    assert (settled["status"], settled["exit_code"]) == ("crashed", -9)
    assert settled["network"]["tap"] not in links(daemon.netns)


def test_artifacts_from_file_and_http_urls(daemon: Daemon, tmp_path: Path) -> None:
    import http.server
    import threading as threads

    served = tmp_path / "www"
    served.mkdir()
    (served / "initramfs.cpio.gz").write_bytes(INITRAMFS.read_bytes())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threads.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/initramfs.cpio.gz"
        plugin = write_plugin(
            tmp_path, "remote", kernel={"url": f"file://{KERNEL}"}, initramfs={"url": url}
        )
        installed = daemon.ok("plugin", "install", plugin)
        assert installed["artifacts"]["initramfs"]["size"] == INITRAMFS.stat().st_size
        missing = write_plugin(tmp_path, "gone", initramfs={"url": url + ".missing"})
        result = daemon.cli("plugin", "install", missing, "--json")
        assert result.exit_code == 1
        assert "HTTP 404" in result.json()["error"]["message"]
    finally:
        server.shutdown()
        thread.join()


@pytest.mark.kvm
def test_each_vm_writes_to_its_own_copy_of_the_rootfs(daemon: Daemon, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * (1 << 20))
    daemon.ok("plugin", "install", write_plugin(tmp_path, "disky", rootfs={"path": str(rootfs)}))
    stored = daemon.state_dir / "artifacts" / "sha256"
    drives = []
    for name in ("d1", "d2"):
        vm = daemon.ok("vm", "create", name, "--plugin", "disky")
        daemon.ok("vm", "pause", name)
        [drive] = daemon.firecracker_config(vm)["drives"]
        assert drive["is_read_only"] is False
        drives.append(Path(drive["path_on_host"]))
    assert drives == [daemon.state_dir / "disks" / "d1.img", daemon.state_dir / "disks" / "d2.img"]
    assert all(disk.read_bytes() == rootfs.read_bytes() for disk in drives)
    assert not any(disk.parent == stored for disk in drives)
    assert daemon.cli("vm", "rm", "d1").exit_code == 0
    assert not drives[0].exists()
    assert drives[1].exists()
