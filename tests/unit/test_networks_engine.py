"""The network registry in the engine, on fakes and a real SQLite database: events, bridges
made and kept, what a VM naming a network holds, and what its removal and failures leave."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from roost.errors import ConflictError, HostError, InvalidError, NotFoundError
from roost.plan.registration import parse_network_create
from roost.spec import VMConfig
from roost.spec.policy import parse_policy
from tests.engine_fakes import World


def create(world: World, **fields: Any) -> dict[str, Any]:
    return world.engine.networks.create(parse_network_create(fields))


def events(world: World) -> list[tuple[str, Any]]:
    taken, _, _ = world.engine.events._since(0)
    return [(event.type, event.data.get("network")) for event in taken]


def vm_on(world: World, name: str, network: dict[str, Any]) -> dict[str, Any]:
    config = VMConfig.model_validate({"plugin": "p", "network": network})
    return world.engine.create_vm(name, config)


def test_creating_and_removing_a_named_network_are_events(world: World) -> None:
    create(world, name="lab", subnet="10.70.0.0/24")
    world.engine.networks.remove("lab")
    assert [e for e in events(world) if e[1] == "lab"] == [
        ("network.created", "lab"),
        ("network.removed", "lab"),
    ]


def test_a_managed_network_s_bridge_outlives_its_last_lease(world: World) -> None:
    created = create(world, name="lab", subnet="10.70.0.0/24")
    bridge = created["bridge"]
    assert world.links.links[bridge] == "bridge"
    vm = vm_on(world, "a", {"mode": "bridged", "network": "lab"})
    assert (vm["network"]["bridge"], vm["network"]["ip"]) == (bridge, "10.70.0.2")
    with pytest.raises(ConflictError) as caught:
        world.engine.networks.remove("lab")
    assert caught.value.code == "network_in_use"
    world.engine.destroy_vm("a")
    assert world.links.links[bridge] == "bridge"
    assert world.engine.networks.show("lab")["leases"] == []
    world.engine.networks.remove("lab")
    assert bridge not in world.links.links


def test_a_failed_create_on_a_named_network_keeps_its_bridge(world: World) -> None:
    bridge = create(world, name="lab", subnet="10.70.0.0/24")["bridge"]
    world.firewall.fail = True  # after its tap is made on the bridge
    with pytest.raises(HostError):
        vm_on(world, "a", {"mode": "bridged", "network": "lab"})
    assert world.links.links == {bridge: "bridge"}
    assert world.leases() == {"10.70.0.0/24": []}


def test_a_subnet_in_a_config_may_not_take_an_external_network_s(world: World) -> None:
    world.links.links["br-ext"] = "bridge"
    create(world, name="ext", external=True, bridge="br-ext", subnet="10.71.0.0/24")
    with pytest.raises(ConflictError, match='"network": "ext"'):
        vm_on(world, "a", {"mode": "bridged", "subnet": "10.71.0.0/24", "auto_assign": True})


def test_a_network_a_stopped_vm_names_is_in_use(world: World) -> None:
    world.links.links["br-ext"] = "bridge"
    create(world, name="ext", external=True, bridge="br-ext")
    config = VMConfig.model_validate({"plugin": "p", "network": {"mode": "dhcp", "network": "ext"}})
    world.engine.create_vm("a", config, start=False)
    with pytest.raises(ConflictError):
        world.engine.networks.remove("ext")  # its stopped VM names it
    assert json.loads(json.dumps(world.engine.show_vm("a")["network"]))["network"] == "ext"


def test_an_unknown_or_roost_s_own_network_cannot_be_named(world: World) -> None:
    for name in ("nowhere", "default"):
        with pytest.raises(InvalidError) as caught:
            vm_on(world, "a", {"mode": "bridged", "network": name})
        assert [d.loc for d in caught.value.details] == ["network.network"]


def test_only_named_networks_can_be_removed(tmp_path: Path) -> None:
    world = World(tmp_path, dhcp_bridge="brdhcp")
    try:
        world.engine.networks.restore()
        assert world.engine.networks.show("dhcp")["bridge"] == "brdhcp"
        world.engine.create_vm("a", VMConfig(plugin="p"))  # on the plugin's subnet, on demand
        for name in ("dhcp", "net-10-66-0-0-24"):
            with pytest.raises(ConflictError, match=r"network create|--dhcp-bridge"):
                world.engine.networks.remove(name)
    finally:
        world.close()


def test_a_managed_network_with_an_ipv6_prefix_is_advertised_until_it_is_removed(
    world: World,
) -> None:
    bridge = create(world, name="lab6", subnet="10.72.0.0/24", ipv6_prefix="fd72::/64")["bridge"]
    assert {b: str(p) for b, p in world.adverts.advertised.items()} == {bridge: "fd72::/64"}
    world.engine.networks.remove("lab6")
    assert world.adverts.advertised == {}


def test_a_network_whose_advertisements_cannot_start_is_not_created(world: World) -> None:
    world.adverts.fail = True
    with pytest.raises(HostError, match="cannot advertise"):
        create(world, name="lab6", subnet="10.72.0.0/24", ipv6_prefix="fd72::/64")
    assert world.adverts.advertised == {}
    assert [name for name, kind in world.links.links.items() if kind == "bridge"] == []
    with pytest.raises(NotFoundError):
        world.engine.networks.show("lab6")


def test_restoring_advertises_exactly_the_networks_with_a_prefix(world: World) -> None:
    bridge = create(world, name="lab6", subnet="10.72.0.0/24", ipv6_prefix="fd72::/64")["bridge"]
    create(world, name="lab4", subnet="10.73.0.0/24")
    world.adverts.advertised = {"rbr99": ipaddress.IPv6Network("fd99::/64")}  # a stale one
    world.engine.networks.restore()
    assert {b: str(p) for b, p in world.adverts.advertised.items()} == {bridge: "fd72::/64"}


def test_a_second_managed_network_with_the_same_ipv6_prefix_is_a_subnet_overlap(
    world: World,
) -> None:
    create(world, name="lab", subnet="10.70.0.0/24", ipv6_prefix="fd00:70::/64")
    with pytest.raises(ConflictError) as caught:
        create(world, name="lab2", subnet="10.71.0.0/24", ipv6_prefix="fd00:70:0:0::/64")
    assert caught.value.code == "subnet_overlap"
    assert "lab" in str(caught.value) and "fd00:70::/64" in str(caught.value)
    assert [n["name"] for n in world.engine.list_networks()] == ["lab"]
    assert set(world.adverts.advertised) == {world.engine.networks.show("lab")["bridge"]}


def test_a_daemon_without_dhcp_bridge_keeps_the_dhcp_network_a_policy_names(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, dhcp_bridge="brdhcp")
    try:
        registry = world.engine.networks
        registry.restore()
        refuse_dhcp = {"egress": [{"action": "drop", "destination": ["@dhcp"]}]}
        world.engine.policies.create(parse_policy(refuse_dhcp, "no-dhcp"))
        registry.dhcp_bridge = None  # as a daemon started without --dhcp-bridge sees it
        with pytest.raises(ConflictError, match=r"'no-dhcp' names @dhcp.*--dhcp-bridge"):
            registry.restore()
        assert registry.show("dhcp")["bridge"] == "brdhcp"
        world.engine.policies.remove("no-dhcp")
        registry.restore()
        with pytest.raises(NotFoundError):
            registry.show("dhcp")
    finally:
        world.close()
