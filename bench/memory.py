"""Memory benchmark: what N running (paused) Firecracker VMs cost the host, through a real
daemon in a namespace of its own (`roost-t-<hex>`), bridged, with the real Firecracker binary.

One VM is created first, so the supervisor runs and the create path's code is loaded; then the
daemon's and the supervisor's RSS are read, N more VMs are created (`start: true`, paused once
started, as in bench/create.py), and both are read again. Each VMM's RSS, and its PSS and
private memory from /proc/<pid>/smaps_rollup (guest pages it never touched cost nothing, its
binary's pages are shared by all), are read last; the host's /proc/meminfo before and after
also counts what the kernel holds for each VM (KVM, page tables, the tap), but also whatever
else the host did meanwhile (MemAvailable falls, so its figure per VM is negative). Prints one
JSON line; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

from bench._common import cleanup, expect, log, main, namespace
from bench.create import MEMORY_MIB, PLUGIN, VCPUS, Roost, leftovers, skip_reason, warm_memory
from tests.harness import short_tmp

VMS = 20
SETTLE_SECONDS = 1.0
# what the kernel holds for a VM besides its VMM's RSS: KVM's page tables (SecPageTables), the
# tap's and KVM's objects (Slab), threads' stacks
HOST_FIELDS = (
    "MemAvailable",
    "AnonPages",
    "Shmem",
    "Slab",
    "PageTables",
    "SecPageTables",
    "KernelStack",
)


def memory_fields(text: str) -> dict[str, int]:
    """The `Name:  N kB` lines of /proc/<pid>/status or smaps_rollup, in KiB by name (other
    lines, such as the rollup's address range or a status line without a unit, are left out)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        value = rest.split()
        if len(value) == 2 and value[1] == "kB" and value[0].isdigit():
            fields[name.strip()] = int(value[0])
    return fields


def rss_kib(pid: int) -> int:
    """The resident set (VmRSS) of process `pid`, in KiB."""
    return memory_fields(Path(f"/proc/{pid}/status").read_text())["VmRSS"]


def vmm_memory_kib(pid: int) -> dict[str, int]:
    """One VMM's RSS, PSS and private (clean + dirty) memory in KiB, from smaps_rollup; RSS
    alone (from status) where the rollup cannot be read."""
    try:
        rollup = memory_fields(Path(f"/proc/{pid}/smaps_rollup").read_text())
    except OSError:
        return {"rss": rss_kib(pid)}
    private = rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    return {"rss": rollup["Rss"], "pss": rollup["Pss"], "private": private}


def per_vm_kib(before_kib: int, after_kib: int, vms: int) -> float:
    """How much a process grew (KiB) for each of `vms` VMs."""
    return round((after_kib - before_kib) / vms, 1)


def spread_mib(samples: Iterable[int]) -> dict[str, float]:
    """The median, smallest and largest of KiB samples, and their sum, in MiB."""
    values = list(samples)
    return {
        "median": round(statistics.median(values) / 1024, 2),
        "min": round(min(values) / 1024, 2),
        "max": round(max(values) / 1024, 2),
        "sum": round(sum(values) / 1024, 1),
    }


def supervisor_pids(daemon_pid: int) -> list[int]:
    """The daemon's children that run roost's VMM supervisor (one per namespace worker)."""
    found = []
    for task in Path(f"/proc/{daemon_pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                with contextlib.suppress(OSError):
                    if b"supervisor.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                        found.append(child)
    return sorted(set(found))


def create_paused(roost: Roost, name: str) -> int:
    """One VM created with `start: true` and paused (its guest would spin on this machine);
    its VMM's PID, kept where Roost.close finds it."""
    http = roost.daemon.http
    vm = expect(http.post("/v1/vms", json={"name": name, "plugin": PLUGIN, "start": True}), 201)
    pid = int(vm["vmm"]["pid"])
    roost.vms[name] = pid
    roost.started.append(pid)
    expect(http.post(f"/v1/vms/{name}/pause"), 200)
    return pid


def processes_rss(daemon_pid: int) -> dict[str, int]:
    """The daemon's RSS and its supervisors' (summed), and the host's MemAvailable, in KiB."""
    supervisors = supervisor_pids(daemon_pid)
    return {
        "daemon_rss_kib": rss_kib(daemon_pid),
        "supervisor_rss_kib": sum(rss_kib(pid) for pid in supervisors),
        "supervisors": len(supervisors),
    }


def host_memory_kib() -> dict[str, int]:
    """The host's /proc/meminfo figures that a VM's start moves, in KiB."""
    fields = memory_fields(Path("/proc/meminfo").read_text())
    return {name: fields[name] for name in HOST_FIELDS if name in fields}


def run(vms: int) -> dict[str, Any]:
    reason = skip_reason()
    if reason is not None:
        return {"benchmark": "memory", "skipped": reason}
    with cleanup() as stack:
        netns = namespace(stack)
        base = short_tmp()
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        roost = Roost(netns)
        stack.callback(roost.close)
        roost.start(base)
        assert roost.daemon.process is not None
        daemon_pid = roost.daemon.process.pid
        idle = rss_kib(daemon_pid)
        warm_memory()
        first = create_paused(roost, "m-first")
        time.sleep(SETTLE_SECONDS)
        before, host_before = processes_rss(daemon_pid), host_memory_kib()
        pids = [first]
        for index in range(vms):
            pids.append(create_paused(roost, f"m{index}"))
        log(f"{vms + 1} VMs running, paused")
        time.sleep(SETTLE_SECONDS)
        after, host_after = processes_rss(daemon_pid), host_memory_kib()
        vmms = [vmm_memory_kib(pid) for pid in pids]
        load = round(os.getloadavg()[0], 2)
    left = leftovers({pid: f"{roost.daemon.run_dir}/" for pid in roost.started}, [netns])
    vmm = {key: spread_mib(one[key] for one in vmms) for key in vmms[0]}
    return {
        "benchmark": "memory",
        "vms": vms,
        "guest_memory_mib": MEMORY_MIB,
        "guest_vcpus": VCPUS,
        "daemon_idle_rss_kib": idle,
        "before": before,
        "after": after,
        "daemon_kib_per_vm": per_vm_kib(before["daemon_rss_kib"], after["daemon_rss_kib"], vms),
        "supervisor_kib_per_vm": per_vm_kib(
            before["supervisor_rss_kib"], after["supervisor_rss_kib"], vms
        ),
        "host_kib_per_vm": {
            name: per_vm_kib(host_before[name], host_after[name], vms) for name in host_after
        },
        "vmm_mib": vmm,
        "leftovers": left,
        "load_average_1m": load,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--vms", type=int, default=VMS, help="VMs created after the first (default %(default)s)"
    )
    options = parser.parse_args(argv)
    if options.vms < 1:
        parser.error("--vms needs N >= 1")
    return options


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    sys.exit(main(lambda: run(options.vms)))
