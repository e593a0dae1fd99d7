"""Several interfaces per VM end to end: the real daemon in a throwaway netns gives a
Firecracker VM one NIC, tap and anti-spoofing chain per interface (a managed named network with
a static address, an operator's external bridge with dhcp), tells its guest about each by MAC
(`roost.nic=`), and leaves nothing after a removal, a failed create, or a daemon killed in the
middle of a create and restarted. Firecracker VMs are paused right after their create (their
guest cannot run here)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Daemon, links, run, wait_for, write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker]

LAN = "10.71.0.0/24"
EXTERNAL_BRIDGE = "br-ext"
TWO = [
    {"mode": "bridged", "network": "lan", "ip": "10.71.0.5"},
    {"mode": "dhcp", "network": "ext", "name": "wan"},
]


def networks_and_plugin(daemon: Daemon, tmp_path: Path) -> None:
    """The managed network `lan`, the operator's bridge registered as `ext`, plugin `plain`."""
    daemon.ok("network", "create", "lan", "--subnet", LAN)
    run("ip", "link", "add", EXTERNAL_BRIDGE, "type", "bridge", netns=daemon.netns)
    run("ip", "link", "set", EXTERNAL_BRIDGE, "up", netns=daemon.netns)
    daemon.ok("network", "create", "ext", "--external", "--bridge", EXTERNAL_BRIDGE)
    daemon.ok("plugin", "install", write_plugin(tmp_path, "plain"))


def create(daemon: Daemon, name: str, interfaces: list[dict[str, Any]]) -> httpx.Response:
    body = {"name": name, "plugin": "plain", "interfaces": interfaces}
    return daemon.http.post("/v1/vms", json=body)


def taps(netns: str) -> dict[str, str | None]:
    """roost's taps in the namespace, with the bridge each is on."""
    return {
        name: link.get("master") for name, link in links(netns).items() if name.startswith("rtap")
    }


def chains(netns: str) -> set[str]:
    """The taps that have an anti-spoofing chain."""
    ruleset = json.loads(run("nft", "-j", "list", "ruleset", netns=netns).stdout)
    return {
        item["chain"]["name"].removeprefix("vm-")
        for item in ruleset["nftables"]
        if "chain" in item and item["chain"]["name"].startswith("vm-")
    }


def leases(daemon: Daemon) -> dict[str, list[str]]:
    return {network["name"]: network["leases"] for network in daemon.ok("network", "list")}


def assert_only(daemon: Daemon, names: set[str]) -> None:
    """Nothing on the host or in the database but what VMs `names` hold."""
    vms = {vm["name"]: vm for vm in daemon.ok("vm", "list")}
    assert set(vms) == names
    held = {i["tap"] for vm in vms.values() for i in vm["interfaces"] if i["tap"]}
    assert set(taps(daemon.netns)) == held
    assert chains(daemon.netns) == held
    ips = {i["ip"] for vm in vms.values() for i in vm["interfaces"] if i["ip"]}
    assert {ip for held_ips in leases(daemon).values() for ip in held_ips} == ips
    assert {path.name for path in (daemon.run_dir / "vms").iterdir()} == names


def test_a_vm_with_two_interfaces_gets_two_nics_taps_and_chains_and_leaves_nothing(
    daemon: Daemon, tmp_path: Path
) -> None:
    networks_and_plugin(daemon, tmp_path)
    answer = create(daemon, "two", TWO)
    assert answer.status_code == 201, answer.text
    vm = answer.json()
    daemon.ok("vm", "pause", "two")
    lan, wan = vm["interfaces"]
    assert vm["network"] is None
    # the first VM: index 0 keeps today's name, the next ones carry their index
    assert (lan["tap"], wan["tap"]) == ("rtap1", "rtap1n1")
    assert (lan["ip"], lan["default_route"], wan["ip"], wan["default_route"]) == (
        "10.71.0.5",
        True,
        None,
        False,
    )
    lan_bridge = daemon.ok("network", "show", "lan")["bridge"]
    assert taps(daemon.netns) == {lan["tap"]: lan_bridge, wan["tap"]: EXTERNAL_BRIDGE}
    assert chains(daemon.netns) == {lan["tap"], wan["tap"]}

    told = daemon.firecracker_config(vm)
    nics = [(nic["host_dev_name"], nic["guest_mac"]) for nic in told["network-interfaces"]]
    assert nics == [(lan["tap"], lan["mac"]), (wan["tap"], wan["mac"])]
    boot_args = told["boot-source"]["boot_args"].split()
    assert f"roost.nic={lan['mac']},10.71.0.5/24,10.71.0.1,name=eth0" in boot_args
    assert f"roost.nic={wan['mac']},dhcp,name=wan" in boot_args
    assert f"roost.default={lan['mac']}" in boot_args
    assert not any(arg.startswith("ip=") for arg in boot_args)
    assert leases(daemon)["lan"] == ["10.71.0.5"]

    daemon.ok("vm", "rm", "two")
    assert_only(daemon, set())
    assert EXTERNAL_BRIDGE in links(daemon.netns) and lan_bridge in links(daemon.netns)


def test_a_create_refused_at_its_second_interface_leaves_nothing(
    daemon: Daemon, tmp_path: Path
) -> None:
    networks_and_plugin(daemon, tmp_path)
    assert create(daemon, "first", TWO[:1]).status_code == 201
    daemon.ok("vm", "pause", "first")
    # its first interface is fine; its second asks for the address `first` holds
    refused = create(daemon, "second", [TWO[1], TWO[0]])
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "ip_taken"
    assert_only(daemon, {"first"})


def test_a_daemon_killed_in_the_middle_of_a_create_leaves_nothing_once_restarted(
    netns: str, tmp_path: Path
) -> None:
    daemon = Daemon(netns, env={"ROOST_FAILPOINT": "create:allocated"})
    try:
        daemon.start()
        networks_and_plugin(daemon, tmp_path)
        with pytest.raises(httpx.TransportError):
            create(daemon, "cut", TWO)
        assert daemon.process is not None
        assert daemon.process.wait(30) == -signal.SIGKILL
        daemon.process = None
        daemon.env.clear()
        daemon.start()
        wait_for(
            lambda: daemon.http.get("/healthz").json()["status"] == "ok",
            timeout=60,
            what="the daemon to finish recovering",
        )
        assert_only(daemon, set())
        assert leases(daemon)["lan"] == []
    finally:
        daemon.close()
