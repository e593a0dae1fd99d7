"""Bridged networks across hosts (tests/cluster.py: agents in host namespaces on one fabric and
one PostgreSQL): a cluster network has a VNI and MTU 1450; each host carrying one of its VMs has
`vx<vni>` on the network's bridge, flooding to the other hosts and sending each remote guest's
MAC to its host's VTEP, all from the database; a VM removed on one host is forgotten by the
others within seconds; the gateway address is on one host's bridge only. With QEMU guests of
the demo image: two guests on different hosts ping each other and exchange HTTP through VXLAN,
and a full-size frame of the network's MTU crosses it unfragmented.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from roost.state.alloc import gateway_mac
from tests.cluster import Cluster, vtep_address
from tests.harness import addresses, links, run, wait_for, write_plugin

pytestmark = [pytest.mark.root]

CONVERGED = 5.0  # seconds within which every host's forwarding entries follow the database
LAN = "10.59.0.0/24"


def forwarding(netns: str, vni: int) -> dict[str, set[str]]:
    """`vx<vni>`'s own entries in `netns`: MAC -> VTEPs (the all-zero MAC: the flood list);
    empty when there is no such device."""
    done = run("bridge", "-j", "fdb", "show", "dev", f"vx{vni}", netns=netns, check=False)
    if done.returncode != 0:
        return {}
    entries: dict[str, set[str]] = {}
    for entry in json.loads(done.stdout or "[]"):
        if "dst" in entry:
            entries.setdefault(entry["mac"], set()).add(entry["dst"])
    return entries


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def on_lan(agent: Any, tmp_path: Path, name: str, plugin: str, **network: Any) -> Any:
    config = {"plugin": plugin, "network": {"mode": "bridged", "network": "lan", **network}}
    return agent.ok(
        "vm",
        "create",
        name,
        "--plugin",
        plugin,
        "--config",
        write(tmp_path / f"{name}.json", config),
    )


@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_a_cluster_network_has_a_vni_and_each_host_forwards_to_the_others_guests(
    cluster: Cluster, tmp_path: Path
) -> None:
    first, second = cluster[1], cluster[2]
    made = first.ok("network", "create", "lan", "--subnet", LAN)
    assert (made["vni"], made["mtu"]) == (2, 1450)  # the default network, made at start, has 1
    listed = {network["name"]: network for network in second.ok("network", "list")}
    assert (listed["default"]["vni"], listed["default"]["mtu"]) == (1, 1450)
    assert second.ok("network", "show", "lan")["vni"] == 2
    plugin = write_plugin(tmp_path, "p", network={"mode": "bridged"})
    first.ok("plugin", "install", plugin)
    second.ok("plugin", "install", plugin, "--force")
    a = on_lan(first, tmp_path, "a", "p")
    b = on_lan(second, tmp_path, "b", "p")
    bridge = a["network"]["bridge"]
    h1, h2 = cluster.fabric.host(1), cluster.fabric.host(2)
    flood = "00:00:00:00:00:00"
    gateway = gateway_mac(bridge)

    wait_for(
        lambda: (
            forwarding(h1, 2) == {flood: {vtep_address(2)}, b["network"]["mac"]: {vtep_address(2)}}
        ),
        timeout=CONVERGED,
        what="host1's entries for host2 and b",
    )
    wait_for(
        lambda: (
            forwarding(h2, 2)
            == {
                flood: {vtep_address(1)},
                a["network"]["mac"]: {vtep_address(1)},
                gateway: {vtep_address(1)},
            }
        ),
        timeout=CONVERGED,
        what="host2's entries for host1, a and the gateway",
    )
    ports = links(h2)
    assert (ports["vx2"]["master"], ports["vx2"]["mtu"], ports[bridge]["mtu"]) == (
        bridge,
        1450,
        1450,
    )
    assert ports[b["network"]["tap"]]["mtu"] == 1450
    # the gateway is host1's (which made the bridge first): host2's bridge has no address
    assert addresses(h1, bridge) == ["10.59.0.1/24"]
    assert links(h1)[bridge]["address"] == gateway
    assert addresses(h2, bridge) == []

    second.ok("vm", "rm", "b")
    started = time.monotonic()
    wait_for(
        lambda: b["network"]["mac"] not in forwarding(h1, 2),
        timeout=CONVERGED,
        what="host1 to forget b",
    )
    print(f"b's entry gone from host1 {time.monotonic() - started:.2f}s after vm rm returned")
    # host2 has no VM on lan any more: it has no part, host1 floods to no one
    wait_for(lambda: forwarding(h1, 2) == {}, timeout=CONVERGED, what="host1's flood list empty")
    wait_for(lambda: "vx2" not in links(h2), timeout=CONVERGED, what="host2's vx2 removed")
