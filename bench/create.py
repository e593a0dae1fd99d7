"""Create benchmark: 20 bridged Firecracker VMs through the roost API, against 20 identical VMs
started by a bare script that does only what Firecracker itself needs. With `--parallel N`, N
creates issued together through the API against the bare script starting N one after another.

Both sides run in a network namespace of their own (`roost-t-<hex>`), with real taps on a real
bridge and the real Firecracker binary. On this machine a started guest's vCPU spins (nested
virtualization; the guest never really runs), so every VM is paused right after it starts, on
both sides, and the pause is part of what is timed. The sides alternate over several rounds
(bare first in even rounds, roost first in odd ones) and the best round of each is compared.
Prints one JSON line of figures on stdout; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import mmap
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

import httpx
from pyroute2 import IPRoute

from bench._common import (
    UnixHTTPConnection,
    cleanup,
    expect,
    log,
    main,
    namespace,
    netns_path,
)
from tests.harness import FIRECRACKER, INITRAMFS, KERNEL, Daemon, missing, short_tmp, write_plugin

VMS = 20
VCPUS, MEMORY_MIB = 1, 256
BOOT_ARGS = "console=ttyS0 reboot=k panic=1"
ROOST_SUBNET = ipaddress.IPv4Network("10.210.0.0/24")
BARE_SUBNET = ipaddress.IPv4Network("10.211.0.0/24")
BARE_BRIDGE = "brbench"
PLUGIN = "bench"
TARGET_RATIO = 0.9
TARGET_PARALLEL_RATIO = 1.2
SOCKET_TIMEOUT = 5.0
CLONE_NEWNET = 0x40000000
MAP_POPULATE = 0x8000  # mmap.MAP_POPULATE from Python 3.10, spelled out for the type checker
T = TypeVar("T")


@dataclass
class Round:
    """One side's round of `vms` VMs: its wall time, the CPU time of the orchestrator and of
    the round's VMMs (all their threads: boot, and the guests' spinning until paused), each
    VM's time per phase (seconds), and how long removing them took (roost's side)."""

    vms: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    vmm_cpu_seconds: float = 0.0
    phases: dict[str, list[float]] = field(default_factory=dict)
    remove_seconds: float | None = None

    def add(self, phase: str, seconds: float) -> None:
        self.phases.setdefault(phase, []).append(seconds)

    @property
    def rate(self) -> float:
        return self.vms / self.seconds


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, taps)"
    gaps = missing([FIRECRACKER, KERNEL, INITRAMFS])
    if gaps:
        return f"missing {', '.join(gaps)} (make setup builds them)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no usable /dev/kvm"
    return None


def ip_boot_arg(ip: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network, host: str) -> str:
    """The kernel's static `ip=` argument, as roost gives a bridged guest."""
    gateway = subnet.network_address + 1
    return f"ip={ip}::{gateway}:{subnet.netmask}:{host}:eth0:off"


# ---- the bare side -------------------------------------------------------------------------


class NamespaceThread:
    """One thread that has entered a namespace (setns moves only the calling thread): the taps
    it creates and the processes it starts live there, while the benchmark stays put."""

    def __init__(self, netns: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, initializer=self._enter, initargs=(netns,))

    @staticmethod
    def _enter(netns: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
        finally:
            os.close(fd)

    def run(self, work: Callable[[], T]) -> T:
        return self._pool.submit(work).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class FirecrackerAPI(UnixHTTPConnection):
    """Firecracker's API socket, kept alive for all of one VM's calls."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, timeout=10)

    def call(self, method: str, path: str, body: dict[str, Any]) -> None:
        self.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
        response = self.getresponse()
        text = response.read()
        if response.status >= 300:
            raise RuntimeError(f"Firecracker refused {method} {path}: {text.decode()}")


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class Bare:
    """Firecracker VMs started by hand in namespace `netns`: a tap on a bridge, the process,
    the API calls Firecracker needs, and a pause. Every process is ours (killed by PID and
    reaped); everything else is in `base` or the namespace."""

    def __init__(self, netns: str, base: Path) -> None:
        self.base = base
        self.thread = NamespaceThread(netns)
        self.ipr: IPRoute = self.thread.run(IPRoute)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.started: list[int] = []  # every PID, for the final check
        self.stopping = False

    def close(self) -> None:
        """Let a round in flight stop at its next VM (an interrupt only reaches the main
        thread), then remove everything."""
        self.stopping = True
        self.thread.run(lambda: None)
        self.remove_all()
        self.thread.run(self.ipr.close)
        self.thread.close()

    def round(self, number: int, vms: int) -> Round:
        """Bridge, then `vms` VMs one after another; all on the namespace's thread."""
        cpu = time.process_time()
        result = self.thread.run(lambda: self._round(number, vms))
        result.cpu_seconds = time.process_time() - cpu
        result.vmm_cpu_seconds = sum(_cpu_seconds(process.pid) for process in self.processes)
        return result

    def _round(self, number: int, vms: int) -> Round:
        result = Round(vms)
        started = time.perf_counter()
        self.ipr.link("add", ifname=BARE_BRIDGE, kind="bridge", br_stp_state=0)
        [bridge] = self.ipr.link_lookup(ifname=BARE_BRIDGE)
        gateway = BARE_SUBNET.network_address + 1
        self.ipr.addr("add", index=bridge, address=str(gateway), prefixlen=BARE_SUBNET.prefixlen)
        self.ipr.link("set", index=bridge, state="up")
        result.add("bridge", time.perf_counter() - started)
        for index in range(vms):
            if self.stopping:
                break
            self._start_vm(f"b{number}-{index}", index, bridge, result)
        result.seconds = time.perf_counter() - started
        return result

    def _start_vm(self, name: str, index: int, bridge: int, result: Round) -> None:
        mark = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            result.add(phase, now - mark)
            mark = now

        run_dir = self.base / name
        run_dir.mkdir()
        tap = f"btap{index}"
        flags = {"no_pi": True, "vnet_hdr": True, "one_queue": False, "multi_queue": False}
        self.ipr.link("add", ifname=tap, kind="tuntap", mode="tap", ifr=flags)
        [tap_index] = self.ipr.link_lookup(ifname=tap)
        self.ipr.link("set", index=tap_index, master=bridge, state="up")
        lap("tap")

        api_socket = run_dir / "api.sock"
        with (run_dir / "console.log").open("ab") as sink:
            process = subprocess.Popen(
                [str(FIRECRACKER), "--api-sock", str(api_socket), "--id", name],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                start_new_session=True,  # a Ctrl-C reaches only us; we kill it ourselves
                close_fds=True,
            )
        self.processes.append(process)
        self.started.append(process.pid)
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while not _accepts(api_socket):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Firecracker did not open {api_socket}; see its console.log")
            time.sleep(0.0005)
        lap("exec_to_socket")

        ip = BARE_SUBNET.network_address + 2 + index
        mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
        api = FirecrackerAPI(api_socket)
        try:
            api.call("PUT", "/machine-config", {"vcpu_count": VCPUS, "mem_size_mib": MEMORY_MIB})
            api.call(
                "PUT",
                "/boot-source",
                {
                    "kernel_image_path": str(KERNEL),
                    "initrd_path": str(INITRAMFS),
                    "boot_args": f"{BOOT_ARGS} {ip_boot_arg(ip, BARE_SUBNET, name)}",
                },
            )
            api.call(
                "PUT",
                "/network-interfaces/eth0",
                {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac},
            )
            api.call("PUT", "/vsock", {"guest_cid": 3 + index, "uds_path": str(run_dir / "v.sock")})
            lap("configure")
            api.call("PUT", "/actions", {"action_type": "InstanceStart"})
            lap("instance_start")
            api.call("PATCH", "/vm", {"state": "Paused"})
            lap("pause")
        finally:
            api.close()

    def remove_all(self) -> None:
        """Kill and reap every Firecracker we started, then drop the taps, bridge and dirs."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
            process.wait()
        self.processes.clear()

        def unlink() -> None:
            for link in self.ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                if name.startswith("btap") or name == BARE_BRIDGE:
                    self.ipr.link("del", index=link["index"])

        self.thread.run(unlink)
        for child in self.base.iterdir():
            shutil.rmtree(child, ignore_errors=True)


# ---- the roost side ------------------------------------------------------------------------


def _unless_busy(http: httpx.Client, method: str, path: str, timeout: float = 15) -> httpx.Response:
    """The request, again while the VM is busy (an interrupted call leaves the daemon finishing
    it, and clean-up must not give up on that VM)."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.request(method, path)
        busy = response.status_code == 409 and '"vm_busy"' in response.text
        if not busy or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


class Roost:
    """VMs created through a real daemon's API, in namespace `netns`."""

    def __init__(self, netns: str) -> None:
        self.daemon = Daemon(netns)
        self.vms: dict[str, int] = {}  # name -> VMM PID, while the VM exists
        self.started: list[int] = []  # every VMM PID, for the final check

    def start(self, plugin_dir: Path) -> None:
        """Start the daemon and install the plugin (bridged, auto-assigned addresses)."""
        self.daemon.start()
        manifest = write_plugin(
            plugin_dir,
            PLUGIN,
            resources={"vcpus": VCPUS, "memory_mib": MEMORY_MIB},
            network={
                "mode": "bridged",
                "subnet": str(ROOST_SUBNET),
                "gateway": str(ROOST_SUBNET.network_address + 1),
                "auto_assign": True,
            },
        )
        body = manifest.read_bytes()
        headers = {"content-type": "application/json"}
        expect(self.daemon.http.post("/v1/plugins", content=body, headers=headers), 201)

    def round(self, number: int, vms: int, *, parallel: bool = False) -> Round:
        """`vms` times (create with `start: true`, pause): one after another, or each on a thread
        of its own, all released at once (`parallel`); then, timed apart, their removal (in
        parallel too with `parallel`)."""
        result = Round(vms)
        assert self.daemon.process is not None
        pid = self.daemon.process.pid
        names = [f"r{number}-{index}" for index in range(vms)]
        cpu = _cpu_seconds(pid)
        if parallel:
            started = time.perf_counter()  # replaced by the moment all are released
            with ThreadPoolExecutor(max_workers=vms) as pool:
                barrier = threading.Barrier(vms + 1)
                futures = [pool.submit(self._create, name, result, barrier) for name in names]
                barrier.wait()
                started = time.perf_counter()
                for future in futures:
                    future.result()
        else:
            started = time.perf_counter()
            for name in names:
                self._create(name, result)
        result.seconds = time.perf_counter() - started
        result.cpu_seconds = _cpu_seconds(pid) - cpu
        result.vmm_cpu_seconds = sum(_cpu_seconds(self.vms[name]) for name in names)
        began = time.perf_counter()
        self.remove_all(parallel=parallel)
        result.remove_seconds = time.perf_counter() - began
        return result

    def _create(self, name: str, result: Round, barrier: threading.Barrier | None = None) -> None:
        http = self.daemon.http
        body = {"name": name, "plugin": PLUGIN, "start": True}
        if barrier is not None:
            barrier.wait()
        before = time.perf_counter()
        vm = expect(http.post("/v1/vms", json=body), 201)
        self.vms[name] = vm["vmm"]["pid"]
        self.started.append(vm["vmm"]["pid"])
        middle = time.perf_counter()
        expect(http.post(f"/v1/vms/{name}/pause"), 200)
        result.add("create", middle - before)
        result.add("pause", time.perf_counter() - middle)

    def remove_all(self, *, parallel: bool = False) -> None:
        """Through the API: a forced stop (a paused guest cannot answer Ctrl-Alt-Del, so the
        graceful path would only wait out its timeout), then DELETE; one VM after another, or
        each on a thread of its own (`parallel`)."""
        names = list(self.vms)
        if not parallel:
            for name in names:
                self._remove(name)
            return
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            for future in [pool.submit(self._remove, name) for name in names]:
                future.result()

    def _remove(self, name: str) -> None:
        http = self.daemon.http
        expect(_unless_busy(http, "POST", f"/v1/vms/{name}/stop?force=true"), 200)
        expect(_unless_busy(http, "DELETE", f"/v1/vms/{name}"), 204)
        del self.vms[name]

    def close(self) -> None:
        """Remove the VMs, stop the daemon, then make sure (by PID) no VMM of ours survived."""
        try:
            self.remove_all()
        except (httpx.HTTPError, RuntimeError) as error:
            log(f"removing roost's VMs through the API failed ({error}); killing them by PID")
        run_dir = f"{self.daemon.run_dir}/"
        self.daemon.close()
        for pid in self.started:
            if is_ours(pid, run_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid)


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads, not children) of process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def is_ours(pid: int, marker: str) -> bool:
    """Whether `pid` is alive and still one of our VMMs (its command line names our dir), not
    an unrelated process that reused the PID."""
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 10) -> None:
    """Until `pid` has been reaped (by its supervisor, or init: it is not our child)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


# ---- the benchmark -------------------------------------------------------------------------


SETTLE_SECONDS = 2.0
WARM_MIB = 1536


def warm_memory(mib: int = WARM_MIB) -> None:
    """Fault in `mib` of fresh memory and free it again, just before a round. This machine's
    memory balloon reports free pages to its hypervisor about 2 s after they are freed, and a
    page touched again after that costs a hypervisor fault: once a round has used up the pages
    freed recently, each further VM's InstanceStart took ~120 ms more, at a point that fell on
    either side at random. Done before every round of both sides alike."""
    mapping = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE)
    mapping.close()


def _summary(rounds: list[Round]) -> dict[str, Any]:
    """The best and the median round, and each phase's median over every round (the bridge is
    set up once a round, everything else once a VM); for roost, the best removal rate."""
    phases: dict[str, list[float]] = {}
    for one in rounds:
        for phase, values in one.phases.items():
            phases.setdefault(phase, []).extend(values)
    vms = rounds[0].vms
    summary = {
        "vms_per_second": round(max(r.rate for r in rounds), 3),
        "median_vms_per_second": round(statistics.median(r.rate for r in rounds), 3),
        "round_seconds": [round(r.seconds, 3) for r in rounds],
        "cpu_ms_per_vm": round(statistics.median(r.cpu_seconds for r in rounds) / vms * 1000, 1),
        "vmm_cpu_ms_per_vm": round(
            statistics.median(r.vmm_cpu_seconds for r in rounds) / vms * 1000, 1
        ),
        "phase_median_ms": {
            phase: round(statistics.median(values) * 1000, 2) for phase, values in phases.items()
        },
    }
    removals = [r.remove_seconds for r in rounds if r.remove_seconds is not None]
    if removals:
        summary["remove_vms_per_second"] = round(vms / min(removals), 3)
        summary["remove_round_seconds"] = [round(seconds, 3) for seconds in removals]
    return summary


def leftovers(pids: dict[int, str], namespaces: list[str]) -> list[str]:
    """What of ours still exists after clean-up (should be nothing): VMMs (by PID and the dir
    their command line names) and namespaces."""
    alive = [f"pid {pid}" for pid, marker in pids.items() if is_ours(pid, marker)]
    return alive + [f"netns {name}" for name in namespaces if netns_path(name).exists()]


def run(rounds: int, parallel: int | None = None) -> dict[str, Any]:
    """Both sides over `rounds` rounds: VMS creates one after another on each, or with
    `parallel`, N creates issued together through the API against N by the bare script."""
    vms = VMS if parallel is None else parallel
    target = TARGET_RATIO if parallel is None else TARGET_PARALLEL_RATIO
    reason = skip_reason()
    if reason is not None:
        return {"benchmark": "create", "skipped": reason}
    results: dict[str, list[Round]] = {"bare": [], "roost": []}
    with cleanup() as stack:
        namespaces = [namespace(stack), namespace(stack)]
        roost_ns, bare_ns = namespaces
        base = short_tmp()
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        bare = Bare(bare_ns, base)
        stack.callback(bare.close)
        roost = Roost(roost_ns)
        stack.callback(roost.close)
        roost.start(base)
        for number in range(rounds):
            order = ("bare", "roost") if number % 2 == 0 else ("roost", "bare")
            for side in order:
                warm_memory()
                if side == "bare":
                    outcome = bare.round(number, vms)
                    bare.remove_all()
                else:  # removes its VMs itself, timed apart
                    outcome = roost.round(number, vms, parallel=parallel is not None)
                results[side].append(outcome)
                log(f"round {number + 1}/{rounds} {side}: {vms} VMs in {outcome.seconds:.3f}s")
                # the kernel tears the killed VMs down in the background (kworkers); let it
                # finish so it does not slow down whichever side comes next
                time.sleep(SETTLE_SECONDS)
    left = leftovers(
        {pid: f"{base}/" for pid in bare.started}
        | {pid: f"{roost.daemon.run_dir}/" for pid in roost.started},
        namespaces,
    )
    bare_summary, roost_summary = _summary(results["bare"]), _summary(results["roost"])
    ratio = roost_summary["vms_per_second"] / bare_summary["vms_per_second"]
    median_ratio = roost_summary["median_vms_per_second"] / bare_summary["median_vms_per_second"]
    return {
        "benchmark": "create",
        "vms": vms,
        "parallel": parallel,
        "rounds": rounds,
        "roost": roost_summary,
        "bare": bare_summary,
        "roost_vms_per_second": roost_summary["vms_per_second"],
        "bare_vms_per_second": bare_summary["vms_per_second"],
        "ratio": round(ratio, 3),
        "median_ratio": round(median_ratio, 3),
        "target_ratio": target,
        "bare_netns": "setns in one worker thread, entered before timing; Firecracker is "
        "started from that thread, so no `ip netns exec` per VM",
        "warm_mib_before_each_round": WARM_MIB,
        "leftovers": left,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "meets_targets": ratio >= target,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds of both sides, alternating which goes first; the best of each is compared",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="N creates issued together through the API, against the bare script starting N "
        "one after another (target ratio 1.2 instead of 0.9)",
    )
    options = parser.parse_args(argv)
    if options.parallel is not None and options.parallel < 1:
        parser.error("--parallel needs N >= 1")
    return options


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    sys.exit(main(lambda: run(max(1, options.rounds), options.parallel)))
