"""Killed at any step, nothing leaked, nothing lost: the daemon SIGKILLed right after each
recorded step (`failpoints.STEPS`) with Firecracker VMs, and after the steps where QEMU VMs
differ with QEMU ones, and at random moments of a burst of parallel creates, stops and
removes; restarted, it leaves no VM starting or stopping, no VMM, vsock device, tap, bridge,
nftables chain, run dir, disk or lease that belongs to no VM, and loses no VM.

The matrix reuses one daemon of each kind per module (per xdist worker), in its own namespace
with the plugin installed once: a case arms it through its arming file (`ROOST_FAILPOINT_FILE`),
so it costs one daemon start (the restart after the kill) instead of two. Each case starts from
a daemon just restarted and recovered, with no VM and nothing left on the host (checked), and
leaves it so; a case that fails hands its daemon back closed, and the next gets a new one."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost.engine.failpoints import STEPS
from tests.harness import (
    Daemon,
    links,
    namespace_pids,
    network_namespace,
    process_alive,
    run,
    wait_for,
    write_plugin,
)

pytestmark = pytest.mark.root
FIRECRACKER = [pytest.mark.firecracker, pytest.mark.kvm]
QEMU = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="needs qemu-system-x86_64 (apt-get install --no-install-recommends qemu-system-x86)",
    ),
]
LIVE = ("running", "paused")
VMM_BINARIES = ("firecracker", "qemu-system-x86_64")
VSOCK_DEVICE = "roost.vmm.vsock"  # the module roost's vhost-user-vsock backend runs as
# the daemon's arguments that make its VMs of each kind. A QEMU VM's vsock is roost's own
# device, a second process per VM, even on a host with the kernel's vhost-vsock; TCG on every
# host, which spares each daemon start its KVM probe boot (two starts a case)
# Firecracker's guests never run here and QEMU's `keep` is paused: a graceful stop only waits
# out its timeout, which the steps do not depend on
QUICK_STOPS = ("--stop-timeout", "0.2")
DAEMON_ARGS = {
    "firecracker": QUICK_STOPS,
    "qemu": (*QUICK_STOPS, "--vmm", "qemu", "--qemu-vsock", "user", "--accel", "tcg"),
}
# QEMU gets every kind of step after which its VMs leave the host otherwise than
# Firecracker's, and every operation but resume (each case boots guests: the whole matrix
# would double its time). The steps left out find QEMU as one of these does: create:recorded
# (no process), every launch's tap, rules and allocated (host network work, the same for any
# VMM), every stop's released and stopped (VMM and device ended), restart's and remove's
# stopping (as stop:stopping), start's and restart's other launch steps (as create's or
# restart:booted), resume:resumed (QMP, as pause:paused).
QEMU_STEPS = (
    "create:vmm",  # QEMU starts nothing early: only a new run dir, to roll back
    "create:listening",  # vsock listened for, neither QEMU nor its device started yet
    "create:booted",  # QEMU and its device both run: the rollback ends both
    "start:vmm",  # an old run dir prepared again, no process started
    "stop:stopping",  # recorded stopping, QEMU and its device alive: recovery ends both
    "stop:vmm-ended",  # QEMU ended, its device with it, the VM not yet recorded stopped
    "restart:booted",  # a new QEMU and device, adopted together
    "pause:paused",  # QEMU paused over QMP, adopted as paused
    "remove:vmm-ended",  # the remove's stop done, the VM's record and run dir still there
    "remove:forgotten",  # the record gone, the run dir (pid and exit files) a stray
)
CASES = [
    *(
        pytest.param("firecracker", step, marks=FIRECRACKER, id=f"firecracker-{step}")
        for step in STEPS
    ),
    *(pytest.param("qemu", step, marks=QEMU, id=f"qemu-{step}") for step in QEMU_STEPS),
]


def healthy(daemon: Daemon) -> None:
    wait_for(
        lambda: daemon.http.get("/healthz").json()["status"] == "ok",
        timeout=60,
        what="the daemon to finish recovering",
    )


def install(daemon: Daemon, tmp_path: Path) -> None:
    """A plugin whose VMs hold a disk copy, a lease, a tap and its rules on a managed bridge."""
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(os.urandom(64 * 1024))
    network = {"mode": "bridged", "subnet": "10.78.0.0/24", "auto_assign": True}
    daemon.ok(
        "plugin",
        "install",
        write_plugin(tmp_path, "p", rootfs={"path": str(rootfs)}, network=network),
    )


def died(daemon: Daemon) -> None:
    """The daemon killed itself: reap it."""
    assert daemon.process is not None
    assert daemon.process.wait(30) == -signal.SIGKILL
    daemon.process = None


def restart(daemon: Daemon) -> None:
    daemon.env.clear()
    daemon.start()
    healthy(daemon)


def close(daemon: Daemon) -> None:
    """Kill the VMs (a graceful stop waits for guests that may not answer), then close. A
    daemon that is not answering (a failed start) is closed all the same, so that the test's
    own error is the one reported."""
    if daemon.process is not None and daemon.process.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            for vm in daemon.http.get("/v1/vms").json():
                if vm["status"] in LIVE:
                    daemon.http.post(f"/v1/vms/{vm['name']}/stop", params={"force": "true"})
    daemon.close()


def argv_of(pid: int) -> list[str]:
    """The process's command line; empty once it has gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def live_pid(path: Path) -> int | None:
    """The PID a pid file names, if that process runs."""
    if not path.exists():
        return None
    pid = int(path.read_text())
    return pid if process_alive(pid) else None


def check_invariants(daemon: Daemon, before: set[str]) -> None:
    """Nothing leaked, nothing lost (`before`: the VMs that must still exist)."""
    vms = {vm["name"]: vm for vm in daemon.ok("vm", "list")}
    assert before <= vms.keys(), f"lost {before - vms.keys()}"
    assert not [n for n, vm in vms.items() if vm["status"] in ("starting", "stopping")], vms
    live = {n: vm for n, vm in vms.items() if vm["status"] in LIVE}
    pids = {vm["vmm"]["pid"]: n for n, vm in live.items()}
    for name, vm in live.items():
        assert process_alive(vm["vmm"]["pid"]), f"{name} says {vm['status']}, its VMM is gone"
    argvs = {pid: argv_of(pid) for pid in namespace_pids(daemon.netns)}
    vmms = {p for p, argv in argvs.items() if argv and Path(argv[0]).name in VMM_BINARIES}
    assert vmms <= pids.keys(), f"VMMs of no VM: {vmms - pids.keys()}"
    devices = {p for p, argv in argvs.items() if VSOCK_DEVICE in argv}
    owned: dict[int, str] = {}  # vsock device -> the live VM whose run dir names it
    run_dirs = daemon.run_dir / "vms"
    for path in run_dirs.iterdir() if run_dirs.is_dir() else []:
        assert path.name in vms, f"run dir of no VM: {path}"
        if (pid := live_pid(path / "vmm.pid")) is not None:
            assert pids.get(pid) == path.name, f"{path}: VMM {pid} of no live VM"
        if (pid := live_pid(path / "vsock.pid")) is not None:
            assert path.name in live, f"{path}: vsock device {pid} of no live VM"
            owned[pid] = path.name
    assert devices <= owned.keys(), f"vsock devices of no live VM: {devices - owned.keys()}"
    for name, vm in live.items():
        if vm["vsock"]["backend"] == "user":
            assert name in owned.values(), f"{name} says {vm['status']}, its vsock device is gone"
    disks = daemon.state_dir / "disks"
    for disk in disks.iterdir() if disks.is_dir() else []:
        assert disk.stem in vms, f"disk of no VM: {disk}"
    taps = {vm["network"]["tap"] for vm in live.values() if vm.get("network")}
    found = {name for name, link in links(daemon.netns).items() if name.startswith("rtap")}
    assert found == taps, f"taps {found} for live VMs' {taps}"
    networks = daemon.ok("network", "list")
    leases = {ip for network in networks for ip in network["leases"]}
    ips = {vm["network"]["ip"] for vm in vms.values() if (vm.get("network") or {}).get("ip")}
    assert leases <= ips, f"leases of no VM: {leases - ips}"
    held = {network["bridge"] for network in networks if network["leases"]}
    bridges = {n for n, link in links(daemon.netns).items() if n.startswith("rbr")}
    assert bridges <= held, f"bridges no VM holds: {bridges - held}"
    ruleset = json.loads(run("nft", "-j", "list", "ruleset", netns=daemon.netns).stdout)
    chains = {
        item["chain"]["name"].removeprefix("vm-")
        for item in ruleset["nftables"]
        if "chain" in item and item["chain"]["name"].startswith("vm-")
    }
    assert chains <= taps, f"nftables chains of no live VM: {chains - taps}"


CREATE = ["vm", "create", "t", "--plugin", "p"]
OPERATIONS: dict[str, tuple[list[list[str]], list[str]]] = {
    # the operation: what makes VM `t` ready for it, and the command the failpoint cuts short
    "create": ([], CREATE),
    "start": ([[*CREATE, "--no-start"]], ["vm", "start", "t"]),
    "stop": ([CREATE], ["vm", "stop", "t"]),
    "restart": ([CREATE], ["vm", "restart", "t"]),
    "pause": ([CREATE], ["vm", "pause", "t"]),
    "resume": ([CREATE, ["vm", "pause", "t"]], ["vm", "resume", "t"]),
    "remove": ([CREATE], ["vm", "rm", "t"]),
}


def vms_before(daemon: Daemon, operation: str) -> None:
    """With the failpoint armed, by operations other than the one it is in: `keep` (paused, so
    its guest stays put, unless the operation is pause), `idle` (never started), and `t`."""
    if operation == "create":
        daemon.ok("vm", "create", "keep", "--plugin", "p", "--no-start")
        daemon.ok("vm", "start", "keep")
    else:
        daemon.ok("vm", "create", "keep", "--plugin", "p")
    if operation != "pause":
        daemon.ok("vm", "pause", "keep")
    daemon.ok("vm", "create", "idle", "--plugin", "p", "--no-start")
    for argv in OPERATIONS[operation][0]:
        daemon.ok(*argv)


class ReusedDaemons:
    """The matrix's daemons, one of each kind, each in a namespace of its own and armed through
    its arming file; made when a case first needs one."""

    def __init__(self) -> None:
        self.daemons: dict[str, tuple[Daemon, contextlib.ExitStack]] = {}

    def ready(self, vmm: str) -> Daemon:
        """The daemon of this kind, running and disarmed, with plugin `p` and no VM, nothing of
        a previous case left on its host."""
        if vmm not in self.daemons:
            stack = contextlib.ExitStack()
            netns = stack.enter_context(network_namespace())
            daemon = Daemon(netns, *DAEMON_ARGS[vmm])
            stack.callback(close, daemon)
            self.daemons[vmm] = (daemon, stack)
            daemon.env["ROOST_FAILPOINT_FILE"] = str(arming_file(daemon))
            daemon.start()
            plugin_dir = daemon.dir / "plugin"
            plugin_dir.mkdir()
            install(daemon, plugin_dir)
        daemon = self.daemons[vmm][0]
        assert daemon.ok("vm", "list") == [], "the previous case left VMs"
        check_invariants(daemon, set())
        return daemon

    def discard(self, vmm: str) -> None:
        """Close the daemon of this kind and delete its namespace (after a failed case)."""
        if vmm in self.daemons:
            self.daemons.pop(vmm)[1].close()

    def close(self) -> None:
        for vmm in list(self.daemons):
            self.discard(vmm)


@pytest.fixture(scope="module")
def reused() -> Iterator[ReusedDaemons]:
    daemons = ReusedDaemons()
    try:
        yield daemons
    finally:
        daemons.close()


def arming_file(daemon: Daemon) -> Path:
    return daemon.dir / "failpoint"


def remove_all(daemon: Daemon) -> None:
    """Remove every VM, killing the VMMs of live ones (the next case starts with none)."""
    for vm in daemon.ok("vm", "list"):
        if vm["status"] in LIVE:
            daemon.ok("vm", "stop", vm["name"], "--force")
        removed = daemon.cli("vm", "rm", vm["name"], "--json")
        assert removed.exit_code == 0, f"rm {vm['name']}: {removed.stdout}{removed.stderr}"


@pytest.mark.parametrize(("vmm", "step"), CASES)
def test_a_daemon_killed_at_a_step_leaks_and_loses_nothing(
    reused: ReusedDaemons, vmm: str, step: str
) -> None:
    operation = step.partition(":")[0]
    try:
        daemon = reused.ready(vmm)
        arming_file(daemon).write_text(step)
        vms_before(daemon, operation)
        before = {vm["name"] for vm in daemon.ok("vm", "list")}
        cut = daemon.cli(*OPERATIONS[operation][1], "--json")
        assert cut.exit_code == 5, f"{step} was not reached: {cut.stdout}{cut.stderr}"
        died(daemon)
        arming_file(daemon).unlink()
        daemon.start()
        healthy(daemon)
        check_invariants(daemon, before - {"t"} if operation == "remove" else before)
        remove_all(daemon)
    except BaseException:
        reused.discard(vmm)
        raise


@pytest.mark.firecracker
@pytest.mark.kvm
def test_kills_at_random_moments_of_a_burst_leak_and_lose_nothing(
    netns: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("ROOST_TEST_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    print(f"burst seed {seed} (ROOST_TEST_SEED={seed} repeats it)")
    daemon = Daemon(netns, *QUICK_STOPS)
    try:
        daemon.start()
        install(daemon, tmp_path)
        daemon.ok("vm", "create", "keep", "--plugin", "p")
        daemon.ok("vm", "pause", "keep")
        names = [f"b{i}" for i in range(6)]
        for round_ in range(3):
            vms = {vm["name"]: vm["status"] for vm in daemon.ok("vm", "list")}
            requests = []
            for name in names:
                if name not in vms:
                    requests.append(("POST", "/v1/vms", {"name": name, "plugin": "p"}))
                elif vms[name] in LIVE and rng.random() < 0.5:
                    requests.append(("POST", f"/v1/vms/{name}/stop", None))
                else:
                    requests.append(("DELETE", f"/v1/vms/{name}", None))
            delay = rng.uniform(0.05, 1.5)
            print(f"round {round_}: {[r[:2] for r in requests]}, SIGKILL after {delay:.2f}s")
            threads = [
                threading.Thread(target=_send, args=(daemon, *request)) for request in requests
            ]
            for thread in threads:
                thread.start()
            time.sleep(delay)
            assert daemon.process is not None
            daemon.process.kill()
            daemon.process.wait()
            daemon.process = None
            for thread in threads:
                thread.join(60)
            restart(daemon)
            removed = {path.rsplit("/", 1)[1] for method, path, _ in requests if method == "DELETE"}
            check_invariants(daemon, vms.keys() - removed)
    finally:
        close(daemon)


def _send(daemon: Daemon, method: str, path: str, body: dict[str, Any] | None) -> None:
    """One request of the burst; the daemon may die under it."""
    with (
        httpx.Client(
            transport=httpx.HTTPTransport(uds=str(daemon.socket)),
            base_url="http://roost",
            timeout=60,
        ) as client,
        contextlib.suppress(httpx.TransportError),
    ):
        client.request(method, path, json=body)
