"""Listing a cluster with real agents (tests/cluster.py: `roost serve` agents in namespaces on one
PostgreSQL database): every agent lists every host's VMs with their `host`, `?host=` and
`--host` select one host's, `vm list` gets a HOST column; a VM of a frozen agent reads
`unknown` on the others until it is thawed; an agent restarting leaves other hosts' VMs be."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from roost.cli.remote import VM_COLUMNS
from tests.cluster import TEST_OFFLINE_AFTER, Agent, MakeCluster
from tests.harness import process_alive, wait_for, write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]


def create(agent: Agent, name: str, *, start: bool) -> dict[str, Any]:
    """VM `name` created through `agent`'s API on `agent`'s host: named as its host when the
    API places creates (`host`), which an agent that creates on its own host has no need of."""
    body = {"name": name, "plugin": "p", "start": start}
    response = agent.http.post("/v1/vms", json={**body, "host": agent.name})
    if response.status_code == 422 and "body.host" in response.text:
        response = agent.http.post("/v1/vms", json=body)
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    assert made["host"] == agent.name
    return made


def hosts_listed(agent: Agent, *args: str) -> dict[str, str]:
    return {vm["name"]: vm["host"] for vm in agent.ok("vm", "list", *args)}


def shown(agent: Agent, name: str) -> dict[str, Any]:
    response = agent.http.get(f"/v1/vms/{name}")
    assert response.status_code == 200, response.text
    vm: dict[str, Any] = response.json()
    return vm


def test_every_agent_lists_every_hosts_vms_with_their_host_even_while_one_is_frozen(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    # a grace far past the test's freeze: its VMs read unknown, never lost
    cluster = make_cluster(2, lost_after=120)
    first, second = cluster[1], cluster[2]
    plugin = write_plugin(tmp_path, "p", network={"mode": "vsock"})
    first.ok("plugin", "install", plugin)
    second.ok("plugin", "install", plugin, "--force")  # its artifacts in host2's store too
    create(first, "idle1", start=False)
    create(second, "idle2", start=False)
    running = create(second, "run2", start=True)
    assert running["status"] == "running"
    pid = running["vmm"]["pid"]

    everything = {"idle1": "host1", "idle2": "host2", "run2": "host2"}
    for agent in cluster:
        assert hosts_listed(agent) == everything
        assert hosts_listed(agent, "--host", "host2") == {"idle2": "host2", "run2": "host2"}
        assert hosts_listed(agent, "--host", "host1", "--status", "created") == {"idle1": "host1"}
        assert agent.cli("vm", "list", "--host", "host1", "-q").stdout == "idle1\n"
        page = agent.http.get("/v1/vms", params={"host": "host2", "limit": 1})
        assert [vm["name"] for vm in page.json()] == ["idle2"]
        assert "host=host2" in page.headers["link"]
        table = agent.cli("vm", "list")
        assert table.exit_code == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert header.split() == ["NAME", "HOST", *VM_COLUMNS[1:]]
        assert [row.split()[:2] for row in rows] == [[n, h] for n, h in everything.items()]

    # host1 shows host2's running VM from its row: its status and pid, no path of host2's
    seen = shown(first, "run2")
    assert seen["status"] == "running"
    assert seen["vmm"]["pid"] == pid and seen["vmm"]["api_socket"] is None
    assert seen["console_log"] is None

    # an agent's restart recovers its own VMs only: host2's running VM runs on
    first.stop()
    cluster.start()
    assert process_alive(pid)
    assert shown(first, "run2")["status"] == "running"
    assert shown(second, "run2")["status"] == "running"
    assert shown(second, "run2")["vmm"]["api_socket"] is not None

    second.freeze()
    wait_for(
        lambda: shown(first, "run2")["status"] == "unknown",
        timeout=TEST_OFFLINE_AFTER + 30,
        what="host2's VMs to read unknown on host1",
    )
    assert {vm["name"]: vm["status"] for vm in first.ok("vm", "list")} == {
        "idle1": "created",
        "idle2": "unknown",
        "run2": "unknown",
    }
    assert hosts_listed(first, "--host", "host2") == {"idle2": "host2", "run2": "host2"}
    assert hosts_listed(first, "--status", "unknown") == {"idle2": "host2", "run2": "host2"}
    assert hosts_listed(first, "--status", "running") == {}
    second.thaw()
    wait_for(
        lambda: shown(first, "run2")["status"] == "running",
        timeout=TEST_OFFLINE_AFTER + 30,
        what="host2's VMs to read as stored again on host1",
    )
    assert shown(first, "idle2")["status"] == "created"
    assert process_alive(pid)
