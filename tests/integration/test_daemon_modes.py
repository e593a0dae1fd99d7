"""Each network mode end to end: the real daemon, real taps and bridges in a throwaway netns,
and the real Firecracker binary, checked through Firecracker's own `GET /vm/config`."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from tests.harness import EXAMPLES, Daemon, addresses, links, process_alive, run, wait_for

pytestmark = [pytest.mark.root, pytest.mark.firecracker]

SECURE = EXAMPLES / "secure-worker" / "plugin.json"
WEB = EXAMPLES / "web-service" / "plugin.json"
DHCP_VM = EXAMPLES / "web-service" / "vm-dhcp.json"


def assert_tap(daemon: Daemon, vm: dict[str, Any], bridge: str) -> None:
    tap = links(daemon.netns)[vm["network"]["tap"]]
    assert "UP" in tap["flags"]
    assert tap["master"] == bridge
    assert tap["linkinfo"]["info_kind"] == "tun"
    assert tap["address"] != vm["network"]["mac"]


def assert_gone(daemon: Daemon, vm: dict[str, Any]) -> None:
    """`vm rm` left no tap, rules, socket, run dir, process or lease."""
    tap = vm["network"]["tap"]
    assert tap is None or tap not in links(daemon.netns)
    if tap is not None:
        table = run("nft", "list", "table", "bridge", "roost", netns=daemon.netns).stdout
        assert tap not in table
    assert not (daemon.run_dir / "vms" / vm["name"]).exists()
    if vm["vmm"]["pid"]:
        assert not process_alive(vm["vmm"]["pid"])
    held = [ip for n in daemon.ok("network", "list") for ip in n["leases"]]
    assert vm["network"]["ip"] not in held


@pytest.mark.kvm
def test_the_seed_examples_end_to_end(daemon: Daemon) -> None:
    daemon.ok("plugin", "install", SECURE)
    daemon.ok("plugin", "install", WEB)

    # secure-worker: the plugin's vsock default -> no NIC at all, a vsock device with its CID
    worker = daemon.ok("vm", "create", "worker-1", "--plugin", "secure-worker")
    daemon.ok("vm", "pause", "worker-1")  # the guest cannot run here; do not let it spin
    config = daemon.firecracker_config(worker)
    assert config["network-interfaces"] == []
    assert config["vsock"]["guest_cid"] == worker["vsock"]["cid"] >= 3
    assert config["vsock"]["uds_path"] == worker["vsock"]["uds_path"]
    assert (worker["vsock"]["available"], worker["vsock"]["reason"]) == (True, None)
    assert worker["network"] == {
        "mode": "vsock",
        "source": "plugin",
        "subnet": None,
        "gateway": None,
        "auto_assign": None,
        "ip": None,
        "mac": None,
        "bridge": None,
        "tap": None,
        "observed_ip": None,
    }
    assert not [name for name in links(daemon.netns) if name.startswith("rtap")]

    # web-service: the plugin's bridged auto-assign default
    web = daemon.ok("vm", "create", "web-1", "--plugin", "web-service")
    daemon.ok("vm", "pause", "web-1")
    net = web["network"]
    assert (net["mode"], net["source"], net["subnet"], net["gateway"], net["auto_assign"]) == (
        "bridged",
        "plugin",
        "10.100.0.0/24",
        "10.100.0.1",
        True,
    )
    assert ipaddress.IPv4Address(net["ip"]) in ipaddress.IPv4Network("10.100.0.0/24")
    config = daemon.firecracker_config(web)
    [nic] = config["network-interfaces"]
    assert (nic["host_dev_name"], nic["guest_mac"]) == (net["tap"], net["mac"])
    boot = config["boot-source"]["boot_args"]
    assert f"ip={net['ip']}::10.100.0.1:255.255.255.0:web-1:eth0:off" in boot
    assert "roost.name=web-1" in boot
    assert config["vsock"]["guest_cid"] == web["vsock"]["cid"]
    assert_tap(daemon, web, net["bridge"])
    assert addresses(daemon.netns, net["bridge"]) == ["10.100.0.1/24"]
    rules = run(
        "nft", "list", "chain", "bridge", "roost", f"vm-{net['tap']}", netns=daemon.netns
    ).stdout
    assert f"ether saddr != {net['mac']} drop" in rules
    assert f"ip saddr != {net['ip']} drop" in rules

    # the seed's dhcp override of web-service
    dhcp = daemon.ok("vm", "create", "web-2", "--plugin", "web-service", "--config", DHCP_VM)
    daemon.ok("vm", "pause", "web-2")
    assert (dhcp["network"]["mode"], dhcp["network"]["source"]) == ("dhcp", "vm")
    assert dhcp["network"]["ip"] is None
    config = daemon.firecracker_config(dhcp)
    [nic] = config["network-interfaces"]
    assert (nic["host_dev_name"], nic["guest_mac"]) == (
        dhcp["network"]["tap"],
        dhcp["network"]["mac"],
    )
    assert config["boot-source"]["boot_args"].endswith("roost.name=web-2 ip=dhcp")
    assert_tap(daemon, dhcp, "brdhcp")

    for vm in (worker, web, dhcp):
        assert daemon.cli("vm", "rm", vm["name"]).exit_code == 0
        assert_gone(daemon, vm)
    # the web-service network lost its last lease: its bridge and record are gone
    assert net["bridge"] not in links(daemon.netns)
    # left: the default network, and --dhcp-bridge's external network `dhcp`
    assert [n["name"] for n in daemon.ok("network", "list")] == ["default", "dhcp"]
    assert "brdhcp" in links(daemon.netns)  # the operator's bridge is never touched


@pytest.mark.kvm
def test_manual_ip_and_the_default_network(daemon: Daemon, tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text(WEB.read_text().replace('"web-service"', '"plain"'))
    daemon.ok("plugin", "install", WEB)
    vm = daemon.ok(
        "vm",
        "create",
        "pinned",
        "--plugin",
        "web-service",
        "--network-ip",
        "10.100.0.7",
        "--no-start",
    )
    assert (vm["network"]["ip"], vm["network"]["auto_assign"], vm["status"]) == (
        "10.100.0.7",
        False,
        "created",
    )
    assert vm["network"]["tap"] is not None
    assert vm["network"]["tap"] not in links(daemon.netns)  # the link exists only while running

    taken = daemon.cli(
        "vm", "create", "thief", "--plugin", "web-service", "--network-ip", "10.100.0.7", "--json"
    )
    assert taken.exit_code == 4
    error = taken.json()["error"]
    assert error["code"] == "ip_taken"
    assert "pinned" in error["message"]

    started = daemon.ok("vm", "start", "pinned")
    daemon.ok("vm", "pause", "pinned")
    boot = daemon.firecracker_config(started)["boot-source"]["boot_args"]
    assert "ip=10.100.0.7::10.100.0.1:255.255.255.0:pinned:eth0:off" in boot

    default = daemon.ok(
        "vm", "create", "dflt", "--plugin", "web-service", "--network-mode", "vsock", "--no-start"
    )
    assert default["network"]["mode"] == "vsock"
    overlap = daemon.cli(
        "vm",
        "create",
        "ov",
        "--plugin",
        "web-service",
        "--network-subnet",
        "10.100.0.0/16",
        "--network-auto-assign",
        "--no-start",
        "--json",
    )
    assert overlap.exit_code == 4
    assert overlap.json()["error"]["code"] == "subnet_overlap"
    assert "net-10-100-0-0-24" in overlap.json()["error"]["message"]


def test_dhcp_needs_a_dhcp_bridge(netns: str) -> None:
    daemon = Daemon(netns).start()
    try:
        daemon.ok("plugin", "install", WEB)
        result = daemon.cli(
            "vm", "create", "d", "--plugin", "web-service", "--network-mode", "dhcp", "--json"
        )
        assert result.exit_code == 1
        error = result.json()["error"]
        assert error["code"] == "invalid"
        assert [d["loc"] for d in error["details"]] == ["network.mode"]
        assert "--dhcp-bridge" in error["message"]
        assert daemon.ok("vm", "list") == []
        response = daemon.http.post(
            "/v1/vms", json={"name": "d", "plugin": "web-service", "network": {"mode": "dhcp"}}
        )
        assert response.status_code == 422
    finally:
        daemon.close()


@pytest.mark.kvm
def test_stop_removes_the_tap_and_reaps_the_vmm(daemon: Daemon) -> None:
    daemon.ok("plugin", "install", WEB)
    vm = daemon.ok("vm", "create", "s", "--plugin", "web-service")
    pid, tap = vm["vmm"]["pid"], vm["network"]["tap"]
    assert process_alive(pid)
    stopped = daemon.ok("vm", "stop", "s", "--timeout", "0.2")
    assert stopped["status"] == "stopped"
    assert stopped["exit_code"] is not None
    assert stopped["vmm"] == {"kind": "firecracker", "pid": None, "api_socket": None}
    assert not process_alive(pid)
    assert tap not in links(daemon.netns)
    assert not list((daemon.run_dir / "vms" / "s").glob("*.sock"))
    # stopping keeps the leases; the VM starts again with the same address and MAC
    again = daemon.ok("vm", "start", "s")
    daemon.ok("vm", "pause", "s")
    assert (again["network"]["ip"], again["network"]["mac"]) == (
        vm["network"]["ip"],
        vm["network"]["mac"],
    )
    forced = daemon.ok("vm", "stop", "s", "--force")
    assert forced["exit_code"] == -9
    wait_for(lambda: not process_alive(again["vmm"]["pid"]), what="the VMM to be gone")
