"""Cluster IPAM benchmark: bridged address allocations per second, and their latency, with 8
and 32 clients allocating at once on one network, on PostgreSQL (a throwaway server with fsync
on, as tests/postgres.py makes one) beside SQLite single-host, through roost's state layer (one
committed write transaction per allocation, as a create makes one); and the placement decision
among 50 registered hosts.

Prints one JSON line of figures on stdout; see bench/README.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

from sqlalchemy.orm import Session

from bench._common import cleanup, latency_ms, log, main, percentile
from bench.ipam import add_vms
from roost.errors import ConflictError
from roost.state import alloc
from roost.state.db import Database, sqlite_url
from tests.postgres import PostgresServer, missing_reason

SUBNET = ipaddress.IPv4Network("10.220.0.0/16")  # room for every run's allocations
GATEWAY = SUBNET.network_address + 1
CLIENTS = (8, 32)
# the targets, at 32 clients on PostgreSQL with fsync on
TARGET_PER_SECOND = 1000.0
TARGET_P99_MS = 20.0
TARGET_PLACEMENT_P99_MS = 1.0
PLACEMENT_HOSTS = 50
PLACEMENT_DECISIONS = 5000


@dataclass
class Run:
    """What one run's clients did: each allocation's seconds, the addresses handed out, the
    errors met, and the wall time from the common start to the last commit."""

    clients: int
    seconds: list[float] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0

    def figures(self) -> dict[str, Any]:
        done = len(self.seconds)
        return {
            "clients": self.clients,
            "allocations": done,
            "allocations_per_second": round(done / self.wall, 1) if self.wall else 0.0,
            **{f"{key}_ms": value for key, value in latency_ms(self.seconds).items()},
            "distinct": len(set(self.addresses)) == len(self.addresses) == done,
            "errors": len(self.errors),
        }


def split(items: Sequence[int], parts: int) -> list[list[int]]:
    """`items` dealt round-robin into `parts` lists (the first ones one longer when uneven)."""
    return [list(items[part::parts]) for part in range(parts)]


def make_network(db: Database) -> float:
    """The network all clients allocate on; the seconds its creation took (on PostgreSQL
    that fills its pool: every address of the /16)."""
    before = time.perf_counter()
    db.transact(lambda session: alloc.ensure_network(session, SUBNET, GATEWAY))
    return time.perf_counter() - before


def allocate(db: Database, vm_id: int) -> str:
    """One allocation as a create makes it: the network by its subnet, an address for the new
    VM's first interface, committed."""

    def work(session: Session) -> str:
        network = alloc.ensure_network(session, SUBNET, GATEWAY)
        return str(alloc.allocate_ip(session, network, vm_id, new=True))

    return db.transact(work)


def client_threads(url: str, groups: list[list[int]], start: Callable[[], object]) -> Run:
    """One thread per group of VM ids, each allocating for its VMs in turn once `start`
    returns; all in this process, sharing one Database (as one agent's requests do)."""
    db = Database(url)
    run = Run(len(groups))
    lock = threading.Lock()
    ready = threading.Barrier(len(groups) + 1)

    def client(vm_ids: list[int]) -> None:
        ready.wait()
        for vm_id in vm_ids:
            before = time.perf_counter()
            try:
                address = allocate(db, vm_id)
            except Exception as error:  # counted in the figures; the client goes on
                with lock:
                    run.errors.append(
                        error.code if isinstance(error, ConflictError) else repr(error)
                    )
                continue
            took = time.perf_counter() - before
            with lock:
                run.seconds.append(took)
                run.addresses.append(address)

    threads = [threading.Thread(target=client, args=(group,)) for group in groups]
    for thread in threads:
        thread.start()
    start()
    began = time.perf_counter()
    ready.wait()
    for thread in threads:
        thread.join()
    run.wall = time.perf_counter() - began
    db.dispose()
    return run


def _worker(url: str, groups: list[list[int]], start: Barrier, results: Any) -> None:
    run = client_threads(url, groups, start.wait)
    results.put((run.seconds, run.addresses, run.errors, run.wall))


def concurrent_run(url: str, vm_ids: list[int], clients: int, processes: int) -> Run:
    """`clients` clients allocating for `vm_ids` at once: in this process's threads, or
    spread over `processes` worker processes (as agents on several hosts are)."""
    groups = split(vm_ids, clients)
    if processes <= 1:
        return client_threads(url, groups, lambda: None)
    context = multiprocessing.get_context("fork")
    start = context.Barrier(processes + 1)
    results = context.Queue()
    workers = [
        context.Process(target=_worker, args=(url, [groups[i] for i in part], start, results))
        for part in split(range(clients), processes)
    ]
    for worker in workers:
        worker.start()
    try:
        start.wait()
        began = time.perf_counter()
        parts = [results.get(timeout=600) for _ in workers]
        wall = time.perf_counter() - began
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
                worker.join()
    run = Run(clients, wall=wall)
    for seconds, addresses, errors, _ in parts:
        run.seconds += seconds
        run.addresses += addresses
        run.errors += errors
    return run


def backend_runs(fresh: Callable[[], Database], allocations: int, processes: int) -> dict[str, Any]:
    """Runs at 8 and 32 clients, each on a fresh database with `allocations` VMs to allocate
    for and the network made; how long making the network took (its pool filled, on
    PostgreSQL)."""
    figures: dict[str, Any] = {"processes": processes}
    for clients in CLIENTS:
        db = fresh()
        vm_ids = add_vms(db, allocations)
        figures["network_made_ms"] = round(make_network(db) * 1000, 1)
        url = db.url
        db.dispose()
        log(f"cluster_ipam: {db.url.split(':')[0]}, {clients} clients, {allocations} allocations")
        figures[f"clients_{clients}"] = concurrent_run(url, vm_ids, clients, processes).figures()
    return figures


def run(allocations: int, processes: int) -> dict[str, Any]:
    reason = missing_reason()
    if reason is not None:
        return {"benchmark": "cluster_ipam", "skipped": reason}
    load_before = os.getloadavg()[0]
    with cleanup() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="roost-bench-")))
        server = PostgresServer()
        stack.callback(server.close)  # ends the server by its PID, reaps it, removes its files
        server.start()
        log(f"cluster_ipam: PostgreSQL (fsync on) at {server.directory}")
        postgresql = backend_runs(
            lambda: Database(server.database(migrated=True)), allocations, processes
        )
        made = iter(range(len(CLIENTS)))

        def fresh_sqlite() -> Database:
            path = directory / f"sqlite-{next(made)}"
            path.mkdir()
            db = Database(sqlite_url(path))
            db.migrate()
            return db

        # one daemon's threads: SQLite serializes writers within a process, not across them
        sqlite = backend_runs(fresh_sqlite, allocations, 1)
    placement = placement_p99_ms()
    at_32 = postgresql[f"clients_{CLIENTS[-1]}"]
    meets = (
        at_32["allocations_per_second"] >= TARGET_PER_SECOND
        and at_32["p99_ms"] < TARGET_P99_MS
        and all(postgresql[f"clients_{n}"]["distinct"] for n in CLIENTS)
        and (placement is None or placement["wall_p99_ms"] < TARGET_PLACEMENT_P99_MS)
    )
    figures: dict[str, Any] = {
        "benchmark": "cluster_ipam",
        "subnet": str(SUBNET),
        "postgresql": postgresql,
        "sqlite": sqlite,
    }
    if placement is not None:
        figures["placement"] = {"hosts": PLACEMENT_HOSTS, **placement}
    figures["targets"] = {
        "allocations_per_second_at_32": TARGET_PER_SECOND,
        "p99_ms_at_32": TARGET_P99_MS,
        "placement_p99_ms": TARGET_PLACEMENT_P99_MS,
    }
    # two shared cores: what else ran says how far these are from an idle machine's
    figures["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    figures["meets_targets"] = meets
    return figures


def placement_p99_ms() -> dict[str, float] | None:
    """p99 of one placement decision (`roost.plan.placement.place`) among 50 registered hosts
    of different sizes and labels, a quarter of them lacking the VM's VMM: wall time, and the
    thread's CPU time (on shared cores a decision preempted midway counts its wait in the
    first); None where this tree has no placement yet."""
    try:
        from roost.plan.placement import HostSnapshot, HostState, Need, place
    except ImportError:
        return None
    hosts = [
        HostSnapshot(
            id=number,
            name=f"host-{number}",
            api=f"unix:///run/roost/host-{number}.sock",
            state=HostState.CORDONED if number % 10 == 9 else HostState.ACTIVE,
            labels={"zone": f"z{number % 3}"},
            facts={"vmms": ["qemu"] if number % 4 == 3 else ["firecracker", "qemu"]},
            capacity_vcpus=64,
            capacity_memory_mib=131_072,
            allocated_vcpus=number % 60,
            allocated_memory_mib=(number * 2_048) % 120_000,
        )
        for number in range(1, PLACEMENT_HOSTS + 1)
    ]
    need = Need(
        vcpus=2, memory_mib=2_048, labels={"zone": "z1"}, requires={"vmms": ["firecracker"]}
    )
    wall, cpu = [], []
    for _ in range(PLACEMENT_DECISIONS):
        before, before_cpu = time.perf_counter(), time.thread_time()
        place(hosts, need)
        wall.append(time.perf_counter() - before)
        cpu.append(time.thread_time() - before_cpu)
    return {
        "wall_p50_ms": round(percentile(wall, 50) * 1000, 4),
        "wall_p99_ms": round(percentile(wall, 99) * 1000, 4),
        "cpu_p99_ms": round(percentile(cpu, 99) * 1000, 4),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--allocations", type=int, default=2000, metavar="N", help="per run (default 2000)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="P",
        help="PostgreSQL's clients spread over P worker processes, as agents' are (default 1: "
        "threads of this process, which did best on two cores here)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    sys.exit(main(lambda: run(options.allocations, options.processes)))
