"""Placement across three real agents on one PostgreSQL database: a create any agent takes goes to
the host placement chose (or the one it names), which reserves the VM's resources until it is
removed; the VM's other requests reach its host through any agent; a host that never installed
the plugin fetches its files from a peer to boot it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.cluster import Cluster, MakeCluster
from tests.harness import write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]


def database(cluster: Cluster) -> psycopg.Connection[Any]:
    return psycopg.connect(cluster.database_url.replace("+psycopg", ""), autocommit=True)


def hosts_held(cluster: Cluster) -> dict[str, tuple[int, int]]:
    with database(cluster) as db:
        rows = db.execute(
            "SELECT name, allocated_vcpus, allocated_memory_mib FROM hosts"
        ).fetchall()
    return {name: (vcpus, memory) for name, vcpus, memory in rows}


def placed(cluster: Cluster, vm: str) -> tuple[str, int, int] | None:
    with database(cluster) as db:
        row = db.execute(
            "SELECT h.name, v.reserved_vcpus, v.reserved_memory_mib FROM vms v "
            "JOIN hosts h ON h.id = v.host_id WHERE v.name = %s",
            (vm,),
        ).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def test_a_vm_created_through_host1_for_host2_boots_there_and_host3_reaches_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    plugin = write_plugin(
        tmp_path, "p", network={"mode": "vsock"}, resources={"vcpus": 1, "memory_mib": 128}
    )
    cluster[1].ok("plugin", "install", plugin)  # only host1's store has its files
    store = cluster[2].state_dir / "artifacts"
    before = {path.name for path in store.rglob("*") if path.is_file()}

    vm = cluster[1].ok("vm", "create", "web", "--plugin", "p", "--host", "host2")

    assert vm["status"] == "running"
    assert vm["host"] == "host2"
    assert placed(cluster, "web") == ("host2", 1, 128)
    assert hosts_held(cluster) == {"host1": (0, 0), "host2": (1, 128), "host3": (0, 0)}
    fetched = {path.name for path in store.rglob("*") if path.is_file()} - before
    assert fetched, "host2 booted the VM from files fetched from host1"
    assert "fetched artifact" in cluster[2].logs()

    third = cluster[3]
    assert third.ok("vm", "stop", "web")["status"] == "stopped"
    assert third.ok("vm", "start", "web")["status"] == "running"
    assert third.ok("vm", "stop", "web")["status"] == "stopped"
    assert third.cli("vm", "rm", "web").exit_code == 0
    assert placed(cluster, "web") is None
    assert hosts_held(cluster) == {"host1": (0, 0), "host2": (0, 0), "host3": (0, 0)}


def test_placement_refuses_an_unknown_host_a_full_one_and_one_that_lacks_the_vmm(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(2, "--capacity-vcpus", "2")
    plugin = write_plugin(
        tmp_path, "p", network={"mode": "vsock"}, resources={"vcpus": 2, "memory_mib": 64}
    )
    first = cluster[1]
    first.ok("plugin", "install", plugin)

    unknown = first.cli("vm", "create", "a", "--plugin", "p", "--host", "nowhere", "--no-start")
    assert unknown.exit_code != 0 and "nowhere" in unknown.stdout + unknown.stderr
    answer = first.http.post("/v1/vms", json={"name": "a", "plugin": "p", "host": "nowhere"})
    assert answer.status_code == 404

    for name in ("a", "b"):  # 2 vCPUs each: one fills a host
        created = first.http.post("/v1/vms", json={"name": name, "plugin": "p", "start": False})
        assert created.status_code == 201, created.text
    assert {placed(cluster, "a"), placed(cluster, "b")} == {("host1", 2, 64), ("host2", 2, 64)}
    full = first.cli("vm", "create", "c", "--plugin", "p", "--no-start")
    assert full.exit_code == 4
    answer = first.http.post("/v1/vms", json={"name": "c", "plugin": "p", "start": False})
    assert (answer.status_code, answer.json()["error"]["code"]) == (409, "no_capacity")

    first.cli("vm", "rm", "a")
    lacking = first.http.post(
        "/v1/vms",
        json={"name": "c", "plugin": "p", "start": False, "vmm": "cloud-hypervisor"},
    )
    error = lacking.json()["error"]
    assert (lacking.status_code, error["code"]) == (409, "no_eligible_host")
    assert "vmms cloud-hypervisor" in error["message"]

    labelled = first.http.post(
        "/v1/vms",
        json={"name": "c", "plugin": "p", "start": False, "host_labels": {"zone": "a"}},
    )
    assert labelled.json()["error"]["code"] == "no_eligible_host"
    assert "label zone=a" in labelled.json()["error"]["message"]
    by_flag = first.cli("vm", "create", "c", "--plugin", "p", "--host-label", "zone=a")
    assert by_flag.exit_code == 4 and "label zone=a" in by_flag.stdout + by_flag.stderr
    assert first.cli("vm", "create", "c", "--plugin", "p", "--host-label", "zone").exit_code == 2


def test_a_resources_patch_is_held_against_its_hosts_capacity(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(1, "--capacity-vcpus", "4")
    agent = cluster[1]
    plugin = write_plugin(
        tmp_path, "p", network={"mode": "vsock"}, resources={"vcpus": 2, "memory_mib": 64}
    )
    agent.ok("plugin", "install", plugin)
    agent.ok("vm", "create", "a", "--plugin", "p", "--no-start")
    assert hosts_held(cluster)["host1"] == (2, 64)

    too_big = agent.http.patch("/v1/vms/a/config", json={"resources": {"vcpus": 5}})
    assert (too_big.status_code, too_big.json()["error"]["code"]) == (409, "no_capacity")
    assert hosts_held(cluster)["host1"] == (2, 64)
    grown = agent.http.patch("/v1/vms/a/config", json={"resources": {"vcpus": 4}})
    assert grown.status_code == 200, grown.text
    assert hosts_held(cluster)["host1"] == (4, 64)
    shrunk = agent.http.patch("/v1/vms/a/config", json={"resources": {"vcpus": 1}})
    assert shrunk.status_code == 200, shrunk.text
    assert hosts_held(cluster)["host1"] == (1, 64) and placed(cluster, "a") == ("host1", 1, 64)


def test_a_create_whose_chosen_host_does_not_answer_goes_to_the_next(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    # long thresholds: the stopped agent stays active for placement throughout the test
    cluster = make_cluster(2, offline_after=120, lost_after=600)
    first = cluster[1]
    plugin = write_plugin(
        tmp_path, "p", network={"mode": "vsock"}, resources={"vcpus": 1, "memory_mib": 64}
    )
    first.ok("plugin", "install", plugin)
    first.ok("vm", "create", "a", "--plugin", "p", "--host", "host1", "--no-start")
    cluster[2].stop()  # the emptier host, placement's first choice, no longer answers

    first.ok("vm", "create", "b", "--plugin", "p", "--no-start")

    assert placed(cluster, "b") == ("host1", 1, 64)
    assert "host host2 refused it (HTTP 502), the next host is asked" in first.logs()
    assert hosts_held(cluster) == {"host1": (2, 128), "host2": (0, 0)}
