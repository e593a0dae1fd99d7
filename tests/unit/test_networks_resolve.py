"""A config that names a registered network: resolution through a lookup, the rules that tie
`network` to the other fields, offline planning, and that configs naming none are unchanged."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from roost.errors import InvalidError
from roost.plan import Attachment, DefaultNetwork, plan_network, resolve_network
from roost.plan.network import IPAM, EffectiveNetwork
from roost.plan.registry import NetworkKind, RegisteredNetwork
from roost.plan.vm import needs_restart
from roost.spec import Manifest, VMConfig

DEFAULT = DefaultNetwork.from_cidr("10.57.0.0/24")
REGISTRY = {
    "lan2": RegisteredNetwork(
        "lan2",
        NetworkKind.MANAGED,
        "br-lan2",
        ipaddress.IPv4Network("10.77.0.0/24"),
        ipaddress.IPv4Address("10.77.0.1"),
        None,
    ),
    "ext": RegisteredNetwork(
        "ext",
        NetworkKind.EXTERNAL,
        "br-ext",
        ipaddress.IPv4Network("192.168.77.0/24"),
        ipaddress.IPv4Address("192.168.77.254"),
        None,
    ),
    "dhcp": RegisteredNetwork("dhcp", NetworkKind.EXTERNAL, "brdhcp", None, None, None),
    "pods": RegisteredNetwork("pods", NetworkKind.CNI, None, None, None, None),
}
PLUGIN_BRIDGED = {"mode": "bridged", "subnet": "10.100.0.0/24", "gateway": "10.100.0.1"}


def resolve(plugin_net: Any, vm_net: Any, *, offline: bool = False) -> EffectiveNetwork:
    manifest = Manifest.model_validate(
        {"name": "p", "version": "1", "initramfs": {"path": "i"}, "network": plugin_net}
    )
    config = VMConfig.model_validate({"plugin": "p", "network": vm_net})
    return resolve_network(manifest, config, DEFAULT, None if offline else REGISTRY.get)


def refusal(plugin_net: Any, vm_net: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidError) as caught:
        resolve(plugin_net, vm_net)
    return [(d.loc, d.msg) for d in caught.value.details]


def test_a_bridged_vm_naming_a_managed_network_takes_its_subnet_gateway_and_bridge_kind() -> None:
    effective = resolve(PLUGIN_BRIDGED, {"mode": "bridged", "network": "lan2"})
    assert effective.to_json() == {
        "mode": "bridged",
        "source": "vm",
        "subnet": "10.77.0.0/24",
        "gateway": "10.77.0.1",
        "auto_assign": True,
        "ip": None,
        "network": "lan2",
        "external": False,
    }
    plan = plan_network(effective, "vm")
    assert (plan.attach, plan.ipam, plan.tap) == (Attachment.MANAGED, IPAM.AUTO, True)


def test_a_vm_naming_its_own_network_inherits_nothing_else_from_the_plugin() -> None:
    plugin = {**PLUGIN_BRIDGED, "auto_assign": False}
    effective = resolve(plugin, {"network": "lan2", "ip": "10.77.0.9"})
    assert (effective.subnet, effective.gateway, effective.ip, effective.auto_assign) == (
        ipaddress.IPv4Network("10.77.0.0/24"),
        ipaddress.IPv4Address("10.77.0.1"),
        ipaddress.IPv4Address("10.77.0.9"),
        False,
    )


def test_a_vm_setting_only_its_ip_inherits_the_network_its_plugin_names() -> None:
    effective = resolve({"mode": "bridged", "network": "lan2"}, {"ip": "10.77.0.5"})
    assert (effective.network, effective.ip) == ("lan2", ipaddress.IPv4Address("10.77.0.5"))


def test_a_vm_giving_its_own_subnet_drops_the_network_its_plugin_names() -> None:
    effective = resolve(
        {"mode": "bridged", "network": "lan2"}, {"subnet": "10.9.0.0/24", "auto_assign": True}
    )
    assert (effective.network, str(effective.subnet)) == (None, "10.9.0.0/24")


def test_a_bridged_vm_on_an_external_network_with_a_subnet_gets_roosts_addresses() -> None:
    effective = resolve(None, {"mode": "bridged", "network": "ext"})
    assert (str(effective.gateway), effective.external) == ("192.168.77.254", True)
    plan = plan_network(effective.with_ip(ipaddress.IPv4Address("192.168.77.2")), "vm")
    assert (plan.attach, plan.ipam) == (Attachment.EXTERNAL, IPAM.AUTO)
    assert plan.kernel_ip_arg == "ip=192.168.77.2::192.168.77.254:255.255.255.0:vm:eth0:off"


def test_a_dhcp_vm_may_name_an_external_network() -> None:
    effective = resolve(None, {"mode": "dhcp", "network": "ext"})
    assert effective.to_json()["network"] == "ext"
    plan = plan_network(effective, "vm")
    assert (plan.attach, plan.ipam, plan.kernel_ip_arg) == (
        Attachment.EXTERNAL,
        IPAM.NONE,
        "ip=dhcp",
    )


@pytest.mark.parametrize(
    ("plugin_net", "vm_net", "loc", "says"),
    [
        (None, {"mode": "bridged", "network": "nowhere"}, "network.network", "'nowhere'"),
        (None, {"mode": "dhcp", "network": "lan2"}, "network.network", "managed by roost"),
        (None, {"mode": "bridged", "network": "dhcp"}, "network.network", "no subnet"),
        (
            None,
            {"mode": "bridged", "network": "lan2", "subnet": "10.77.0.0/24"},
            "network.network",
            "not both",
        ),
        (
            None,
            {"mode": "bridged", "network": "lan2", "gateway": "10.77.0.1"},
            "network.gateway",
            "",
        ),
        (None, {"mode": "vsock", "network": "lan2"}, "network.network", "vsock"),
        (None, {"mode": "bridged", "network": "pods"}, "network.network", "cni mode"),
        (None, {"mode": "dhcp", "network": "pods"}, "network.network", "CNI network"),
        (None, {"mode": "bridged", "network": "lan2", "ip": "10.78.0.5"}, "network.ip", "lan2"),
        (None, {"mode": "bridged", "network": "lan2", "ip": "10.77.0.1"}, "network.ip", "gateway"),
        (
            None,
            {"mode": "bridged", "network": "lan2", "auto_assign": False},
            "network",
            "needs an ip",
        ),
    ],
)
def test_what_a_named_network_refuses(plugin_net: Any, vm_net: Any, loc: str, says: str) -> None:
    refused = refusal(plugin_net, vm_net)
    assert [found for found, _ in refused] == [loc]
    assert says in refused[0][1]


def test_a_network_name_is_a_dns_label() -> None:
    with pytest.raises(Exception, match="network name"):
        VMConfig.model_validate({"plugin": "p", "network": {"mode": "bridged", "network": "LAN 2"}})


def test_offline_a_named_network_is_left_for_the_daemon() -> None:
    effective = resolve(None, {"mode": "bridged", "network": "lan2"}, offline=True)
    assert (effective.network, effective.subnet, effective.gateway) == ("lan2", None, None)
    plan = plan_network(effective, "vm")
    assert (plan.tap, plan.kernel_ip_arg) == (True, None)


def test_a_config_naming_no_network_resolves_and_stores_as_before() -> None:
    effective = resolve(PLUGIN_BRIDGED, {"ip": "10.100.0.7"})
    stored = effective.to_json()
    assert "network" not in stored and "external" not in stored
    assert EffectiveNetwork.from_json(stored) == effective


def test_moving_a_vm_to_another_named_network_needs_a_restart() -> None:
    def version(network: str | None) -> dict[str, Any]:
        named = {} if network is None else {"network": network}
        net = {"mode": "dhcp", "subnet": None, "gateway": None, "ip": None, **named}
        interface = {**net, "name": "eth0", "network": network or "dhcp", "mac": None}
        return {"network": net, "interfaces": [interface], "resources": {}, "vmm": "firecracker"}

    assert needs_restart(version("ext"), {}, version(None), {})
    assert not needs_restart(version("ext"), {}, version("ext"), {})
