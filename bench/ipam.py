"""IPAM benchmark: fill a subnet (a /16 by default) through roost's state layer, one committed
write transaction per allocation, as the daemon allocates an address for each bridged VM.

Prints one JSON line of figures on stdout; see bench/README.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from bench._common import cleanup, log, main, percentile
from roost.errors import ConflictError
from roost.state import alloc
from roost.state.db import Database, sqlite_url
from roost.state.models import VM, Plugin

SUBNET = ipaddress.IPv4Network("10.200.0.0/16")
# The targets, for a full /16: 65,533 allocations in under 60 s, and the last 1,000 (the
# fullest table) with a p99 under 5 ms. A smaller --prefix scales the time target with its size.
TARGET_SECONDS_PER_16 = 60.0
TARGET_P99_LAST_MS = 5.0
LAST = 1000
PROGRESS_EVERY = 8192


def allocatable(subnet: ipaddress.IPv4Network) -> int:
    """Addresses roost hands out: all but the network, broadcast and gateway addresses."""
    return subnet.num_addresses - 3


def add_vms(db: Database, count: int, prefix: str = "vm") -> list[int]:
    """`count` VM rows named `<prefix>-<i>` (leases reference them), bulk-inserted in one
    transaction: set-up, not part of what is measured."""

    def work(session: Session) -> list[int]:
        plugin = session.scalar(select(Plugin).where(Plugin.name == "bench"))
        if plugin is None:
            plugin = Plugin(name="bench", version="1", manifest={})
            session.add(plugin)
            session.flush()
        rows = [
            {
                "name": f"{prefix}-{i}",
                "plugin_id": plugin.id,
                "status": "created",
                "vmm_kind": "firecracker",
                "network": {},
            }
            for i in range(count)
        ]
        session.execute(insert(VM), rows)
        return list(
            session.scalars(select(VM.id).where(VM.name.startswith(f"{prefix}-")).order_by(VM.id))
        )

    return db.transact(work)


class RoostIPAM:
    """roost's IPAM on a fresh SQLite database in `directory`, driven through the same state
    functions (and one write transaction per call) as the engine uses."""

    def __init__(self, directory: Path, subnet: ipaddress.IPv4Network) -> None:
        self.subnet = subnet
        self.gateway = subnet.network_address + 1
        self.db = Database(sqlite_url(directory))
        self.db.migrate()

    def add_vms(self, count: int, prefix: str = "vm") -> list[int]:
        return add_vms(self.db, count, prefix)

    def allocate(self, vm_id: int) -> ipaddress.IPv4Address:
        """One committed allocation: find or create the network, take the next free address."""

        def work(session: Session) -> ipaddress.IPv4Address:
            network = alloc.ensure_network(session, self.subnet, self.gateway)
            return alloc.allocate_ip(session, network, vm_id)

        return self.db.transact(work)

    def close(self) -> None:
        self.db.dispose()


def run(prefix: int) -> dict[str, Any]:
    subnet = ipaddress.IPv4Network(f"{SUBNET.network_address}/{prefix}", strict=False)
    count = allocatable(subnet)
    with cleanup() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="roost-bench-")))
        ipam = RoostIPAM(directory, subnet)
        stack.callback(ipam.close)
        vm_ids = ipam.add_vms(count)
        [extra] = ipam.add_vms(1, prefix="extra")
        log(f"ipam: {count} VM rows ready; allocating {subnet} one transaction each")

        addresses: list[ipaddress.IPv4Address] = []
        seconds: list[float] = []
        started = time.perf_counter()
        for done, vm_id in enumerate(vm_ids, 1):
            before = time.perf_counter()
            addresses.append(ipam.allocate(vm_id))
            seconds.append(time.perf_counter() - before)
            if done % PROGRESS_EVERY == 0:
                log(f"ipam: {done}/{count} in {time.perf_counter() - started:.1f}s")
        total = time.perf_counter() - started

        before = time.perf_counter()
        try:
            ipam.allocate(extra)
            full_error = "none: an address was handed out past the end"
        except ConflictError as error:
            full_error = error.code
        full_seconds = time.perf_counter() - before

    reserved = {subnet.network_address, subnet.broadcast_address, subnet.network_address + 1}
    distinct = (
        len(set(addresses)) == count
        and all(a in subnet for a in addresses)
        and not reserved & set(addresses)
    )
    last = seconds[-LAST:]
    p99_last_ms = percentile(last, 99) * 1000
    target_seconds = TARGET_SECONDS_PER_16 * count / allocatable(SUBNET)
    return {
        "benchmark": "ipam",
        "subnet": str(subnet),
        "allocations": count,
        "total_seconds": round(total, 3),
        "allocations_per_second": round(count / total, 1),
        "p50_ms": round(percentile(seconds, 50) * 1000, 3),
        "p99_ms": round(percentile(seconds, 99) * 1000, 3),
        "p99_last_1000_ms": round(p99_last_ms, 3),
        "max_ms": round(max(seconds) * 1000, 3),
        "distinct": distinct,
        "next_allocation_error": full_error,
        "next_allocation_ms": round(full_seconds * 1000, 3),
        "target_total_seconds": round(target_seconds, 3),
        "target_p99_last_1000_ms": TARGET_P99_LAST_MS,
        "meets_targets": total < target_seconds
        and p99_last_ms < TARGET_P99_LAST_MS
        and distinct
        and full_error == "network_full",
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--prefix",
        type=int,
        default=SUBNET.prefixlen,
        choices=range(16, 30),
        metavar="N",
        help="fill 10.200.0.0/N instead of the /16 (16-29)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    sys.exit(main(lambda: run(options.prefix)))
