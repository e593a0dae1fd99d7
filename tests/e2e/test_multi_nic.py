"""A VM with several interfaces end to end: a real guest under QEMU/TCG with a static address on
a named managed network and a DHCP lease from an operator's external bridge, seen from inside
the guest (its console), from the namespace (HTTP on both addresses) and in the host state roost
made for each interface (taps, anti-spoofing chains, leases), all gone with the VM."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_guests import DHCPServer
from tests.harness import (
    Daemon,
    http_get,
    links,
    run,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.root, pytest.mark.e2e]

LAN_SUBNET, LAN_GATEWAY, STATIC_IP = "10.61.0.0/24", "10.61.0.1", "10.61.0.5"
EXT_BRIDGE, EXT_NET = "br-ext", "10.62.0"
EXT_ROUTER = f"{EXT_NET}.1"  # the operator's bridge address, which its DHCP server hands out


@pytest.fixture
def dhcp_server(netns: str) -> Iterator[DHCPServer]:
    server = DHCPServer(netns, EXT_BRIDGE, EXT_NET, router=True)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def daemon(netns: str, dhcp_server: DHCPServer, demo_plugin: Path) -> Iterator[Daemon]:
    """A QEMU daemon with the demo plugin, the managed network `lan` and the external `ext`."""
    instance = Daemon(netns, "--vmm", "qemu").start()
    try:
        instance.ok("plugin", "install", demo_plugin)
        instance.ok("network", "create", "lan", "--subnet", LAN_SUBNET)
        instance.ok("network", "create", "ext", "--external", "--bridge", EXT_BRIDGE)
        yield instance
    finally:
        instance.close()


def reported_nics(console: str) -> dict[str, tuple[str, list[str]]]:
    """The guest's `roost-nic: <dev> <mac> <addrs...>` lines: device and addresses by MAC."""
    nics = {}
    for line in re.findall(r"^roost-nic: (.*)$", console, re.MULTILINE):
        dev, mac, *addresses = line.split()
        nics[mac] = (dev, addresses)
    return nics


def antispoof_chains(netns: str) -> tuple[dict[str, str], set[str]]:
    """roost's nftables table as `nft -j` lists it: the chain each tap jumps to, and every
    chain."""
    ruleset = json.loads(run("nft", "-j", "list", "ruleset", netns=netns).stdout)["nftables"]
    jumps: dict[str, str] = {}
    chains: set[str] = set()
    for item in ruleset:
        if "map" in item and (item["map"]["table"], item["map"]["name"]) == ("roost", "taps"):
            jumps |= {
                tap: verdict["jump"]["target"] for tap, verdict in item["map"].get("elem", [])
            }
        elif "chain" in item and item["chain"]["table"] == "roost":
            chains.add(item["chain"]["name"])
    return jumps, chains


def observed_ip(daemon: Daemon, name: str, index: int) -> Any:
    return daemon.ok("vm", "show", name)["interfaces"][index]["observed_ip"]


def test_a_vm_with_a_static_and_a_dhcp_interface_is_reached_on_both_and_routes_by_the_first(
    netns: str, daemon: Daemon, dhcp_server: DHCPServer
) -> None:
    lan_bridge = daemon.ok("network", "show", "lan")["bridge"]
    vm = daemon.ok(
        "vm",
        "create",
        "mn-1",
        "--plugin",
        "roost-demo",
        "--interface",
        f"mode=bridged,network=lan,ip={STATIC_IP}",
        "--interface",
        "mode=dhcp,network=ext",
    )
    assert vm["network"] is None
    lan, ext = vm["interfaces"]
    assert (lan["name"], lan["mode"], lan["network"], lan["bridge"], lan["ip"]) == (
        "eth0",
        "bridged",
        "lan",
        lan_bridge,
        STATIC_IP,
    )
    assert (ext["name"], ext["mode"], ext["network"], ext["bridge"], ext["ip"]) == (
        "eth1",
        "dhcp",
        "ext",
        EXT_BRIDGE,
        None,
    )
    assert (lan["default_route"], ext["default_route"]) == (True, False)
    assert lan["tap"] != ext["tap"] and lan["mac"] != ext["mac"]
    host_links = links(netns)
    assert host_links[lan["tap"]]["master"] == lan_bridge
    assert host_links[ext["tap"]]["master"] == EXT_BRIDGE
    jumps, chains = antispoof_chains(netns)
    guarded = {jumps[lan["tap"]], jumps[ext["tap"]]}
    assert len(guarded) == 2 and guarded <= chains  # a chain of its own for each tap
    assert daemon.ok("network", "show", "lan")["leases"] == [STATIC_IP]

    console = wait_ready(daemon, "mn-1")
    lease = wait_for(lambda: dhcp_server.lease_of(ext["mac"]), what="dnsmasq's lease")
    assert lease.startswith(f"{EXT_NET}.")
    observed = wait_for(lambda: observed_ip(daemon, "mn-1", 1), what="roost to observe it")
    assert observed == lease
    assert reported_nics(console) == {
        lan["mac"]: ("eth0", [f"{STATIC_IP}/24"]),
        ext["mac"]: ("eth1", [f"{lease}/24"]),
    }
    assert f"roost-route: ipv4 default via {LAN_GATEWAY} dev eth0\n" in console
    # the page names the address of the interface with the default route
    assert http_get(netns, f"http://{STATIC_IP}/") == f"mn-1 {STATIC_IP}\n"
    assert http_get(netns, f"http://{lease}/") == f"mn-1 {STATIC_IP}\n"

    daemon.ok("vm", "rm", "mn-1")
    assert not {lan["tap"], ext["tap"]} & set(links(netns))
    jumps, chains = antispoof_chains(netns)
    assert not {lan["tap"], ext["tap"]} & set(jumps)
    assert not guarded & chains
    assert daemon.ok("network", "show", "lan")["leases"] == []
    assert daemon.ok("network", "show", "ext")["leases"] == []


def test_the_dhcp_interface_given_the_default_route_routes_through_the_dhcp_router(
    netns: str, daemon: Daemon, dhcp_server: DHCPServer, tmp_path: Path
) -> None:
    config = tmp_path / "mn-2.json"
    config.write_text(
        json.dumps(
            {
                "plugin": "roost-demo",
                "interfaces": [
                    {"mode": "bridged", "network": "lan", "auto_assign": True},
                    {"mode": "dhcp", "network": "ext", "default_route": True},
                ],
            }
        )
    )
    vm = daemon.ok("vm", "create", "mn-2", "--plugin", "roost-demo", "--config", config)
    lan, ext = vm["interfaces"]
    assert (lan["default_route"], ext["default_route"]) == (False, True)

    console = wait_ready(daemon, "mn-2")
    lease = wait_for(lambda: dhcp_server.lease_of(ext["mac"]), what="dnsmasq's lease")
    assert reported_nics(console) == {
        lan["mac"]: ("eth0", [f"{lan['ip']}/24"]),
        ext["mac"]: ("eth1", [f"{lease}/24"]),
    }
    assert f"roost-route: ipv4 default via {EXT_ROUTER} dev eth1\n" in console
    assert http_get(netns, f"http://{lease}/") == f"mn-2 {lease}\n"
    assert http_get(netns, f"http://{lan['ip']}/") == f"mn-2 {lease}\n"
