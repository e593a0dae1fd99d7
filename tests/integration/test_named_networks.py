"""Named networks end to end: the real daemon in a throwaway netns makes (and keeps, across a
restart) a managed network's custom bridge, attaches VMs that name a network to its bridge,
leaves an operator's external bridge exactly as it was, and refuses what it must."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, addresses, links, run, write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker]


def vm_with(daemon: Daemon, tmp_path: Path, name: str, network: dict[str, Any]) -> dict[str, Any]:
    """A paused Firecracker VM (its guest cannot run here) of the plugin `plain`, whose config
    has `network`."""
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"network": network}))
    vm = daemon.ok("vm", "create", name, "--plugin", "plain", "--config", config)
    daemon.ok("vm", "pause", name)
    return vm


def install_plain(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "plain"))


def failure(daemon: Daemon, *args: str) -> tuple[int, dict[str, Any]]:
    result = daemon.cli(*args, "--json")
    return result.exit_code, json.loads(result.stdout or result.stderr)["error"]


def master(netns: str, link: str) -> str | None:
    return links(netns)[link].get("master")


def foreign_tables(netns: str) -> dict[str, str]:
    """Every nftables table but roost's own, as `nft list table` prints it."""
    listed = json.loads(run("nft", "-j", "list", "tables", netns=netns).stdout)
    tables = [item["table"] for item in listed["nftables"] if "table" in item]
    return {
        f"{t['family']} {t['name']}": run(
            "nft", "list", "table", t["family"], t["name"], netns=netns
        ).stdout
        for t in tables
        if not t["name"].startswith("roost")
    }


def link_state(netns: str, name: str) -> Any:
    """What an operator set on a link: its addresses, and its IPv4 and IPv6 sysctls."""
    shown = json.loads(run("ip", "-j", "addr", "show", "dev", name, netns=netns).stdout)
    sysctls = run(
        "sh",
        "-c",
        f"grep -rs . /proc/sys/net/ipv4/conf/{name} /proc/sys/net/ipv6/conf/{name} || true",
        netns=netns,
    ).stdout
    return [shown[0]["addr_info"], shown[0]["mtu"], sysctls]


def test_a_custom_bridge_network_carries_its_vms_and_is_kept_until_removed(
    daemon: Daemon, tmp_path: Path
) -> None:
    created = daemon.ok(
        "network", "create", "lan2", "--subnet", "10.77.0.0/24", "--bridge", "br-lan2"
    )
    assert created == {
        "name": "lan2",
        "kind": "managed",
        "managed": True,
        "bridge": "br-lan2",
        "subnet": "10.77.0.0/24",
        "gateway": "10.77.0.1",
        "ipv6_prefix": None,
        "conflist": None,
        "vni": None,
        "mtu": None,
        "leases": [],
    }
    # made at once, before any VM needs it
    assert links(daemon.netns)["br-lan2"]["linkinfo"]["info_kind"] == "bridge"
    assert "10.77.0.1/24" in addresses(daemon.netns, "br-lan2")
    assert daemon.ok("network", "show", "lan2") == created

    install_plain(daemon, tmp_path)
    vm = vm_with(daemon, tmp_path, "on-lan2", {"mode": "bridged", "network": "lan2"})
    net = vm["network"]
    assert (net["network"], net["bridge"], net["subnet"], net["gateway"]) == (
        "lan2",
        "br-lan2",
        "10.77.0.0/24",
        "10.77.0.1",
    )
    assert net["ip"] == "10.77.0.2"
    assert master(daemon.netns, net["tap"]) == "br-lan2"
    assert daemon.ok("network", "show", "lan2")["leases"] == ["10.77.0.2"]

    code, error = failure(daemon, "network", "rm", "lan2")
    assert (code, error["code"]) == (4, "network_in_use")
    assert "on-lan2" in error["message"]

    daemon.ok("vm", "rm", "on-lan2")
    assert net["tap"] not in links(daemon.netns)
    assert "br-lan2" in links(daemon.netns)  # a named network keeps its bridge without leases

    daemon.stop()
    daemon.start()  # recovery reaps what no VM uses, never a named network's bridge
    assert "br-lan2" in links(daemon.netns)
    assert "10.77.0.1/24" in addresses(daemon.netns, "br-lan2")
    assert daemon.ok("network", "show", "lan2") == created

    assert daemon.cli("network", "rm", "lan2").exit_code == 0
    assert "br-lan2" not in links(daemon.netns)
    code, error = failure(daemon, "network", "show", "lan2")
    assert (code, error["code"]) == (3, "not_found")


def test_a_default_bridge_network_survives_a_restart_and_goes_with_network_rm(
    daemon: Daemon,
) -> None:
    created = daemon.ok("network", "create", "lab", "--subnet", "10.78.0.0/24")
    bridge = created["bridge"]
    assert bridge.startswith("rbr")
    assert bridge in links(daemon.netns)
    daemon.stop()
    daemon.start()
    assert bridge in links(daemon.netns)
    assert daemon.cli("network", "rm", "lab").exit_code == 0
    assert bridge not in links(daemon.netns)


def test_an_external_bridge_is_left_exactly_as_the_operator_made_it(
    daemon: Daemon, tmp_path: Path
) -> None:
    netns = daemon.netns
    # the operator's bridge (no link-local address: the kernel would add one, not roost, once a
    # first port brings its carrier up)
    run("ip", "link", "add", "br-ext", "type", "bridge", netns=netns)
    run("ip", "link", "set", "br-ext", "addrgenmode", "none", netns=netns)
    run("ip", "addr", "add", "192.168.77.1/24", "dev", "br-ext", netns=netns)
    run("ip", "link", "set", "br-ext", "up", netns=netns)
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input="table inet operator {\n chain forward {\n"
        "  type filter hook forward priority 0; policy accept;\n"
        '  iifname "br-ext" counter accept\n }\n}\n',
        text=True,
        check=True,
    )
    before = (link_state(netns, "br-ext"), foreign_tables(netns))

    external = daemon.ok(
        "network",
        "create",
        "ext1",
        "--external",
        "--bridge",
        "br-ext",
        "--subnet",
        "192.168.77.0/24",
    )
    assert (external["kind"], external["managed"], external["gateway"]) == (
        "external",
        False,
        "192.168.77.1",
    )
    install_plain(daemon, tmp_path)
    # bridged on an external network with a subnet: roost assigns the address, not the bridge
    bridged = vm_with(daemon, tmp_path, "ext-static", {"mode": "bridged", "network": "ext1"})
    assert bridged["network"]["ip"] == "192.168.77.2"
    dhcp = vm_with(daemon, tmp_path, "ext-dhcp", {"mode": "dhcp", "network": "ext1"})
    for vm in (bridged, dhcp):
        assert vm["network"]["bridge"] == "br-ext"
        assert master(netns, vm["network"]["tap"]) == "br-ext"
    assert (link_state(netns, "br-ext"), foreign_tables(netns)) == before

    for name in ("ext-static", "ext-dhcp"):
        daemon.ok("vm", "stop", name)
    assert (link_state(netns, "br-ext"), foreign_tables(netns)) == before
    daemon.ok("vm", "start", "ext-static")
    daemon.ok("vm", "pause", "ext-static")
    assert (link_state(netns, "br-ext"), foreign_tables(netns)) == before

    code, error = failure(daemon, "network", "rm", "ext1")
    assert (code, error["code"]) == (4, "network_in_use")
    for name in ("ext-static", "ext-dhcp"):
        daemon.ok("vm", "rm", name)
    assert daemon.cli("network", "rm", "ext1").exit_code == 0
    assert (link_state(netns, "br-ext"), foreign_tables(netns)) == before  # still the operator's


def test_the_dhcp_bridge_is_the_external_network_dhcp(daemon: Daemon) -> None:
    dhcp = daemon.ok("network", "show", "dhcp")
    assert (dhcp["kind"], dhcp["managed"], dhcp["bridge"], dhcp["subnet"]) == (
        "external",
        False,
        "brdhcp",
        None,
    )
    code, error = failure(daemon, "network", "rm", "dhcp")
    assert (code, error["code"]) == (4, "conflict")


def test_refusals_say_what_was_wrong(daemon: Daemon, tmp_path: Path) -> None:
    netns = daemon.netns
    code, error = failure(
        daemon, "network", "create", "long", "--subnet", "10.79.0.0/24", "--bridge", "b" * 16
    )
    assert (code, error["code"], error["details"][0]["loc"]) == (1, "invalid", "bridge")

    run("ip", "link", "add", "veth-op", "type", "veth", "peer", "name", "veth-op1", netns=netns)
    code, error = failure(
        daemon, "network", "create", "onveth", "--subnet", "10.79.0.0/24", "--bridge", "veth-op"
    )
    assert (code, error["code"]) == (4, "conflict")
    assert "veth" in error["message"]
    assert (
        "addr_info" in json.loads(run("ip", "-j", "addr", "show", "veth-op", netns=netns).stdout)[0]
    )

    run("ip", "link", "add", "br-op", "type", "bridge", netns=netns)
    code, error = failure(
        daemon, "network", "create", "taken", "--subnet", "10.79.0.0/24", "--bridge", "br-op"
    )
    assert (code, error["code"]) == (4, "conflict")
    assert addresses(netns, "br-op") == []

    code, error = failure(daemon, "network", "create", "wide", "--subnet", "10.57.0.0/16")
    assert (code, error["code"]) == (4, "subnet_overlap")
    assert "'default'" in error["message"]

    daemon.ok("network", "create", "one", "--subnet", "10.80.0.0/24", "--bridge", "br-one")
    code, error = failure(
        daemon, "network", "create", "two", "--subnet", "10.81.0.0/24", "--bridge", "br-one"
    )
    assert (code, error["code"]) == (4, "conflict")
    code, error = failure(
        daemon, "network", "create", "one-again", "--external", "--bridge", "br-one"
    )
    assert (code, error["code"]) == (4, "conflict")

    for reserved in ("default", "dhcp", "net-x"):
        code, error = failure(daemon, "network", "create", reserved, "--subnet", "10.82.0.0/24")
        assert (code, error["details"][0]["loc"]) == (1, "name")
    code, error = failure(
        daemon, "network", "create", "v6", "--subnet", "10.82.0.0/24", "--ipv6-prefix", "fe80::/64"
    )
    assert (code, error["details"][0]["loc"]) == (1, "ipv6_prefix")

    install_plain(daemon, tmp_path)
    config = tmp_path / "unknown.json"
    config.write_text(json.dumps({"network": {"mode": "bridged", "network": "nowhere"}}))
    code, error = failure(
        daemon, "vm", "create", "lost", "--plugin", "plain", "--config", str(config)
    )
    assert (code, error["details"][0]["loc"]) == (1, "network.network")
    assert "nowhere" in error["details"][0]["msg"]
    assert "lost" not in [vm["name"] for vm in daemon.ok("vm", "list")]


def nat_table(netns: str) -> str:
    listed = run("nft", "list", "table", "ip", "roost_nat", netns=netns, check=False)
    return listed.stdout if listed.returncode == 0 else ""


def test_nat_covers_named_managed_networks_and_never_an_external_one(netns: str) -> None:
    run("ip", "link", "add", "br-ext", "type", "bridge", netns=netns)
    daemon = Daemon(netns, "--nat").start()
    try:
        daemon.ok("network", "create", "lab", "--subnet", "10.84.0.0/24", "--bridge", "br-lab")
        daemon.ok(
            "network",
            "create",
            "ext",
            "--external",
            "--bridge",
            "br-ext",
            "--subnet",
            "10.85.0.0/24",
        )
        rule = 'ip saddr 10.84.0.0/24 oifname != "br-lab" masquerade'
        assert rule in nat_table(netns)
        assert "10.85.0.0/24" not in nat_table(netns)
        daemon.stop()
        daemon.start()  # reconciled at start (with --nat again): still there
        assert rule in nat_table(netns)
        assert "10.85.0.0/24" not in nat_table(netns)
        assert daemon.cli("network", "rm", "lab").exit_code == 0
        assert "10.84.0.0/24" not in nat_table(netns)
    finally:
        daemon.close()
