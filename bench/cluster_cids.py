"""Cluster CID benchmark: a create's allocation transaction on one host of a PostgreSQL cluster
(the network by its subnet, an address, the first NIC and a vsock CID, committed), with 8 and
32 clients on that host at once, taking CIDs by the per-host advisory lock every allocation
waited for (`lock`, what roost did before) and by claiming a free one without waiting (`claim`,
what it does now), alternating in one run on one throwaway PostgreSQL server with fsync on.

Prints one JSON line of figures on stdout; see bench/README.md (cluster_ipam.py's section).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

from sqlalchemy import update
from sqlalchemy.orm import Session

from bench._common import cleanup, latency_ms, log, main
from bench.cluster_ipam import GATEWAY, SUBNET, make_network, make_vms
from roost.errors import ConflictError
from roost.state import alloc
from roost.state.db import Database
from roost.state.hosts import HostRegistration, Hosts
from roost.state.models import VM
from tests.postgres import PostgresServer, missing_reason

CLIENTS = (8, 32)
SCHEMES = ("lock", "claim")


@dataclass(frozen=True)
class OnHost:
    """A VM as allocation takes it: its id and its host."""

    id: int
    host_id: int


@contextmanager
def scheme(name: str) -> Iterator[None]:
    """`lock`: PostgreSQL takes CIDs as SQLite does, by the per-host lock held to the commit
    (the claim finds nothing, so allocate_cid falls back to it); `claim`: as roost does."""
    if name == "claim":
        yield
        return
    claimed = alloc._claimed_cid
    alloc._claimed_cid = lambda *_: None
    try:
        yield
    finally:
        alloc._claimed_cid = claimed


def allocate(db: Database, vm: OnHost) -> tuple[str, int]:
    """One create's allocations on its host, committed: its address, then its CID."""

    def work(session: Session) -> tuple[str, int]:
        network = alloc.ensure_network(session, SUBNET, GATEWAY)
        address = alloc.allocate_ip(session, network, vm.id, new=True)
        alloc.hold_nic(session, vm, 0, None, new=True)
        return str(address), alloc.allocate_cid(session, vm, new=True)

    return db.transact(work)


def concurrent_run(url: str, vms: list[OnHost], clients: int) -> dict[str, Any]:
    """`clients` threads allocating for `vms` at once (one agent's concurrent creates)."""
    db = Database(url)
    seconds: list[float] = []
    cids: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client(group: list[OnHost]) -> None:
        ready.wait()
        for vm in group:
            before = time.perf_counter()
            try:
                _, cid = allocate(db, vm)
            except Exception as error:  # counted in the figures; the client goes on
                with lock:
                    errors.append(error.code if isinstance(error, ConflictError) else repr(error))
                continue
            with lock:
                seconds.append(time.perf_counter() - before)
                cids.append(cid)

    groups = [vms[part::clients] for part in range(clients)]
    threads = [threading.Thread(target=client, args=(group,)) for group in groups]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    ready.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    db.dispose()
    return {
        "clients": clients,
        "creates": len(seconds),
        "creates_per_second": round(len(seconds) / wall, 1),
        **{f"{key}_ms": value for key, value in latency_ms(seconds).items()},
        "distinct_cids": len(set(cids)) == len(cids),
        "errors": len(errors),
    }


def run(creates: int, rounds: int) -> dict[str, Any]:
    reason = missing_reason()
    if reason is not None:
        return {"benchmark": "cluster_cids", "skipped": reason}
    load_before = os.getloadavg()[0]
    figures: dict[str, list[dict[str, Any]]] = {}
    with cleanup() as stack:
        stack.enter_context(tempfile.TemporaryDirectory(prefix="roost-bench-"))
        server = PostgresServer()
        stack.callback(server.close)  # ends the server by its PID, reaps it, removes its files
        server.start()
        for number in range(rounds):
            for clients in CLIENTS:
                # the order alternates by round: a load that drifts favours neither
                for name in SCHEMES if number % 2 == 0 else SCHEMES[::-1]:
                    db = Database(server.database(migrated=True))
                    host = Hosts(db).register(
                        HostRegistration("h1", "192.0.2.1", "unix:///h1", {}, 64, 65536, {})
                    )
                    ids = make_vms(db, creates)
                    with db.write() as session:  # one host's VMs
                        session.execute(update(VM).values(host_id=host.host_id))
                    make_network(db)
                    url = db.url
                    db.dispose()
                    log(f"cluster_cids: {name}, {clients} clients, {creates} creates")
                    vms = [OnHost(vm_id, host.host_id) for vm_id in ids]
                    with scheme(name):
                        result = concurrent_run(url, vms, clients)
                    figures.setdefault(f"{name}_{clients}", []).append(result)
    return {
        "benchmark": "cluster_cids",
        "median": {
            key: {
                "creates_per_second": statistics.median(r["creates_per_second"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            }
            for key, runs in figures.items()
        },
        "runs": figures,
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--creates", type=int, default=500, metavar="N", help="per run")
    parser.add_argument("--rounds", type=int, default=6, metavar="R", help="of each scheme")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    sys.exit(main(lambda: run(options.creates, options.rounds)))
