"""`roost host ...` on three real agents (tests/cluster.py) on one PostgreSQL database: every
agent lists the three hosts with their capacity and what their VMs hold; a cordon (made through
another agent) keeps creates off the host until it is uncordoned; a drain through a third agent
moves the records of the host's VMs that do not run and have no disk copy — one never booted,
one booted from an initramfs and stopped — to other hosts with their addresses and MACs and a
CID there, where the moved VM then starts; a running VM and a stopped one with a disk copy stay,
listed with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from roost.engine.hosts import DISK_COPY
from tests.cluster import Cluster
from tests.harness import write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]

SMALL = {"vcpus": 1, "memory_mib": 64}


def addresses(vm: dict[str, Any]) -> tuple[Any, Any]:
    return vm["network"]["ip"], vm["network"]["mac"]


def cid_host(cluster: Cluster, vm: str) -> str:
    """The host whose CID the VM holds, from the database."""
    with psycopg.connect(cluster.database_url.replace("+psycopg", "")) as db:
        found = db.execute(
            "SELECT h.name FROM cid_leases c JOIN vms v ON v.id = c.vm_id "
            "JOIN hosts h ON h.id = c.host_id WHERE v.name = %s",
            (vm,),
        ).fetchone()
    assert found is not None, f"{vm} holds no CID"
    return str(found[0])


def test_hosts_are_listed_cordoned_uncordoned_and_drained_through_any_agent(
    cluster: Cluster, tmp_path: Path
) -> None:
    first, second, third = cluster[1], cluster[2], cluster[3]
    network = {"mode": "bridged"}
    first.ok("plugin", "install", write_plugin(tmp_path, "p", network=network, resources=SMALL))
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * (1 << 20))
    disky = write_plugin(
        tmp_path, "d", network=network, resources=SMALL, rootfs={"path": str(rootfs)}
    )
    first.ok("plugin", "install", disky)

    listed = third.ok("host", "list")
    assert [host["name"] for host in listed] == ["host1", "host2", "host3"]
    assert {host["state"] for host in listed} == {"active"}
    assert all(host["capacity"]["vcpus"] > 0 for host in listed)
    assert all(host["allocated"] == {"vcpus": 0, "memory_mib": 0} for host in listed)
    table = first.cli("host", "list")
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "STATE", "VTEP", "VCPUS"]
    assert [line.split()[0] for line in lines[1:]] == ["host1", "host2", "host3"]
    assert max(map(len, lines)) <= 80

    assert third.ok("host", "cordon", "host2")["state"] == "cordoned"
    assert first.ok("host", "show", "host2")["state"] == "cordoned"
    for index in range(3):
        placed = first.ok("vm", "create", f"spread{index}", "--plugin", "p", "--no-start")
        assert placed["host"] != "host2"
    refused = first.cli("vm", "create", "x", "--plugin", "p", "--no-start", "--host", "host2")
    assert refused.exit_code == 4, refused.stderr
    assert "not active or has no room" in refused.stderr
    assert second.ok("host", "uncordon", "host2")["state"] == "active"

    on_host2 = ("--host", "host2")
    idle = first.ok("vm", "create", "idle", "--plugin", "p", "--no-start", *on_host2)
    assert idle["host"] == "host2"
    assert cid_host(cluster, "idle") == "host2"
    first.ok("vm", "create", "booted", "--plugin", "p", *on_host2)
    first.ok("vm", "stop", "booted", "--force")
    first.ok("vm", "create", "disky", "--plugin", "d", *on_host2)
    first.ok("vm", "stop", "disky", "--force")
    first.ok("vm", "create", "runs", "--plugin", "p", *on_host2)
    assert first.ok("host", "show", "host2")["allocated"] == {"vcpus": 4, "memory_mib": 256}

    drained = third.ok("host", "drain", "host2")

    assert drained["host"]["state"] == "cordoned"
    moved = {item["vm"]: item["to"] for item in drained["moved"]}
    assert set(moved) == {"booted", "idle"}
    assert set(moved.values()) <= {"host1", "host3"}
    assert drained["stayed"] == [
        {"vm": "disky", "reason": DISK_COPY},
        {"vm": "runs", "reason": "running: stop it or remove it"},
    ]
    assert first.ok("host", "show", "host2")["allocated"] == {"vcpus": 2, "memory_mib": 128}
    after = second.ok("vm", "show", "idle")
    assert after["host"] == moved["idle"]
    assert addresses(after) == addresses(idle)
    assert cid_host(cluster, "idle") == moved["idle"]

    started = second.ok("vm", "start", "booted")  # on its new host, through another one
    assert started["status"] == "running"
    assert started["host"] == moved["booted"]

    human = first.cli("host", "drain", "host2")
    assert human.exit_code == 0, human.stderr
    assert "moved 0 VM(s)" in human.stdout
    assert "disky  has a disk copy on this host" in human.stdout
