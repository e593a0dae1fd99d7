"""What stays local to a host in a cluster, with three real agents on one PostgreSQL database:
each host has its own `dhcp` (--dhcp-bridge); host1 and host2 each register their own bridge as
external network `ext` (one name on two hosts), host3 has none; a VM that joins `ext` is placed
on a host that has it whichever agent takes the create, `--host host3` is refused naming what it
lacks; the list shows each `ext` with its host; a cluster network cannot take the name; `network
rm` removes the agent's own `ext` alone. Two hosts' VMs hold persisted forwards on
127.0.0.1:8080, one host's not twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.cluster import Cluster, MakeCluster
from tests.harness import run, wait_for, write_plugin

pytestmark = [pytest.mark.root]

BRIDGE = "br-ext"
LISTEN = "127.0.0.1:8080"


def facts(cluster: Cluster, host: str) -> dict[str, Any]:
    url = cluster.database_url.replace("+psycopg", "")
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute("SELECT facts FROM hosts WHERE name = %s", (host,)).fetchone()
    return {} if row is None else dict(row[0])


def vm_host(cluster: Cluster, name: str) -> str:
    return str(cluster[3].ok("vm", "show", name)["host"])


def register_ext(cluster: Cluster, index: int) -> dict[str, Any]:
    agent = cluster[index]
    run("ip", "link", "add", BRIDGE, "type", "bridge", netns=agent.netns)
    run("ip", "link", "set", BRIDGE, "up", netns=agent.netns)
    made = agent.ok("network", "create", "ext", "--external", "--bridge", BRIDGE)
    wait_for(
        lambda: "ext" in facts(cluster, agent.name).get("external_networks", []),
        what=f"{agent.name}'s facts to have ext",
    )
    return dict(made)


def error_of(answer: Any) -> tuple[int, str, str]:
    error = answer.json()["error"]
    return answer.status_code, error["code"], error["message"]


def test_an_external_network_of_one_name_on_two_hosts_places_its_vms_there(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(3, "--dhcp-bridge", "br-dhcp")  # each host's `dhcp` its own
    wait_for(
        lambda: all(
            "dhcp" in facts(cluster, agent.name).get("external_networks", []) for agent in cluster
        ),
        what="every host's facts to have its dhcp network",
    )
    first = register_ext(cluster, 1)
    second = register_ext(cluster, 2)
    assert (first["host"], second["host"]) == ("host1", "host2")
    listed = [(n["name"], n["bridge"], n["host"]) for n in cluster[3].ok("network", "list")]
    assert ("ext", BRIDGE, "host1") in listed and ("ext", BRIDGE, "host2") in listed
    assert ("default", "roost0", None) in listed
    dhcp = {n["host"] for n in cluster[1].ok("network", "list") if n["name"] == "dhcp"}
    assert dhcp == {"host1", "host2", "host3"}
    assert "HOST" in cluster[3].cli("network", "list").stdout

    third = cluster[3]
    third.ok("plugin", "install", write_plugin(tmp_path, "plain"))
    body = {"plugin": "plain", "start": False, "network": {"mode": "dhcp", "network": "ext"}}
    for name in ("a", "b", "c", "d"):  # through host3, which lacks ext
        created = third.http.post("/v1/vms", json={"name": name, **body})
        assert created.status_code == 201, created.text
        assert created.json()["host"] in ("host1", "host2")
    assert {vm_host(cluster, name) for name in "abcd"} <= {"host1", "host2"}

    refused = third.http.post("/v1/vms", json={"name": "e", "host": "host3", **body})
    status, code, message = error_of(refused)
    assert (status, code) == (409, "no_eligible_host")
    assert "ext" in message

    # a cluster network may not take a host's network's name
    taken = third.http.post("/v1/networks", json={"name": "ext", "subnet": "10.77.0.0/24"})
    status, code, message = error_of(taken)
    assert (status, code) == (409, "conflict") and "host1" in message

    # only its own host's agent removes a host-local network, and only its own
    gone = third.http.delete("/v1/networks/ext")
    status, _, message = error_of(gone)
    assert status == 404 and "host1, host2" in message
    for name in "abcd":
        cluster[1].ok("vm", "rm", name)
    cluster[1].ok("network", "rm", "ext")
    assert [n["host"] for n in third.ok("network", "list") if n["name"] == "ext"] == ["host2"]
    assert cluster[2].ok("network", "show", "ext")["host"] == "host2"


def recorded_forwards(cluster: Cluster) -> list[tuple[str, str, str]]:
    url = cluster.database_url.replace("+psycopg", "")
    with psycopg.connect(url, autocommit=True) as db:
        rows = db.execute(
            "SELECT v.name, f.listen, h.name FROM vsock_forwards f JOIN vms v ON v.id = f.vm_id "
            "JOIN hosts h ON h.id = f.host_id ORDER BY v.name"
        ).fetchall()
    return [tuple(row) for row in rows]


def test_two_hosts_persist_forwards_on_one_address_one_host_not_twice(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The agents of this machine's cluster share one loopback (their processes run in one
    namespace; only their links are in the hosts'), so host1's agent is stopped while host2's
    forward on the same address is made: what is shown is the database's rule."""
    first = cluster[1]
    first.ok("plugin", "install", write_plugin(tmp_path, "v", network={"mode": "vsock"}))
    for name, host in (("a", "host1"), ("b", "host2"), ("c", "host2")):
        first.ok("vm", "create", name, "--plugin", "v", "--host", host, "--no-start")
    third = cluster[3]
    forward = {"listen": LISTEN, "guest_port": 80}
    made = third.http.post("/v1/vms/a/forwards", json=forward)  # goes to host1
    assert made.status_code == 201, made.text

    first.stop()
    made = third.http.post("/v1/vms/b/forwards", json=forward)  # goes to host2
    assert made.status_code == 201, made.text
    assert recorded_forwards(cluster) == [("a", LISTEN, "host1"), ("b", LISTEN, "host2")]
    again = third.http.post("/v1/vms/c/forwards", json=forward)
    status, code, message = error_of(again)
    assert (status, code) == (409, "conflict") and "VM 'b'" in message

    # host1's agent listens on its forward again once host2's is gone
    third.cli("vm", "unforward", "b", str(made.json()["id"]))
    cluster.start()
    wait_for(lambda: first.http.get("/healthz").json()["status"] == "ok", what="host1's recovery")
    assert "cannot listen" not in first.logs()
    assert [f["listen"] for f in third.ok("vm", "forwards", "a")] == [LISTEN]
    assert recorded_forwards(cluster) == [("a", LISTEN, "host1")]
