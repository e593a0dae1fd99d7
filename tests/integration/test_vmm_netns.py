"""VMMs started inside a VM's own network namespace (a cni VM's `roost-vm-<name>`), while the
supervisor lives in the daemon's: the VMM runs there under the PID the supervisor recorded,
opens the taps that exist only there, and is stopped by PID as any other. Two throwaway
namespaces per test (the daemon's and the VM's); every process is ended by PID and reaped."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from roost.errors import VMMFailedError
from roost.host.netns import NetnsWorker, netns_path
from roost.vmm.base import NIC, RunDir, Vsock, VsockBackend, stop_in_steps
from roost.vmm.cloud_hypervisor import CloudHypervisorDriver
from roost.vmm.firecracker import FirecrackerAPI, FirecrackerDriver, Jail
from roost.vmm.process import VMMProcess, is_vmm_of, recorded_pid
from roost.vmm.qemu import QemuDriver
from tests.fake_cloud_hypervisor import install
from tests.harness import (
    FIRECRACKER,
    INITRAMFS,
    KERNEL,
    bridged_tap,
    missing,
    namespace_pids,
    run,
    short_tmp,
)
from tests.harness import network_namespace as throwaway_namespace
from tests.integration.test_qemu_driver import (
    BRIDGED_ARGS,
    GUEST_IP,
    Guests,
    gone,
    http_get,
)

pytestmark = pytest.mark.root
TAIL = shutil.which("tail")
JAILER = FIRECRACKER.parent / "jailer"
NOBODY = 65534


@dataclass
class Namespaces:
    """The daemon's namespace (its worker, where the supervisor runs) and a VM's."""

    daemon: str
    vm: str
    worker: NetnsWorker
    root: Path  # a short dir for run dirs (Unix socket paths)

    @property
    def vm_path(self) -> Path:
        return netns_path(self.vm)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    with throwaway_namespace() as daemon, throwaway_namespace() as vm:
        worker = NetnsWorker(daemon)
        root = short_tmp()
        try:
            yield Namespaces(daemon, vm, worker, root)
        finally:
            worker.close()
            shutil.rmtree(root, ignore_errors=True)
        assert namespace_pids(vm) == []


def in_namespace(pid: int, namespace: Path) -> bool:
    """Whether process `pid` runs in the network namespace file `namespace`."""
    ours, theirs = Path(f"/proc/{pid}/ns/net").stat(), namespace.stat()
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def tailer(ns: Namespaces, name: str, netns: Path | None) -> VMMProcess:
    """A long-running stand-in VMM whose command line names its run dir, as a VMM's does."""
    assert TAIL is not None
    run_dir = ns.root / name
    run_dir.mkdir()
    (run_dir / "vmm.log").touch()
    argv = [TAIL, "-f", str(run_dir / "vmm.log")]
    starting = VMMProcess.begin(
        argv, run_dir, ns.worker, output=run_dir / "console.log", netns=netns
    )
    return starting.result()


def attached_taps(pid: int) -> set[str]:
    """The taps process `pid` holds open (the kernel names them in each descriptor's fdinfo)."""
    names = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        for line in info.read_text().splitlines():
            if line.startswith("iff:"):
                names.add(line.split()[1])
    return names


@pytest.mark.skipif(TAIL is None, reason="needs tail")
def test_a_vmm_started_in_a_namespace_runs_there_under_its_recorded_pid_and_stops_by_pid(
    namespaces: Namespaces,
) -> None:
    ns = namespaces
    inside = tailer(ns, "vm1", ns.vm_path)
    beside = tailer(ns, "vm2", None)  # the supervisor came back: the next start is at home
    try:
        assert in_namespace(inside.pid, ns.vm_path)
        assert in_namespace(beside.pid, netns_path(ns.daemon))
        assert in_namespace(inside.supervisor_pid, netns_path(ns.daemon))
        assert recorded_pid(inside.run_dir) == inside.pid  # the VMM itself, no wrapper
        assert is_vmm_of(inside.pid, inside.run_dir)  # as recovery finds it
        assert namespace_pids(ns.vm) == [inside.pid]
        # the stop ladder: SIGTERM by PID, then reaped with its exit status
        assert stop_in_steps(inside, [], force=False, term_wait=5) == -15
        assert inside.exit_file.exists() and not Path(f"/proc/{inside.pid}").exists()
    finally:
        inside.kill()
        beside.kill()


@pytest.mark.skipif(TAIL is None, reason="needs tail")
@pytest.mark.parametrize(
    ("what", "said"),
    [("missing", "network namespace {}: No such file"), ("a plain file", "cannot enter .*{}")],
)
def test_a_namespace_that_cannot_be_entered_is_a_failed_start_and_starts_nothing(
    namespaces: Namespaces, what: str, said: str
) -> None:
    ns = namespaces
    bad = ns.root / "not-a-namespace"
    if what == "a plain file":  # as a crash while creating one leaves it
        bad.touch()
    with pytest.raises(VMMFailedError, match=said.format(bad)):
        tailer(ns, "vm1", bad)
    assert recorded_pid(ns.root / "vm1") is None
    after = tailer(ns, "vm2", ns.vm_path)  # the same supervisor goes on
    try:
        assert in_namespace(after.pid, ns.vm_path)
    finally:
        after.kill()


needs_guest = pytest.mark.skipif(
    bool(missing([KERNEL, INITRAMFS])) or shutil.which("qemu-system-x86_64") is None,
    reason="needs the demo guest (make setup) and qemu-system-x86_64",
)


@pytest.fixture
def guests(namespaces: Namespaces) -> Iterator[Guests]:
    instance = Guests(namespaces.worker, namespaces.root)
    try:
        yield instance
    finally:
        instance.close()


@needs_guest
def test_a_qemu_guest_whose_tap_is_only_in_its_namespace_boots_with_its_nic(
    namespaces: Namespaces, guests: Guests
) -> None:
    ns = namespaces
    tap = bridged_tap(ns.vm)
    driver = QemuDriver(accel="tcg", vsock="user")
    spec = guests.spec("g1", BRIDGED_ARGS, NIC(tap=tap, mac="06:00:0a:00:00:05"))
    vsock = Vsock(3, spec.run_dir.vsock_socket, VsockBackend.USER)
    spec = replace(spec, netns=ns.vm_path, vsock=vsock)
    process, console = guests.boot(driver, spec)
    assert in_namespace(process.pid, ns.vm_path)
    # its vsock device speaks only Unix sockets (by path, seen from every namespace): at home
    assert process.device is not None
    assert in_namespace(process.device.pid, netns_path(ns.daemon))
    assert attached_taps(process.pid) == {tap}
    assert tap not in run("ip", "link", netns=ns.daemon).stdout  # nothing made at home
    assert f"roost-net: eth0 static {GUEST_IP}/24 gw 10.0.0.1\n" in console
    assert http_get(ns.vm, 5) == f"g1 {GUEST_IP}\n"
    assert is_vmm_of(process.pid, spec.run_dir.path)
    assert driver.stop(process, 10, force=False) == 0  # the power button, over QMP
    assert gone(process) and gone(process.device)


@needs_guest
def test_a_tap_missing_from_the_vms_namespace_is_refused_before_qemu_starts(
    namespaces: Namespaces, guests: Guests
) -> None:
    ns = namespaces
    run("ip", "tuntap", "add", "dev", "rtap0", "mode", "tap", netns=ns.daemon)  # the wrong side
    driver = QemuDriver(accel="tcg")
    spec = replace(
        guests.spec("g2", BRIDGED_ARGS, NIC(tap="rtap0", mac="06:00:0a:00:00:05")),
        netns=ns.vm_path,
    )
    with pytest.raises(VMMFailedError, match=f"tap rtap0 does not exist .*{ns.vm_path}"):
        guests.launch(driver, spec)
    assert not (spec.run_dir.path / "vmm.pid").exists()
    assert "rtap0" not in run("ip", "link", netns=ns.vm).stdout


def test_cloud_hypervisor_runs_in_the_specs_namespace_and_finds_its_tap_there(
    namespaces: Namespaces,
) -> None:
    """With the fake Cloud Hypervisor (no guest, no tap opened): the driver's tap check looks
    in the VM's namespace, and the VMM runs there."""
    ns = namespaces
    run("ip", "tuntap", "add", "dev", "ctap0", "mode", "tap", netns=ns.vm)
    driver = CloudHypervisorDriver(install(ns.root))
    spec = Guests(ns.worker, ns.root).spec("c1", "console=ttyS0", NIC("ctap0", "06:00:0a:00:00:08"))
    process = driver.launch(replace(spec, netns=ns.vm_path), ns.worker)
    try:
        assert in_namespace(process.pid, ns.vm_path)
        assert is_vmm_of(process.pid, spec.run_dir.path)
    finally:
        assert driver.stop(process, 5, force=False) == 0  # the power button
    assert gone(process)


needs_firecracker = pytest.mark.skipif(
    not FIRECRACKER.exists(), reason=f"needs {FIRECRACKER}; run make setup"
)


def put_tap(api: FirecrackerAPI, tap: str) -> None:
    body = {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": "06:00:0a:00:00:07"}
    api.call("PUT", "/network-interfaces/eth0", body)


@needs_firecracker
def test_firecracker_started_early_in_a_namespace_opens_its_tap_there(
    namespaces: Namespaces,
) -> None:
    ns = namespaces
    run("ip", "tuntap", "add", "dev", "ftap0", "mode", "tap", netns=ns.vm)
    driver = FirecrackerDriver(FIRECRACKER)
    run_dir = RunDir(ns.root / "f1")
    run_dir.prepare()
    process = driver.start_early("f1", run_dir, ns.worker, ns.vm_path).result()
    api = FirecrackerAPI(run_dir.api_socket)
    try:
        assert in_namespace(process.pid, ns.vm_path)
        assert is_vmm_of(process.pid, run_dir.path)
        put_tap(api, "ftap0")  # Firecracker opens the tap at once
        assert attached_taps(process.pid) == {"ftap0"}
        assert "ftap0" not in run("ip", "link", netns=ns.daemon).stdout
    finally:
        api.close()
        assert driver.stop(process, 0, force=False) == -15  # unbooted: SIGTERM by PID
    assert gone(process)


@needs_firecracker
def test_a_vmm_started_early_outside_the_specs_namespace_is_refused_and_ended(
    namespaces: Namespaces,
) -> None:
    ns = namespaces
    driver = FirecrackerDriver(FIRECRACKER)
    run_dir = RunDir(ns.root / "f2")
    run_dir.prepare()
    early = driver.start_early("f2", run_dir, ns.worker)  # no namespace: the daemon's
    spec = Guests(ns.worker, ns.root).spec("f2-spec", "console=ttyS0")
    spec = replace(spec, name="f2", run_dir=run_dir, netns=ns.vm_path)
    with pytest.raises(VMMFailedError, match=f"runs outside network namespace {ns.vm_path}"):
        driver.launch(spec, ns.worker, early=early)
    process = early.result()
    assert gone(process)


@needs_firecracker
@pytest.mark.skipif(not JAILER.exists(), reason=f"needs the jailer {JAILER}; run make setup")
def test_a_jailed_firecracker_joins_the_namespace_through_the_jailers_netns(
    namespaces: Namespaces,
) -> None:
    ns = namespaces
    run("ip", "tuntap", "add", "dev", "ftap0", "mode", "tap", "user", str(NOBODY), netns=ns.vm)
    jail = Jail(JAILER, NOBODY, NOBODY, ns.root / "jail")
    driver = FirecrackerDriver(FIRECRACKER, jail)
    run_dir = RunDir(ns.root / "run" / "j1", jail.base / "firecracker" / "j1" / "root")
    run_dir.prepare()
    process = driver.start_early("j1", run_dir, ns.worker, ns.vm_path).result()
    api = FirecrackerAPI(run_dir.api_socket)
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert cmdline.startswith(b"/firecracker\0")  # the jailer exec'd in place
        assert in_namespace(process.pid, ns.vm_path)
        assert in_namespace(process.supervisor_pid, netns_path(ns.daemon))
        assert os.stat(f"/proc/{process.pid}").st_uid == NOBODY
        assert is_vmm_of(process.pid, run_dir.path, run_dir.chroot)
        put_tap(api, "ftap0")
        assert attached_taps(process.pid) == {"ftap0"}
        api.close()
        assert driver.stop(process, 0, force=False) == -15  # unbooted: SIGTERM by PID
        assert gone(process)
    finally:
        api.close()
        driver.stop(process, 0, force=True)  # a no-op once it has gone
        run_dir.remove()
