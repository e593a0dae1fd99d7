"""Overlay benchmark: how long one `Overlay.sync()` takes on real netlink, in a namespace of
its own, for a cluster network with --macs remote MACs (100 by default) behind --peers VTEPs.

Rounds of: the first sync (the device made, every flood and MAC entry written), a sync with
nothing to do (the steady state, every second per host), one after one MAC changed, one after
every MAC moved to another VTEP, one after every MAC left. Prints one JSON line; see
bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

from bench._common import cleanup, latency_ms, log, main, namespace
from roost.engine.overlay import Overlay, Segment
from roost.host.netns import NetnsWorker
from roost.host.vxlan import Vxlans

VNI, BRIDGE, MTU, VTEP = 4242, "br-bench", 1450, "192.168.78.1"


def ip(netns: str, *argv: str) -> None:
    subprocess.run(["ip", "-n", netns, *argv], check=True, capture_output=True)


def benchmark(macs: int, peers: int, rounds: int) -> dict[str, Any]:
    with cleanup() as stack:
        netns = namespace(stack)
        ip(netns, "link", "add", "fab0", "type", "veth", "peer", "fab1")
        ip(netns, "addr", "add", f"{VTEP}/24", "dev", "fab0")
        ip(netns, "link", "set", "fab0", "up")
        ip(netns, "link", "add", BRIDGE, "type", "bridge")
        ip(netns, "link", "set", BRIDGE, "up")
        worker = NetnsWorker(netns)
        stack.callback(worker.close)
        vxlans = Vxlans(worker)
        stack.callback(vxlans.close)
        vteps = [f"192.168.78.{10 + i}" for i in range(peers)]
        addresses = [f"02:98:00:00:{i >> 8:02x}:{i & 0xFF:02x}" for i in range(macs)]
        wanted: list[Segment] = []
        overlay = Overlay(vxlans, VTEP, lambda: wanted)

        def placed(shift: int) -> Segment:
            spread = {mac: vteps[(i + shift) % peers] for i, mac in enumerate(addresses)}
            return Segment(VNI, BRIDGE, MTU, frozenset(vteps), spread)

        steps: dict[str, list[float]] = {
            "first": [],
            "unchanged": [],
            "one_mac": [],
            "all_moved": [],
            "all_gone": [],
        }
        for round_ in range(rounds):
            for step, segment in (
                ("first", placed(0)),
                ("unchanged", placed(0)),
                ("one_mac", _one_moved(placed(0), vteps)),
                ("all_moved", placed(1)),
                ("all_gone", Segment(VNI, BRIDGE, MTU, frozenset(vteps), {})),
            ):
                wanted[:] = [segment]
                started = time.perf_counter()
                overlay.sync()
                steps[step].append(time.perf_counter() - started)
            wanted.clear()
            overlay.sync()  # the device removed: the next round starts from nothing
            log(f"round {round_ + 1}/{rounds}")
        return {
            "benchmark": "overlay",
            "macs": macs,
            "peers": peers,
            "rounds": rounds,
            "sync_ms": {step: latency_ms(samples) for step, samples in steps.items()},
            "load_average_1m": round(os.getloadavg()[0], 2),
        }


def _one_moved(segment: Segment, vteps: list[str]) -> Segment:
    first = next(iter(segment.macs))
    moved = vteps[(vteps.index(segment.macs[first]) + 1) % len(vteps)]
    return Segment(
        segment.vni,
        segment.bridge,
        segment.mtu,
        segment.peers,
        {
            **segment.macs,
            first: moved,
        },
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--macs", type=int, default=100)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    options = parser.parse_args()
    sys.exit(main(lambda: benchmark(options.macs, options.peers, options.rounds)))
