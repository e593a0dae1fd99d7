"""Firecracker under its jailer, through the real daemon: each VM chrooted under the state
dir's `jail/`, as uid and gid 65534, its tap owned by that uid; `vm console` and `vm connect`
work unchanged, a restarted daemon adopts the jailed VMM, and removing the VM leaves nothing.
Its guest cannot run here, so the VM is paused at once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_cloud_hypervisor import install
from tests.harness import FIRECRACKER, Daemon, leftover_pids, links, process_alive, write_plugin
from tests.integration.test_cloud_hypervisor import stand_in_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]
JAILER = FIRECRACKER.parent / "jailer"
NOBODY = 65534


@pytest.fixture
def jailed(netns: str) -> Iterator[Daemon]:
    """A daemon that runs Firecracker VMs under the jailer as uid and gid 65534."""
    if not JAILER.exists():
        pytest.skip(f"needs the jailer ({JAILER}); run make setup")
    daemon = Daemon(netns, "--jailer", str(JAILER), "--uid", str(NOBODY), "--gid", str(NOBODY))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.close()


def ids(pid: int, field: str) -> list[int]:
    """The real, effective, saved and filesystem ids of `field` (`Uid`, `Gid`) of `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return [int(value) for value in line.split()[1:]]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def same_inode(a: Path, b: Path) -> bool:
    first, second = a.stat(), b.stat()
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def test_a_jailed_vm_runs_chrooted_as_its_uid_is_reachable_and_leaves_nothing(
    jailed: Daemon, tmp_path: Path
) -> None:
    network = {"mode": "bridged", "subnet": "10.9.0.0/24", "auto_assign": True}
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * (1 << 20))
    plugin = write_plugin(tmp_path, "p", network=network, rootfs={"path": str(rootfs)})
    jailed.ok("plugin", "install", plugin)
    vm = jailed.ok("vm", "create", "j1", "--plugin", "p")
    jailed.ok("vm", "pause", "j1")
    chroot = jailed.state_dir / "jail" / "firecracker" / "j1" / "root"
    pid, tap = vm["vmm"]["pid"], vm["network"]["tap"]

    assert ids(pid, "Uid") == [NOBODY] * 4 and ids(pid, "Gid") == [NOBODY] * 4
    assert same_inode(Path(f"/proc/{pid}/root"), chroot)
    for linked in ("kernel", "initrd"):  # hard links to the artifacts, not copies
        assert (chroot / linked).stat().st_nlink >= 2
    disk = jailed.state_dir / "disks" / "j1.img"
    assert same_inode(chroot / "rootfs", disk)  # the VM's own disk, writable by its uid
    assert (disk.stat().st_uid, disk.stat().st_gid) == (NOBODY, NOBODY)
    assert jailed.firecracker_config(vm)["drives"][0]["path_on_host"] == "/rootfs"
    owner = jailed_tap_owner(jailed.netns, tap)
    assert owner == (str(NOBODY), str(NOBODY))
    # the VM's JSON: host-side paths, inside the chroot
    assert vm["vmm"]["api_socket"] == str(chroot / "api.sock")
    assert vm["vsock"]["uds_path"] == str(chroot / "vsock.sock")
    assert vm["console_log"] == str(chroot / "console.log")
    assert jailed.firecracker_state(vm) == "Paused"

    # vm connect reaches the jailed Firecracker's vsock (nobody listens in the guest)
    result = jailed.cli("vm", "connect", "j1", "1024", "--timeout", "2")
    assert result.exit_code == 6, result.stderr
    assert "cannot connect to vsock port 1024 of VM 'j1' within 2s" in result.stderr
    assert jailed.cli("vm", "console", "j1").exit_code == 0

    # a restarted daemon adopts the jailed VMM
    assert jailed.stop() == 0
    assert process_alive(pid)
    jailed.start()
    adopted = jailed.ok("vm", "show", "j1")
    assert (adopted["status"], adopted["vmm"]["pid"]) == ("paused", pid)
    assert jailed.ok("vm", "resume", "j1")["status"] == "running"
    assert jailed.ok("vm", "pause", "j1")["status"] == "paused"

    stopped = jailed.ok("vm", "stop", "j1", "--force")
    assert stopped["status"] == "stopped"
    assert not process_alive(pid)
    assert tap not in links(jailed.netns)
    assert sorted(p.name for p in chroot.iterdir()) == ["console.log"]

    jailed.ok("vm", "start", "j1")  # the jailer starts again in the emptied chroot
    restarted = jailed.ok("vm", "show", "j1")
    assert restarted["status"] == "running" and restarted["vmm"]["pid"] != pid
    jailed.ok("vm", "rm", "j1")
    assert not (jailed.state_dir / "jail" / "firecracker" / "j1").exists()
    assert not process_alive(restarted["vmm"]["pid"])
    assert not [link for link in links(jailed.netns) if link.startswith("rtap")]
    assert leftover_pids(jailed.netns) == []


def jailed_tap_owner(netns: str, tap: str) -> tuple[str, str]:
    """The owner and group of `tap`, as sysfs in `netns` says."""
    read = f"cat /sys/class/net/{tap}/owner /sys/class/net/{tap}/group"
    output = os.popen(f"ip netns exec {netns} sh -c {read!r}").read().split()
    return output[0], output[1]


@pytest.mark.parametrize("vmm", ["qemu", "cloud-hypervisor"])
def test_vms_of_other_vmms_run_unjailed_beside_jailed_ones(
    netns: str, tmp_path: Path, tmp_short: Path, vmm: str
) -> None:
    """Only Firecracker is jailed; a QEMU VM (and one under the fake Cloud Hypervisor) keeps
    its console and sockets in its chroot dir all the same, and goes with it."""
    if not JAILER.exists():
        pytest.skip(f"needs the jailer ({JAILER}); run make setup")
    extra = ["--cloud-hypervisor", str(install(tmp_short))] if vmm == "cloud-hypervisor" else []
    daemon = Daemon(netns, "--jailer", str(JAILER), "--uid", "1", "--gid", "1", *extra)
    daemon.start("--accel", "tcg")
    try:
        plugin = stand_in_plugin(tmp_path, "p") if extra else write_plugin(tmp_path, "p")
        daemon.ok("plugin", "install", plugin)
        vm = daemon.ok("vm", "create", "o1", "--plugin", "p", "--vmm", vmm)
        chroot = daemon.state_dir / "jail" / "firecracker" / "o1" / "root"
        assert vm["console_log"] == str(chroot / "console.log")
        assert ids(vm["vmm"]["pid"], "Uid")[0] == 0
        if vm["network"]["tap"] is not None:  # not the jailed uid's to open
            assert jailed_tap_owner(netns, vm["network"]["tap"]) == ("-1", "-1")
        assert daemon.ok("vm", "pause", "o1")["status"] == "paused"
        assert daemon.ok("vm", "stop", "o1")["status"] == "stopped"
        daemon.ok("vm", "rm", "o1")
        assert not chroot.parent.exists()
        assert leftover_pids(netns) == []
    finally:
        daemon.close()
