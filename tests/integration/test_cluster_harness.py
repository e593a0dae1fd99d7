"""The cluster harness itself (tests/cluster.py): host namespaces on one fabric bridge reach each
other at their VTEP addresses; three agents start at once on one fresh PostgreSQL database;
and when it is over nothing is left: no namespace, no process, no directory, no session."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import psycopg
import pytest

from tests.cluster import FABRIC_BRIDGE, HOST_LINK, Cluster, Fabric, MakeCluster
from tests.harness import addresses, links, namespace_pids, process_alive, run
from tests.postgres import PostgresServer

pytestmark = [pytest.mark.root]


def namespaces() -> set[str]:
    return set(run("ip", "netns", "list").stdout.split())


def test_each_host_namespace_reaches_the_others_vtep_addresses_across_the_fabric(
    fabric: Fabric,
) -> None:
    ports = links(fabric.namespace)
    assert ports[FABRIC_BRIDGE]["mtu"] == 1500
    for index, host in enumerate(fabric.hosts, start=1):
        assert addresses(host, HOST_LINK) == [f"10.251.0.{index}/24"]
        assert links(host)[HOST_LINK]["mtu"] == 1500
        assert ports[f"h{index}"]["master"] == FABRIC_BRIDGE
    for source, target in itertools.permutations(range(1, len(fabric.hosts) + 1), 2):
        assert fabric.ping(source, target), f"host {source} cannot reach host {target}"


def test_a_fabric_removes_its_namespaces_also_when_making_it_failed() -> None:
    with Fabric(2) as fabric:
        made = {fabric.namespace, *fabric.hosts}
        assert made <= namespaces()
    assert not made & namespaces()
    broken = Fabric(3)
    run("ip", "netns", "add", broken.host(2))  # in the way of host 2's namespace
    try:
        with pytest.raises(subprocess.CalledProcessError, match=broken.host(2)):
            broken.create()
        assert not {broken.namespace, broken.host(1), broken.host(3)} & namespaces()
        assert broken.host(2) in namespaces()  # not the fabric's: left alone
    finally:
        run("ip", "netns", "del", broken.host(2))


def sessions(postgres: PostgresServer, database_url: str) -> int:
    name = database_url.split("@/", 1)[1].split("?", 1)[0]
    with psycopg.connect(postgres.conninfo("postgres")) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_three_agents_start_at_once_on_one_empty_database_and_leave_nothing_behind(
    make_cluster: MakeCluster, postgres: PostgresServer
) -> None:
    cluster = make_cluster(3, migrated=False)  # they migrate it side by side
    for agent in cluster:
        assert agent.http.get("/healthz").json()["status"] == "ok"
    with psycopg.connect(cluster.database_url.replace("+psycopg", "")) as connection:
        networks = connection.execute("SELECT name FROM networks").fetchall()
    assert networks == [("default",)]  # made once, by whichever agent came first
    pids = [agent.pid for agent in cluster]
    pids += [pid for host in cluster.fabric.hosts for pid in namespace_pids(host)]
    made = {cluster.fabric.namespace, *cluster.fabric.hosts}
    directories = [agent.dir for agent in cluster]
    assert all(Path(directory).is_dir() for directory in directories)

    cluster[2].freeze()  # a frozen agent is thawed to be stopped
    cluster.close()

    assert not [pid for pid in pids if process_alive(pid)]
    assert not made & namespaces()
    assert not [directory for directory in directories if directory.exists()]
    assert sessions(postgres, cluster.database_url) == 0


@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_the_cluster_fixture_takes_its_number_of_hosts_and_names_them_in_order(
    cluster: Cluster,
) -> None:
    assert [agent.name for agent in cluster] == ["host1", "host2"]
    assert [agent.vtep for agent in cluster] == ["10.251.0.1", "10.251.0.2"]
    assert cluster.agent("host2") is cluster[2]
    for agent in cluster:
        assert agent.http.get("/healthz").status_code == 200
        assert f"--advertise-api {agent.api}" in " ".join(agent.argv)
