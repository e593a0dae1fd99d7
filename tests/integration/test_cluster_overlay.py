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
from tests.cluster import TEST_LOST_AFTER, Cluster, MakeCluster, vtep_address
from tests.harness import (
    DEMO,
    addresses,
    console_of,
    links,
    run,
    wait_for,
    wait_ready,
    write_plugin,
)

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


def install_bridged_plugin(cluster: Cluster, tmp_path: Path) -> None:
    """Plugin `p`, bridged, installed through the first agent and then the second (with
    --force, since the cluster already records it)."""
    plugin = write_plugin(tmp_path, "p", network={"mode": "bridged"})
    cluster[1].ok("plugin", "install", plugin)
    cluster[2].ok("plugin", "install", plugin, "--force")


def on_lan(
    agent: Any, tmp_path: Path, name: str, plugin: str, boot_args: str | None = None, **network: Any
) -> Any:
    """VM `name` made on `agent`'s host on network lan."""
    config: dict[str, Any] = {
        "plugin": plugin,
        "network": {"mode": "bridged", "network": "lan", **network},
    }
    if boot_args is not None:
        config["boot_args"] = boot_args
    path = write(tmp_path / f"{name}.json", config)
    created = agent.ok(
        "vm", "create", name, "--plugin", plugin, "--config", path, "--host", agent.name
    )
    assert created["host"] == agent.name
    return created


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
    install_bridged_plugin(cluster, tmp_path)
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


def qemu_cmdline(vm: dict[str, Any]) -> str:
    return Path(f"/proc/{vm['vmm']['pid']}/cmdline").read_text().replace("\0", " ")


@pytest.mark.e2e
def test_two_qemu_guests_on_different_hosts_ping_and_fetch_each_other_through_vxlan(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(2, "--vmm", "qemu", "--stop-timeout", "1")
    first, second = cluster[1], cluster[2]
    h1 = cluster.fabric.host(1)
    first.ok("network", "create", "lan", "--subnet", LAN)
    first.ok("plugin", "install", DEMO / "plugin.json")
    second.ok("plugin", "install", DEMO / "plugin.json", "--force")
    a_ip, b_ip = "10.59.0.10", "10.59.0.11"
    fetches = {"a": f"roost.probe={b_ip} roost.fetch=http://{b_ip}/"}
    fetches["b"] = f"roost.probe={a_ip} roost.fetch=http://{a_ip}/"
    a = on_lan(first, tmp_path, "a", "roost-demo", ip=a_ip, boot_args=fetches["a"])
    b = on_lan(second, tmp_path, "b", "roost-demo", ip=b_ip, boot_args=fetches["b"])
    for vm in (a, b):
        assert f"roost.nic={vm['network']['mac']},10.59.0." in qemu_cmdline(vm)
        assert ",mtu=1450" in qemu_cmdline(vm)
    wait_ready(first, "a")
    wait_ready(second, "b")

    for agent, name, peer, peer_ip in ((first, "a", "b", b_ip), (second, "b", "a", a_ip)):
        wait_for(
            lambda agent=agent, name=name, peer_ip=peer_ip: (
                f"roost-probe: {peer_ip} reachable" in console_of(agent, name)
            ),
            timeout=60,
            what=f"{name} to ping {peer}",
        )
        wait_for(
            lambda agent=agent, name=name, peer=peer, peer_ip=peer_ip: (
                f"roost-fetch: http://{peer_ip}/ ok {peer} {peer_ip}" in console_of(agent, name)
            ),
            timeout=60,
            what=f"{name} to fetch {peer}'s page",
        )
    # a frame of the network's full MTU (1422 + 8 ICMP + 20 IP = 1450) crosses unfragmented,
    # from the gateway on host1's bridge to b on host2
    done = run("ping", "-M", "do", "-s", "1422", "-c", "3", "-W", "2", b_ip, netns=h1, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    second.ok("vm", "rm", "b")
    wait_for(
        lambda: b["network"]["mac"] not in forwarding(h1, 2),
        timeout=CONVERGED,
        what="host1 to forget b",
    )


@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_the_gateway_hosts_bridge_outlives_its_last_vm_and_restarts_and_serves_other_hosts(
    cluster: Cluster, tmp_path: Path
) -> None:
    first, second = cluster[1], cluster[2]
    install_bridged_plugin(cluster, tmp_path)
    h1, h2 = cluster.fabric.host(1), cluster.fabric.host(2)
    first.ok(
        "vm", "create", "d1", "--plugin", "p", "--host", first.name
    )  # host1 makes roost0 first: the gateway
    first.ok("vm", "rm", "d1")
    assert addresses(h1, "roost0") == ["10.57.0.1/24"]  # kept: no other host may carry it
    # after host1's reboot (its links gone) its agent makes it again at start
    first.stop()
    run("ip", "link", "del", "roost0", netns=h1)
    first.start(timeout=60)
    assert addresses(h1, "roost0") == ["10.57.0.1/24"]
    assert links(h1)["roost0"]["address"] == gateway_mac("roost0")
    d2 = second.ok("vm", "create", "d2", "--plugin", "p", "--host", second.name)
    assert d2["host"] == second.name
    assert addresses(h2, "roost0") == []
    wait_for(
        lambda: forwarding(h1, 1).get(d2["network"]["mac"]) == {vtep_address(2)},
        timeout=CONVERGED,
        what="host1 (the gateway's) to forward to d2",
    )
    assert forwarding(h2, 1)[gateway_mac("roost0")] == {vtep_address(1)}


@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_the_gateway_moves_to_another_host_with_the_bridge_when_its_host_is_lost(
    cluster: Cluster, tmp_path: Path
) -> None:
    first, second = cluster[1], cluster[2]
    install_bridged_plugin(cluster, tmp_path)
    h1, h2 = cluster.fabric.host(1), cluster.fabric.host(2)
    first.ok("vm", "create", "d1", "--plugin", "p", "--host", first.name)  # the gateway's host
    second.ok("vm", "create", "d2", "--plugin", "p", "--host", second.name)
    assert addresses(h2, "roost0") == []

    first.freeze()
    wait_for(
        lambda: addresses(h2, "roost0") == ["10.57.0.1/24"],
        timeout=TEST_LOST_AFTER + 30,
        what="host2's roost0 to carry the gateway once host1 is lost",
    )
    assert links(h2)["roost0"]["address"] == gateway_mac("roost0")

    first.thaw()  # fenced: its roost0 is no longer the gateway's
    wait_for(
        lambda: (
            addresses(h1, "roost0") == []
            and links(h1)["roost0"]["address"] != gateway_mac("roost0")
        ),
        timeout=30,
        what="host1 to take the gateway off its roost0",
    )
    assert addresses(h2, "roost0") == ["10.57.0.1/24"]
