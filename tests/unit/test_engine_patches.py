"""Config patches on an engine over fakes (real SQLite): versions, addresses reserved at patch
time and released when no longer needed, conflicts that change nothing, and transitions that
take effect at the next start."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path
from typing import Any

import pytest

from roost.errors import ConflictError, InvalidError
from roost.spec import Manifest, VMConfig, VMConfigPatch
from tests.engine_fakes import DHCP_BRIDGE, SUBNET, World
from tests.harness import wait_for

OTHER = "10.67.0.0/24"


def patch(world: World, name: str, restart: bool = False, **fields: Any) -> dict[str, Any]:
    return world.engine.patch_config(name, VMConfigPatch.model_validate(fields), restart=restart)


def leases(world: World) -> dict[str, list[str]]:
    return {
        subnet: [str(ipaddress.IPv4Address(ip)) for ip in ips]
        for subnet, ips in world.leases().items()
        if ips
    }


def versions(world: World, name: str) -> list[int]:
    return [v["version"] for v in world.engine.config_history(name)]


def test_create_is_version_one_and_says_what_it_resolved_to(world: World) -> None:
    vm = world.engine.create_vm("a", VMConfig(plugin="p", labels={"team": "x"}), start=False)
    config = world.engine.config("a")
    assert config["version"] == vm["config_version"] == 1
    assert config["config"] == {"plugin": "p", "labels": {"team": "x"}, "resources": {}}
    interfaces = config["effective"].pop("interfaces")
    assert interfaces == [
        {
            "name": "eth0",
            "mode": "bridged",
            "network": None,
            "subnet": SUBNET,
            "gateway": "10.66.0.1",
            "auto_assign": True,
            "ip": "10.66.0.2",
            "mac": vm["network"]["mac"],
            "ipv6": None,
            "default_route": True,
        }
    ]
    assert config["effective"] == {
        "network": {
            "mode": "bridged",
            "source": "plugin",
            "subnet": SUBNET,
            "gateway": "10.66.0.1",
            "auto_assign": True,
            "ip": "10.66.0.2",
        },
        "resources": {"vcpus": 1, "memory_mib": 128},
        "vmm": "fake",
    }
    assert (vm["running_version"], vm["restart_required"]) == (None, False)


def test_a_patch_of_a_stopped_vm_moves_its_address_at_once(world: World) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"), start=False)
    new = patch(
        world,
        "a",
        network={"mode": "bridged", "subnet": SUBNET, "gateway": "10.66.0.1", "ip": "10.66.0.50"},
    )
    assert new["version"] == 2
    assert new["effective"]["network"]["ip"] == "10.66.0.50"
    assert leases(world) == {SUBNET: ["10.66.0.50"]}
    vm = world.engine.show_vm("a")
    assert (vm["config_version"], vm["network"]["ip"], vm["restart_required"]) == (
        2,
        "10.66.0.50",
        False,
    )
    assert versions(world, "a") == [2, 1]
    assert world.engine.config_history("a")[1]["effective"]["network"]["ip"] == "10.66.0.2"


def test_a_patch_that_changes_nothing_makes_no_version(world: World) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"), start=False)
    assert patch(world, "a", resources={})["version"] == 1
    assert patch(world, "a", labels={"x": "1"})["version"] == 2
    assert patch(world, "a", labels={"x": "1"})["version"] == 2
    assert versions(world, "a") == [2, 1]


def test_a_running_vm_keeps_its_address_and_reserves_the_new_one_until_it_restarts(
    world: World,
) -> None:
    vm = world.engine.create_vm("a", VMConfig(plugin="p"))
    mac, cid = vm["network"]["mac"], vm["vsock"]["cid"]
    patch(world, "a", network={"mode": "bridged", "subnet": OTHER, "auto_assign": True})
    assert leases(world) == {SUBNET: ["10.66.0.2"], OTHER: ["10.67.0.2"]}
    shown = world.engine.show_vm("a")
    assert (shown["running_version"], shown["config_version"]) == (1, 2)
    assert shown["restart_required"] is True
    assert shown["network"]["subnet"] == SUBNET  # what it runs with now
    assert world.engine.config("a")["effective"]["network"]["ip"] == "10.67.0.2"

    restarted = world.engine.restart_vm("a")
    assert (restarted["running_version"], restarted["restart_required"]) == (2, False)
    assert (restarted["network"]["subnet"], restarted["network"]["ip"]) == (OTHER, "10.67.0.2")
    assert leases(world) == {OTHER: ["10.67.0.2"]}
    assert "rbr1" not in world.links.links  # the old network's bridge went with its last lease
    assert (restarted["network"]["mac"], restarted["vsock"]["cid"]) == (mac, cid)


def test_a_later_patch_that_no_longer_needs_the_reservation_releases_it(world: World) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"))
    patch(world, "a", network={"mode": "bridged", "subnet": OTHER, "auto_assign": True})
    back = patch(world, "a", network=None)
    assert back["effective"]["network"]["ip"] == "10.66.0.2"  # its current address fits again
    assert leases(world) == {SUBNET: ["10.66.0.2"]}
    assert world.engine.show_vm("a")["restart_required"] is False


def test_labels_alone_never_make_a_restart_required(world: World) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"))
    assert patch(world, "a", labels={"tier": "web"})["version"] == 2
    shown = world.engine.show_vm("a")
    assert (shown["running_version"], shown["restart_required"]) == (1, False)


def test_restart_true_applies_at_once_only_when_needed(world: World) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"))
    first = world.driver.started[-1]
    patch(world, "a", restart=True, labels={"tier": "web"})
    assert world.driver.started[-1] is first  # a label change restarts nothing
    patch(world, "a", restart=True, resources={"memory_mib": 256})
    shown = world.engine.show_vm("a")
    assert world.driver.started[-1] is not first
    assert (shown["running_version"], shown["restart_required"]) == (3, False)
    assert shown["resources"]["memory_mib"] == 256


def test_leaving_bridged_for_vsock_releases_the_address_and_tap_at_the_next_start(
    world: World,
) -> None:
    vm = world.engine.create_vm("a", VMConfig(plugin="p"))
    patch(world, "a", network={"mode": "vsock"})
    assert leases(world) == {SUBNET: ["10.66.0.2"]}  # still running with it
    restarted = world.engine.restart_vm("a")
    assert restarted["network"]["mode"] == "vsock"
    assert (restarted["network"]["ip"], restarted["network"]["tap"]) == (None, None)
    assert leases(world) == {}
    assert world.links.links == {}
    assert world.firewall.protected == set()
    assert restarted["vsock"]["cid"] == vm["vsock"]["cid"]
    assert world.driver.launched[-1].nics == ()
    assert "ip=" not in world.driver.launched[-1].boot_args


def test_vsock_to_bridged_gets_a_nic_and_an_address(world: World) -> None:
    world.engine.create_vm(
        "a", VMConfig.model_validate({"plugin": "p", "network": {"mode": "vsock"}})
    )
    assert world.driver.launched[-1].nics == ()
    patch(
        world,
        "a",
        network={"mode": "bridged", "subnet": SUBNET, "gateway": "10.66.0.1", "ip": "10.66.0.9"},
    )
    assert leases(world) == {SUBNET: ["10.66.0.9"]}  # reserved at patch time
    restarted = world.engine.restart_vm("a")
    spec = world.driver.launched[-1]
    assert [nic.mac for nic in spec.nics] == [restarted["network"]["mac"]]
    assert "ip=10.66.0.9::10.66.0.1:255.255.255.0:a:eth0:off" in spec.boot_args


@pytest.mark.parametrize(
    ("fields", "code", "loc"),
    [
        (
            {
                "network": {
                    "mode": "bridged",
                    "subnet": SUBNET,
                    "gateway": "10.66.0.1",
                    "ip": "10.66.0.2",
                }
            },
            "ip_taken",
            None,
        ),
        (
            {"network": {"mode": "bridged", "subnet": "10.66.0.0/16", "auto_assign": True}},
            "subnet_overlap",
            None,
        ),
        ({"network": {"mode": "dhcp"}}, "invalid", "network.mode"),
        (
            {"network": {"mode": "bridged", "subnet": SUBNET, "gateway": "10.9.0.1"}},
            "invalid",
            "network.gateway",
        ),
    ],
)
def test_a_refused_patch_changes_nothing(
    world: World, fields: dict[str, Any], code: str, loc: str | None
) -> None:
    world.engine.create_vm("holder", VMConfig(plugin="p"), start=False)  # holds 10.66.0.2
    world.engine.create_vm("a", VMConfig(plugin="p"))
    before = (world.engine.show_vm("a"), world.engine.config_history("a"), leases(world))
    with pytest.raises((ConflictError, InvalidError)) as refused:
        patch(world, "a", **fields)
    assert refused.value.code == code
    if loc is not None:
        assert loc in [detail.loc for detail in refused.value.details]
    assert (world.engine.show_vm("a"), world.engine.config_history("a"), leases(world)) == before


def test_a_plugin_that_does_not_allow_a_mode_refuses_a_patch_to_it(world: World) -> None:
    manifest = Manifest.model_validate(
        {
            "name": "strict",
            "version": "1",
            "kernel": {"path": str(world.root / "vmlinux")},
            "rootfs": {"path": str(world.root / "rootfs.img")},
            "network": {"mode": "vsock"},
            "allowed_network_modes": ["vsock"],
        }
    )
    world.engine.plugins.install(manifest, force=False)
    world.engine.create_vm("s", VMConfig(plugin="strict"), start=False)
    with pytest.raises(InvalidError) as refused:
        patch(world, "s", network={"mode": "bridged"})
    assert [detail.loc for detail in refused.value.details] == ["network.mode"]
    assert versions(world, "s") == [1]


def test_fifty_parallel_patches_of_different_vms_to_one_address_one_wins(world: World) -> None:
    names = [f"vm{i}" for i in range(50)]
    for name in names:
        world.engine.create_vm(name, VMConfig(plugin="p"), start=False)
    outcomes: dict[str, str] = {}
    barrier = threading.Barrier(len(names))

    def try_patch(name: str) -> None:
        barrier.wait()
        try:
            patch(
                world,
                name,
                network={
                    "mode": "bridged",
                    "subnet": SUBNET,
                    "gateway": "10.66.0.1",
                    "ip": "10.66.0.200",
                },
            )
            outcomes[name] = "won"
        except ConflictError as error:
            outcomes[name] = error.code

    threads = [threading.Thread(target=try_patch, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes.values()) == ["ip_taken"] * 49 + ["won"]
    [winner] = [name for name, outcome in outcomes.items() if outcome == "won"]
    assert world.engine.show_vm(winner)["network"]["ip"] == "10.66.0.200"
    assert leases(world)[SUBNET].count("10.66.0.200") == 1


def test_dhcp_needs_the_daemons_dhcp_bridge_and_attaches_to_it(tmp_path: Path) -> None:
    world = World(tmp_path, dhcp_bridge=DHCP_BRIDGE)
    try:
        world.engine.create_vm("a", VMConfig(plugin="p"))
        patch(world, "a", restart=True, network={"mode": "dhcp"})
        shown = world.engine.show_vm("a")
        assert (shown["network"]["mode"], shown["network"]["bridge"]) == ("dhcp", DHCP_BRIDGE)
        assert leases(world) == {}
        assert "ip=dhcp" in world.driver.launched[-1].boot_args
    finally:
        world.close()


def test_history_survives_a_new_engine_on_the_same_database(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        world.engine.create_vm("a", VMConfig(plugin="p"), start=False)
        patch(world, "a", resources={"vcpus": 2})
        history = world.engine.config_history("a")
    finally:
        world.close()
    again = World(tmp_path, install=False)
    try:
        assert again.engine.config_history("a") == history
    finally:
        again.close()


@pytest.mark.parametrize("end", ["stop", "exit"])
def test_a_vm_whose_vmm_ends_lets_go_of_what_its_latest_version_does_not_need(
    world: World, end: str
) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"))
    patch(world, "a", network={"mode": "bridged", "subnet": OTHER, "auto_assign": True})
    patch(world, "a", network={"mode": "vsock"})  # releases the reservation on OTHER at once
    assert leases(world) == {SUBNET: ["10.66.0.2"]}  # the running VMM's own
    if end == "stop":
        world.engine.stop_vm("a", timeout=0, force=True)
    else:
        world.driver.started[-1].kill()  # ends on its own: the exit watcher settles it
        wait_for(
            lambda: world.engine.show_vm("a")["status"] != "running", what="the exit to settle"
        )
    shown = world.engine.show_vm("a")
    assert (shown["network"]["mode"], shown["running_version"]) == ("vsock", None)
    assert leases(world) == {}  # vsock needs none: released now, not at a start that may never come
    assert "rbr1" not in world.links.links


def test_a_stopped_vm_takes_its_reserved_address_as_its_own(world: World) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"))
    patch(world, "a", network={"mode": "bridged", "subnet": OTHER, "auto_assign": True})
    world.engine.stop_vm("a", timeout=0, force=True)
    shown = world.engine.show_vm("a")
    assert (shown["network"]["subnet"], shown["network"]["ip"]) == (OTHER, "10.67.0.2")
    assert leases(world) == {OTHER: ["10.67.0.2"]}


def test_pinning_the_address_a_vm_has_needs_no_restart(world: World) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"))
    pinned = patch(
        world,
        "a",
        network={"mode": "bridged", "subnet": SUBNET, "gateway": "10.66.0.1", "ip": "10.66.0.2"},
    )
    assert pinned["version"] == 2
    assert world.engine.show_vm("a")["restart_required"] is False


def test_a_stopped_vm_may_move_to_a_subnet_overlapping_the_one_only_it_used(
    world: World,
) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"), start=False)
    moved = patch(
        world, "a", network={"mode": "bridged", "subnet": "10.66.0.0/16", "auto_assign": True}
    )
    assert moved["effective"]["network"]["subnet"] == "10.66.0.0/16"
    assert list(leases(world)) == ["10.66.0.0/16"]
