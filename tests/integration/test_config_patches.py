"""Changing a VM after it is created, through the real daemon and Firecracker: one VM walked
through every network mode, what Firecracker itself was told after each restart, patch-time
conflicts that change nothing, and versions that survive a daemon restart."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, links, write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]

FIRST, SECOND = "10.91.0.0/24", "10.92.0.0/24"


def install_on_first(daemon: Daemon, directory: Path) -> None:
    """Plugin `p`: bridged, auto-assigned on FIRST."""
    network = {"mode": "bridged", "subnet": FIRST, "auto_assign": True}
    daemon.ok("plugin", "install", write_plugin(directory, "p", network=network))


def leases(daemon: Daemon) -> dict[str, list[str]]:
    return {n["subnet"]: n["leases"] for n in daemon.ok("network", "list") if n["leases"]}


def taps(daemon: Daemon) -> dict[str, str | None]:
    """Each roost tap in the namespace and the bridge it is a port of."""
    found = links(daemon.netns)
    return {name: link.get("master") for name, link in found.items() if name.startswith("rtap")}


def patched(daemon: Daemon, name: str, *flags: str) -> dict[str, Any]:
    """Patch with --restart, then pause (a Firecracker guest must be paused to stay alive
    here); the VM as it then is."""
    version = daemon.ok("vm", "config", "patch", name, *flags, "--restart")
    vm = daemon.ok("vm", "pause", name)
    assert (vm["config_version"], vm["running_version"]) == (version["version"],) * 2
    assert vm["restart_required"] is False
    return vm


def check_firecracker(daemon: Daemon, vm: dict[str, Any]) -> dict[str, Any]:
    """What Firecracker was told matches the VM's JSON: NIC (tap and MAC), ip= and vsock."""
    told = daemon.firecracker_config(vm)
    network = vm["network"]
    nics = told.get("network-interfaces") or []
    boot_args = told["boot-source"]["boot_args"]
    if network["tap"] is None:
        assert nics == []
        assert "ip=" not in boot_args
    else:
        assert [(n["host_dev_name"], n["guest_mac"]) for n in nics] == [
            (network["tap"], network["mac"])
        ]
    assert told["vsock"]["guest_cid"] == vm["vsock"]["cid"]
    return told


def test_one_vm_walks_through_every_network_mode(daemon: Daemon, tmp_path: Path) -> None:
    install_on_first(daemon, tmp_path)
    vm = daemon.ok("vm", "create", "walker", "--plugin", "p")
    vm = daemon.ok("vm", "pause", "walker")
    mac, cid = vm["network"]["mac"], vm["vsock"]["cid"]
    assert vm["network"]["ip"] == "10.91.0.2"
    assert taps(daemon) == {vm["network"]["tap"]: vm["network"]["bridge"]}
    check_firecracker(daemon, vm)

    # bridged (auto) -> vsock: no NIC, no tap, no address; the bridge goes with its last lease
    vm = patched(daemon, "walker", "--network-mode", "vsock")
    assert (vm["network"]["mode"], vm["network"]["ip"], vm["network"]["tap"]) == (
        "vsock",
        None,
        None,
    )
    assert taps(daemon) == {}
    assert leases(daemon) == {}
    assert "rbr" not in " ".join(links(daemon.netns))
    check_firecracker(daemon, vm)

    # vsock -> dhcp: a tap on the operator's bridge, ip=dhcp
    vm = patched(daemon, "walker", "--network-mode", "dhcp")
    assert (vm["network"]["mode"], vm["network"]["bridge"]) == ("dhcp", "brdhcp")
    assert taps(daemon) == {vm["network"]["tap"]: "brdhcp"}
    assert "ip=dhcp" in check_firecracker(daemon, vm)["boot-source"]["boot_args"]
    assert leases(daemon) == {}

    # dhcp -> bridged with a manual address
    vm = patched(
        daemon,
        "walker",
        "--network-mode",
        "bridged",
        "--network-subnet",
        FIRST,
        "--network-gateway",
        "10.91.0.1",
        "--network-ip",
        "10.91.0.50",
    )
    assert vm["network"]["ip"] == "10.91.0.50"
    assert leases(daemon) == {FIRST: ["10.91.0.50"]}
    assert taps(daemon) == {vm["network"]["tap"]: vm["network"]["bridge"]}
    told = check_firecracker(daemon, vm)
    assert (
        "ip=10.91.0.50::10.91.0.1:255.255.255.0:walker:eth0:off" in told["boot-source"]["boot_args"]
    )

    # bridged on another subnet: a new network and bridge, the old ones gone
    old_bridge = vm["network"]["bridge"]
    vm = patched(
        daemon,
        "walker",
        "--network-subnet",
        SECOND,
        "--network-gateway",
        "10.92.0.1",
        "--network-ip",
        "10.92.0.7",
    )
    assert (vm["network"]["subnet"], vm["network"]["ip"]) == (SECOND, "10.92.0.7")
    assert leases(daemon) == {SECOND: ["10.92.0.7"]}
    assert taps(daemon) == {vm["network"]["tap"]: vm["network"]["bridge"]}
    assert vm["network"]["bridge"] != old_bridge
    assert old_bridge not in links(daemon.netns)
    check_firecracker(daemon, vm)

    # the VM kept its identity all the way
    assert (vm["network"]["mac"], vm["vsock"]["cid"]) == (mac, cid)
    history = daemon.ok("vm", "config", "history", "walker")
    assert [v["version"] for v in history] == [5, 4, 3, 2, 1]
    assert [v["effective"]["network"]["mode"] for v in history] == [
        "bridged",
        "bridged",
        "dhcp",
        "vsock",
        "bridged",
    ]
    assert history[-1]["effective"]["network"]["ip"] == "10.91.0.2"  # kept in the history


def test_a_running_vm_holds_both_addresses_until_its_restart(
    daemon: Daemon, tmp_path: Path
) -> None:
    install_on_first(daemon, tmp_path)
    daemon.ok("vm", "create", "r", "--plugin", "p")
    daemon.ok("vm", "pause", "r")
    result = daemon.cli("vm", "config", "patch", "r", "--network-ip", "10.91.0.9")
    assert result.exit_code == 0, result.stderr
    assert "restart required" in result.stdout
    assert re.search(r"effective.network.ip +10.91.0.2 -> 10.91.0.9", result.stdout)
    vm = daemon.ok("vm", "show", "r")
    assert (vm["restart_required"], vm["running_version"], vm["config_version"]) == (True, 1, 2)
    assert vm["network"]["ip"] == "10.91.0.2"  # what it runs with
    assert leases(daemon) == {FIRST: ["10.91.0.2", "10.91.0.9"]}
    assert "paused*" in daemon.cli("vm", "list").stdout

    # a second VM cannot take the reserved address meanwhile
    taken = daemon.cli(
        "vm", "create", "s", "--plugin", "p", "--network-ip", "10.91.0.9", "--no-start", "--json"
    )
    assert (taken.exit_code, taken.json()["error"]["code"]) == (4, "ip_taken")

    restarted = daemon.ok("vm", "restart", "r")
    assert (restarted["restart_required"], restarted["running_version"]) == (False, 2)
    assert restarted["network"]["ip"] == "10.91.0.9"
    assert leases(daemon) == {FIRST: ["10.91.0.9"]}


@pytest.mark.parametrize(
    ("flags", "exit_code", "code"),
    [
        (["--network-ip", "10.91.0.2"], 4, "ip_taken"),
        (["--network-subnet", "10.91.0.0/16", "--network-auto-assign"], 4, "subnet_overlap"),
        (["--network-mode", "dhcp"], 1, "invalid"),
        (["--vcpus", "0"], 1, "invalid"),
    ],
)
def test_conflicts_at_patch_time_change_nothing(
    netns: str, tmp_path: Path, flags: list[str], exit_code: int, code: str
) -> None:
    daemon = Daemon(netns).start()  # no --dhcp-bridge: dhcp is refused as a create would be
    try:
        install_on_first(daemon, tmp_path)
        daemon.ok("vm", "create", "holder", "--plugin", "p", "--no-start")
        daemon.ok("vm", "create", "a", "--plugin", "p", "--no-start")
        before = (
            daemon.ok("vm", "show", "a"),
            daemon.ok("vm", "config", "history", "a"),
            leases(daemon),
        )
        refused = daemon.cli("vm", "config", "patch", "a", *flags, "--json")
        assert (refused.exit_code, refused.json()["error"]["code"]) == (exit_code, code)
        after = (
            daemon.ok("vm", "show", "a"),
            daemon.ok("vm", "config", "history", "a"),
            leases(daemon),
        )
        assert after == before
    finally:
        daemon.close()


def test_versions_survive_a_daemon_restart_and_an_adopted_vm_knows_what_it_runs(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    daemon.ok("vm", "create", "kept", "--plugin", "p")
    daemon.ok("vm", "pause", "kept")
    daemon.ok("vm", "config", "patch", "kept", "--memory", "256")
    history = daemon.ok("vm", "config", "history", "kept")
    assert daemon.stop() == 0
    daemon.start()
    adopted = daemon.ok("vm", "show", "kept")
    assert adopted["status"] == "paused"
    assert (adopted["running_version"], adopted["config_version"]) == (1, 2)
    assert adopted["restart_required"] is True
    assert adopted["resources"]["memory_mib"] == 128  # what its VMM runs
    assert daemon.ok("vm", "config", "history", "kept") == history
    stopped = daemon.ok("vm", "stop", "kept", "--force")
    assert (stopped["running_version"], stopped["restart_required"]) == (None, False)
    assert stopped["resources"]["memory_mib"] == 256  # what its next start uses


def test_network_reset_and_flags_together_are_a_usage_error(daemon: Daemon) -> None:
    result = daemon.cli("vm", "config", "patch", "x", "--network-reset", "--network-mode", "vsock")
    assert result.exit_code == 2


def test_a_patch_file_and_flags_build_one_patch(daemon: Daemon, tmp_path: Path) -> None:
    install_on_first(daemon, tmp_path)
    daemon.ok("vm", "create", "f", "--plugin", "p", "--no-start")
    document = tmp_path / "patch.json"
    document.write_text(
        '{"labels": {"tier": "web"}, "network": {"mode": "bridged", '
        f'"subnet": "{SECOND}", "auto_assign": true}}}}'
    )
    version = daemon.ok("vm", "config", "patch", "f", "--file", document, "--vcpus", "2")
    assert version["config"]["labels"] == {"tier": "web"}
    assert version["config"]["resources"] == {"vcpus": 2}
    assert version["effective"]["network"]["subnet"] == SECOND
    ip = ipaddress.IPv4Address(version["effective"]["network"]["ip"])
    assert ip in ipaddress.IPv4Network(SECOND)
    assert leases(daemon) == {SECOND: [str(ip)]}  # no VMM runs: the old address went at once
    reset = daemon.ok("vm", "config", "patch", "f", "--network-reset")
    assert "network" not in reset["config"]
    assert reset["effective"]["network"]["subnet"] == FIRST
