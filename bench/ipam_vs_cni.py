"""roost's IPAM against CNI's `host-local` IPAM plugin: the same 1,000 addresses from the same
/16, one durable allocation per call on both sides.

host-local is run the way a container runtime runs it (an exec per ADD, the network config on
stdin, the CNI_* variables in the environment), so it pays a process start per allocation:
that is the price of CNI's interface, and exactly what this compares against. Prints one JSON
line of figures on stdout; see bench/README.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

from bench._common import cleanup, log, main, namespace, netns_path, percentile
from bench.ipam import RoostIPAM

HOST_LOCAL = Path("/usr/lib/cni/host-local")
CNI_PATH = "/usr/lib/cni"
SUBNET = ipaddress.IPv4Network("10.201.0.0/16")
GATEWAY = SUBNET.network_address + 1
COUNT = 1000
TARGET_SPEEDUP = 5.0

Allocate = Callable[[int], ipaddress.IPv4Address]


class HostLocal:
    """CNI's host-local IPAM with its state in `data_dir` (never /var/lib/cni)."""

    def __init__(self, data_dir: Path, netns: Path) -> None:
        self.netns = netns
        config = {
            "cniVersion": "1.0.0",
            "name": "bench",
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": str(SUBNET), "gateway": str(GATEWAY)}]],
                "dataDir": str(data_dir),
            },
        }
        self.config = json.dumps(config).encode()

    def add(self, index: int) -> ipaddress.IPv4Address:
        """One CNI ADD for container `bench-<index>`; the address from its result."""
        env = {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": f"bench-{index}",
            "CNI_NETNS": str(self.netns),
            "CNI_IFNAME": "eth0",
            "CNI_PATH": CNI_PATH,
        }
        result = subprocess.run(
            [str(HOST_LOCAL)], input=self.config, env=env, capture_output=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"host-local ADD failed ({result.returncode}): {result.stdout!r} {result.stderr!r}"
            )
        [first, *_] = json.loads(result.stdout)["ips"]
        return ipaddress.IPv4Interface(first["address"]).ip


def timed(allocate: Allocate, count: int) -> tuple[float, list[float], list[ipaddress.IPv4Address]]:
    """Wall time of `count` sequential allocations, each one's time, and the addresses."""
    seconds, addresses = [], []
    started = time.perf_counter()
    for index in range(count):
        before = time.perf_counter()
        addresses.append(allocate(index))
        seconds.append(time.perf_counter() - before)
    return time.perf_counter() - started, seconds, addresses


def roost_round(count: int) -> tuple[float, list[float], list[ipaddress.IPv4Address]]:
    with cleanup() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="roost-bench-")))
        ipam = RoostIPAM(directory, SUBNET)
        stack.callback(ipam.close)
        vm_ids = ipam.add_vms(count)
        return timed(lambda index: ipam.allocate(vm_ids[index]), count)


def cni_round(count: int, netns: Path) -> tuple[float, list[float], list[ipaddress.IPv4Address]]:
    with tempfile.TemporaryDirectory(prefix="roost-bench-cni-") as data_dir:
        return timed(HostLocal(Path(data_dir), netns).add, count)


def run(rounds: int) -> dict[str, Any]:
    if not HOST_LOCAL.exists():
        return {
            "benchmark": "ipam_vs_cni",
            "skipped": f"{HOST_LOCAL} is missing (apt-get install containernetworking-plugins)",
        }
    results: dict[str, list[tuple[float, list[float], list[ipaddress.IPv4Address]]]] = {
        "roost": [],
        "cni": [],
    }
    with cleanup() as stack:
        # host-local only manages addresses, but give it a namespace of our own anyway.
        netns = netns_path(namespace(stack))
        for number in range(rounds):
            # roost first in even rounds, host-local first in odd ones, so drift in background
            # load does not favour either side.
            order = ["roost", "cni"] if number % 2 == 0 else ["cni", "roost"]
            for side in order:
                outcome = roost_round(COUNT) if side == "roost" else cni_round(COUNT, netns)
                results[side].append(outcome)
                log(f"round {number + 1}/{rounds} {side}: {outcome[0]:.3f}s for {COUNT}")

    best = {side: min(outcomes, key=lambda o: o[0]) for side, outcomes in results.items()}
    roost_seconds, roost_each, roost_addresses = best["roost"]
    cni_seconds, cni_each, cni_addresses = best["cni"]
    distinct = all(
        len(set(addresses)) == COUNT
        for outcomes in results.values()
        for _, _, addresses in outcomes
    )
    speedup = cni_seconds / roost_seconds
    return {
        "benchmark": "ipam_vs_cni",
        "subnet": str(SUBNET),
        "allocations": COUNT,
        "rounds": rounds,
        "roost_seconds": round(roost_seconds, 4),
        "roost_mean_ms": round(roost_seconds / COUNT * 1000, 3),
        "roost_p50_ms": round(percentile(roost_each, 50) * 1000, 3),
        "cni_seconds": round(cni_seconds, 4),
        "cni_mean_ms": round(cni_seconds / COUNT * 1000, 3),
        "cni_p50_ms": round(percentile(cni_each, 50) * 1000, 3),
        "roost_round_seconds": [round(o[0], 4) for o in results["roost"]],
        "cni_round_seconds": [round(o[0], 4) for o in results["cni"]],
        "speedup": round(speedup, 2),
        "distinct": distinct,
        "same_addresses": set(roost_addresses) == set(cni_addresses),
        "target_speedup": TARGET_SPEEDUP,
        "meets_targets": speedup >= TARGET_SPEEDUP and distinct,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of both sides, alternating which goes first; the best of each is reported",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    sys.exit(main(lambda: run(max(1, options.rounds))))
