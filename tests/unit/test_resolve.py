"""Resolution (plugin default, VM override, daemon default) and the network plan, as tables."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from roost.errors import InvalidError
from roost.plan import DefaultNetwork, plan_network, resolve_network
from roost.spec import Manifest, VMConfig

DEFAULT = DefaultNetwork.from_cidr("10.57.0.0/24")
PLUGIN_BRIDGED = {
    "mode": "bridged",
    "subnet": "10.100.0.0/24",
    "gateway": "10.100.0.1",
    "auto_assign": True,
}


def resolve(plugin_net: Any, vm_net: Any, allowed: list[str] | None = None) -> dict[str, Any]:
    manifest = Manifest.model_validate(
        {
            "name": "p",
            "version": "1",
            "initramfs": {"path": "i"},
            "network": plugin_net,
            "allowed_network_modes": allowed,
        }
    )
    config = VMConfig.model_validate({"plugin": "p", "network": vm_net})
    return resolve_network(manifest, config, DEFAULT).to_json()


def net(
    mode: str,
    source: str,
    subnet: str | None = None,
    gateway: str | None = None,
    auto_assign: bool | None = None,
    ip: str | None = None,
) -> dict[str, Any]:
    return {
        "mode": mode,
        "source": source,
        "subnet": subnet,
        "gateway": gateway,
        "auto_assign": auto_assign,
        "ip": ip,
    }


DEFAULT_AUTO = net("bridged", "default", "10.57.0.0/24", "10.57.0.1", True)

RESOLUTION = [
    # nothing anywhere: the daemon's default network (the seed's compatibility rule)
    (None, None, DEFAULT_AUTO),
    # {"mode": "bridged"} behaves like no network at all
    ({"mode": "bridged"}, None, {**DEFAULT_AUTO, "source": "plugin"}),
    (None, {"mode": "bridged"}, {**DEFAULT_AUTO, "source": "vm"}),
    # the plugin's default, as written
    ({"mode": "vsock"}, None, net("vsock", "plugin")),
    ({"mode": "dhcp"}, None, net("dhcp", "plugin")),
    (PLUGIN_BRIDGED, None, net("bridged", "plugin", "10.100.0.0/24", "10.100.0.1", True)),
    # auto_assign without a gateway: the gateway is the subnet's first host
    (
        {"mode": "bridged", "subnet": "10.9.0.0/16", "auto_assign": True},
        None,
        net("bridged", "plugin", "10.9.0.0/16", "10.9.0.1", True),
    ),
    # same mode: the VM's unset fields inherit; an ip wins over auto_assign
    (
        PLUGIN_BRIDGED,
        {"ip": "10.100.0.7"},
        net("bridged", "vm", "10.100.0.0/24", "10.100.0.1", False, "10.100.0.7"),
    ),
    (
        PLUGIN_BRIDGED,
        {"mode": "bridged", "ip": "10.100.0.7"},
        net("bridged", "vm", "10.100.0.0/24", "10.100.0.1", False, "10.100.0.7"),
    ),
    (
        PLUGIN_BRIDGED,
        {"gateway": "10.100.0.254"},
        net("bridged", "vm", "10.100.0.0/24", "10.100.0.254", True),
    ),
    (
        {"mode": "bridged"},
        {"ip": "10.57.0.9"},
        net("bridged", "vm", "10.57.0.0/24", "10.57.0.1", False, "10.57.0.9"),
    ),
    (
        None,
        {"ip": "10.57.0.9"},
        net("bridged", "vm", "10.57.0.0/24", "10.57.0.1", False, "10.57.0.9"),
    ),
    # a VM that sets its own subnet inherits nothing else
    (
        PLUGIN_BRIDGED,
        {"subnet": "10.200.0.0/24", "auto_assign": True},
        net("bridged", "vm", "10.200.0.0/24", "10.200.0.1", True),
    ),
    # a different mode discards the plugin's fields
    (PLUGIN_BRIDGED, {"mode": "dhcp"}, net("dhcp", "vm")),
    (PLUGIN_BRIDGED, {"mode": "vsock"}, net("vsock", "vm")),
    ({"mode": "vsock"}, {"mode": "bridged"}, {**DEFAULT_AUTO, "source": "vm"}),
    (
        {"mode": "dhcp"},
        {"mode": "bridged", "ip": "10.57.0.20"},
        net("bridged", "vm", "10.57.0.0/24", "10.57.0.1", False, "10.57.0.20"),
    ),
    # an override without a mode takes the plugin's mode
    ({"mode": "dhcp"}, {"auto_assign": False}, net("dhcp", "vm")),
]


@pytest.mark.parametrize(("plugin_net", "vm_net", "expected"), RESOLUTION)
def test_resolution(plugin_net: Any, vm_net: Any, expected: dict[str, Any]) -> None:
    assert resolve(plugin_net, vm_net) == expected


RESOLUTION_ERRORS = [
    # a mode outside the plugin's allowed modes, naming the allowed ones
    ({"mode": "vsock"}, {"mode": "bridged"}, ["vsock"], "network.mode", "allowed: vsock"),
    (
        {"mode": "dhcp"},
        {"mode": "vsock"},
        ["dhcp", "bridged"],
        "network.mode",
        "allowed: dhcp, bridged",
    ),
    # needs an ip or auto_assign on an explicit subnet
    (
        {"mode": "bridged", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1"},
        None,
        None,
        "network",
        "needs an ip or auto_assign",
    ),
    (PLUGIN_BRIDGED, {"auto_assign": False}, None, "network", "needs an ip or auto_assign"),
    (
        {"mode": "bridged", "auto_assign": False},
        None,
        None,
        "network",
        "needs an ip or auto_assign",
    ),
    # rules 2-4 after resolution
    (
        PLUGIN_BRIDGED,
        {"ip": "10.101.0.7"},
        None,
        "network.ip",
        "10.101.0.7 is not inside subnet 10.100.0.0/24",
    ),
    (PLUGIN_BRIDGED, {"ip": "10.100.0.1"}, None, "network.ip", "is the gateway's address"),
    (None, {"ip": "10.58.0.7"}, None, "network.ip", "the daemon's default network"),
    (None, {"ip": "10.57.0.1"}, None, "network.ip", "is the gateway's address"),
    (None, {"ip": "10.57.0.255"}, None, "network.ip", "broadcast"),
    (None, {"gateway": "10.57.0.1"}, None, "network.gateway", "needs a subnet"),
    (PLUGIN_BRIDGED, {"gateway": "10.9.0.1"}, None, "network.gateway", "not inside"),
    ({"mode": "vsock"}, {"ip": "10.57.0.9"}, None, "network.ip", "only valid in bridged"),
    ({"mode": "dhcp"}, {"subnet": "10.1.0.0/24"}, None, "network.subnet", "only valid in bridged"),
]


@pytest.mark.parametrize(("plugin_net", "vm_net", "allowed", "loc", "text"), RESOLUTION_ERRORS)
def test_resolution_errors(
    plugin_net: Any, vm_net: Any, allowed: list[str] | None, loc: str, text: str
) -> None:
    with pytest.raises(InvalidError) as caught:
        resolve(plugin_net, vm_net, allowed)
    assert [d.loc for d in caught.value.details] == [loc]
    assert text in caught.value.details[0].msg


def plan_for(plugin_net: Any, vm_net: Any, name: str = "web-1") -> dict[str, Any]:
    manifest = Manifest.model_validate(
        {"name": "p", "version": "1", "initramfs": {"path": "i"}, "network": plugin_net}
    )
    config = VMConfig.model_validate({"plugin": "p", "network": vm_net})
    return plan_network(resolve_network(manifest, config, DEFAULT), name).to_json()


PLANS = [
    (
        {"mode": "vsock"},
        None,
        {
            "tap": False,
            "ipam": "none",
            "nic": False,
            "vsock": True,
            "kernel_ip_arg": None,
            "attach": "none",
            "observe_ip": False,
            "antispoof": "none",
        },
    ),
    (
        {"mode": "dhcp"},
        None,
        {
            "tap": True,
            "ipam": "none",
            "nic": True,
            "vsock": True,
            "kernel_ip_arg": "ip=dhcp",
            "attach": "external",
            "observe_ip": True,
            "antispoof": "mac",
        },
    ),
    (
        PLUGIN_BRIDGED,
        None,
        {
            "tap": True,
            "ipam": "auto",
            "nic": True,
            "vsock": True,
            "kernel_ip_arg": None,
            "attach": "managed",
            "observe_ip": False,
            "antispoof": "ip_and_mac",
        },
    ),
    (
        PLUGIN_BRIDGED,
        {"ip": "10.100.0.7"},
        {
            "tap": True,
            "ipam": "manual",
            "nic": True,
            "vsock": True,
            "kernel_ip_arg": "ip=10.100.0.7::10.100.0.1:255.255.255.0:web-1:eth0:off",
            "attach": "managed",
            "observe_ip": False,
            "antispoof": "ip_and_mac",
        },
    ),
    (
        {"mode": "bridged", "subnet": "10.8.0.0/14", "auto_assign": True},
        {"ip": "10.9.3.4"},
        {
            "tap": True,
            "ipam": "manual",
            "nic": True,
            "vsock": True,
            "kernel_ip_arg": "ip=10.9.3.4::10.8.0.1:255.252.0.0:web-1:eth0:off",
            "attach": "managed",
            "observe_ip": False,
            "antispoof": "ip_and_mac",
        },
    ),
]


@pytest.mark.parametrize(("plugin_net", "vm_net", "expected"), PLANS)
def test_plan(plugin_net: Any, vm_net: Any, expected: dict[str, Any]) -> None:
    assert plan_for(plugin_net, vm_net) == expected


def test_bridged_and_no_network_plan_alike() -> None:
    assert plan_for({"mode": "bridged"}, None) == plan_for(None, None)


def test_auto_assign_plan_fills_the_ip_arg_once_allocated() -> None:
    manifest = Manifest.model_validate(
        {"name": "p", "version": "1", "initramfs": {"path": "i"}, "network": PLUGIN_BRIDGED}
    )
    effective = resolve_network(manifest, None, DEFAULT)
    plan = plan_network(effective.with_ip(ipaddress.IPv4Address("10.100.0.2")), "a")
    assert plan.ipam.value == "auto"
    assert plan.kernel_ip_arg == "ip=10.100.0.2::10.100.0.1:255.255.255.0:a:eth0:off"


def test_default_network_follows_the_daemon_setting() -> None:
    manifest = Manifest.model_validate({"name": "p", "version": "1", "initramfs": {"path": "i"}})
    effective = resolve_network(manifest, None, DefaultNetwork.from_cidr("172.20.0.0/16"))
    assert (str(effective.subnet), str(effective.gateway)) == ("172.20.0.0/16", "172.20.0.1")
    with pytest.raises(InvalidError) as caught:
        DefaultNetwork.from_cidr("172.20.0.1/16")
    assert caught.value.details[0].loc == "default_subnet"
