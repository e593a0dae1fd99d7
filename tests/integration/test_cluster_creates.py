"""Creates racing across a cluster: three agents on one PostgreSQL database take 90 creates at
once, a third through each API, half of them asking for one manual address and half for any
address, with less capacity than they ask for. Whatever the interleaving, the database holds no
duplicate name, address, MAC, CID on one host or tap on one host; exactly one create wins the
contested address; no host holds more than its capacity, and each holds exactly what its VMs
reserve; the creates that lost left nothing behind."""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.cluster import MakeCluster
from tests.harness import write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]

CREATES = 90
CAPACITY_VCPUS = 14  # per host: 42 vCPUs for 46 possible winners of 1 vCPU each
CONTESTED = "10.57.0.50"


def rows(connection: psycopg.Connection[Any], query: str) -> list[tuple[Any, ...]]:
    return connection.execute(query).fetchall()


def duplicates(values: list[Any]) -> list[Any]:
    return [value for value, count in Counter(values).items() if count > 1]


def test_ninety_creates_through_three_agents_keep_every_invariant(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(3, "--capacity-vcpus", str(CAPACITY_VCPUS))
    plugin = write_plugin(
        tmp_path, "p", network={"mode": "bridged"}, resources={"vcpus": 1, "memory_mib": 64}
    )
    cluster[1].ok("plugin", "install", plugin)

    def body(index: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"name": f"vm{index:02d}", "plugin": "p", "start": False}
        if index % 2 == 0:  # half of them on one manual address
            fields["network"] = {"mode": "bridged", "ip": CONTESTED}
        return fields

    def create(index: int) -> tuple[int, int, str]:
        agent = cluster[index % 3 + 1]  # a third through each agent's API
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(agent.socket)),
            base_url="http://roost",
            timeout=300,
        ) as client:
            answer = client.post("/v1/vms", json=body(index))
        code = "" if answer.status_code == 201 else answer.json()["error"]["code"]
        return index, answer.status_code, code

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=CREATES) as pool:
        answers = list(pool.map(create, range(CREATES)))
    took = time.monotonic() - began

    assert {(status, code) for _, status, code in answers} <= {
        (201, ""),
        (409, "ip_taken"),
        (409, "no_capacity"),
    }, answers
    won = {f"vm{index:02d}" for index, status, _ in answers if status == 201}
    contested = [(index, code) for index, status, code in answers if index % 2 == 0]
    assert sum(1 for _, code in contested if code == "") == 1, contested
    assert any(code == "ip_taken" for _, code in contested)
    assert any(code == "no_capacity" for _, _, code in answers)  # capacity was the limit

    with psycopg.connect(cluster.database_url.replace("+psycopg", "")) as db:
        vms = rows(db, "SELECT id, name, host_id, reserved_vcpus, status FROM vms")
        assert {name for _, name, *_ in vms} == won  # the losers left no VM
        assert all(status == "created" for *_, status in vms)
        assert all(host is not None and reserved == 1 for _, _, host, reserved, _ in vms)
        assert len({host for _, _, host, _, _ in vms}) == 3  # spread over the hosts
        assert not rows(db, "SELECT name FROM pending_creates")

        leases = rows(db, "SELECT network_id, ip, vm_id FROM ip_leases")
        assert sorted(vm for *_, vm in leases) == sorted(vm_id for vm_id, *_ in vms)
        assert not duplicates([(network, ip) for network, ip, _ in leases])
        winner = db.execute(
            "SELECT v.name FROM ip_leases l JOIN vms v ON v.id = l.vm_id WHERE l.ip = %s",
            (int(ipaddress.IPv4Address(CONTESTED)),),
        ).fetchall()
        assert len(winner) == 1 and winner[0][0] in won

        nics = rows(
            db,
            "SELECT coalesce(n.user_mac, n.mac), n.tap, v.host_id FROM vm_nics n "
            "JOIN vms v ON v.id = n.vm_id",
        )
        assert len(nics) == len(won)
        assert not duplicates([mac for mac, _, _ in nics])
        assert not duplicates([(host, tap) for _, tap, host in nics])

        cids = rows(
            db, "SELECT c.host_id, c.cid, v.host_id FROM cid_leases c JOIN vms v ON v.id = c.vm_id"
        )
        assert len(cids) == len(won)
        assert all(lease_host == vm_host for lease_host, _, vm_host in cids)
        assert not duplicates([(host, cid) for host, cid, _ in cids])

        hosts = rows(
            db,
            "SELECT h.name, h.allocated_vcpus, h.capacity_vcpus, h.allocated_memory_mib, "
            "coalesce(sum(v.reserved_vcpus), 0), coalesce(sum(v.reserved_memory_mib), 0) "
            "FROM hosts h LEFT JOIN vms v ON v.host_id = h.id GROUP BY h.id",
        )
    for name, allocated, capacity, memory, reserved, reserved_memory in hosts:
        assert allocated <= capacity == CAPACITY_VCPUS, name
        assert (allocated, memory) == (reserved, reserved_memory), name
    assert sum(allocated for _, allocated, *_ in hosts) == len(won)
    moved = sum(agent.logs().count("the next host is asked") for agent in cluster)
    print(
        f"{CREATES} creates in {took:.1f} s: {len(won)} created, "
        + ", ".join(f"{code} {n}" for code, n in Counter(c for *_, c in answers if c).items())
        + "; per host: "
        + ", ".join(f"{name} {allocated}" for name, allocated, *_ in hosts)
        + f"; moved to the next host: {moved}"
    )
