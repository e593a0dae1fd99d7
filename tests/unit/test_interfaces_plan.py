"""Resolution of a VM's interfaces: which list wins, each interface resolved and planned as a
single network is, registered networks found (or left to the daemon offline), static IPv6
judged against its network's prefix, the default route on exactly one interface; and a
property: a single `network` and the one-element `interfaces` that says the same plan the same
host state."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.errors import InvalidError
from roost.plan.interfaces import ResolvedInterfaces, resolve_interfaces
from roost.plan.network import DefaultNetwork, Source
from roost.plan.registry import NetworkKind, NetworkLookup, RegisteredNetwork
from roost.spec import Manifest, NetworkMode, VMConfig
from roost.spec.parse import parse

DEFAULT = DefaultNetwork.from_cidr()
PREFIX = ipaddress.IPv6Network("fd12:3456:789a:1::/64")
REGISTRY = {
    "lan2": RegisteredNetwork(
        "lan2",
        NetworkKind.MANAGED,
        "br-lan2",
        ipaddress.IPv4Network("10.9.0.0/24"),
        ipaddress.IPv4Address("10.9.0.1"),
        PREFIX,
    ),
    "plain": RegisteredNetwork(
        "plain",
        NetworkKind.MANAGED,
        "rbr7",
        ipaddress.IPv4Network("10.8.0.0/24"),
        ipaddress.IPv4Address("10.8.0.1"),
        None,
    ),
    "ext": RegisteredNetwork(
        "ext",
        NetworkKind.EXTERNAL,
        "br-ext",
        ipaddress.IPv4Network("192.168.50.0/24"),
        ipaddress.IPv4Address("192.168.50.1"),
        None,
    ),
    "dhcp": RegisteredNetwork("dhcp", NetworkKind.EXTERNAL, "brdhcp", None, None, None),
}
LOOKUP: NetworkLookup = REGISTRY.get
WEB = {"mode": "bridged", "subnet": "10.100.0.0/24", "gateway": "10.100.0.1", "auto_assign": True}
LAN = {"mode": "bridged", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1", "ip": "10.1.0.5"}
DHCP = {"mode": "dhcp"}


def plugin(**fields: Any) -> Manifest:
    return parse(Manifest, {"name": "web", "version": "1", "initramfs": {"path": "i"}, **fields})


def vm(**fields: Any) -> VMConfig:
    return parse(VMConfig, {"plugin": "web", **fields})


def resolve(
    manifest: Manifest, config: VMConfig | None, lookup: NetworkLookup | None = LOOKUP
) -> ResolvedInterfaces:
    return resolve_interfaces(manifest, config, DEFAULT, lookup, vm_name="web-1")


def errors_of(
    manifest: Manifest, config: VMConfig | None, lookup: NetworkLookup | None = LOOKUP
) -> dict[str, str]:
    with pytest.raises(InvalidError) as caught:
        resolve(manifest, config, lookup)
    return {detail.loc: detail.msg for detail in caught.value.details}


def test_a_vms_interfaces_replace_its_plugins_network_as_a_whole() -> None:
    resolved = resolve(plugin(network=WEB), vm(interfaces=[DHCP, LAN]))
    assert not resolved.single and resolved.network is None
    assert [(i.name, i.mode, i.source) for i in resolved.interfaces] == [
        ("eth0", NetworkMode.DHCP, Source.VM),
        ("eth1", NetworkMode.BRIDGED, Source.VM),
    ]
    assert resolved.interfaces[1].subnet == ipaddress.IPv4Network("10.1.0.0/24")


def test_a_vms_network_replaces_its_plugins_interfaces_and_inherits_nothing_from_them() -> None:
    resolved = resolve(plugin(interfaces=[WEB]), vm(network={"mode": "bridged", "ip": "10.57.0.9"}))
    assert resolved.single
    [interface] = resolved.interfaces
    assert (interface.subnet, interface.ip) == (DEFAULT.subnet, ipaddress.IPv4Address("10.57.0.9"))


def test_a_plugins_interfaces_apply_to_a_vm_that_gives_neither_form() -> None:
    resolved = resolve(plugin(interfaces=[WEB, DHCP]), vm())
    assert [(i.mode, i.source) for i in resolved.interfaces] == [
        (NetworkMode.BRIDGED, Source.PLUGIN),
        (NetworkMode.DHCP, Source.PLUGIN),
    ]
    assert resolved.interfaces[0].auto_assign is True


def test_the_single_form_keeps_its_same_mode_inheritance() -> None:
    resolved = resolve(plugin(network=WEB), vm(network={"ip": "10.100.0.50"}))
    assert resolved.single and resolved.network is not None
    [interface] = resolved.interfaces
    assert interface.effective == resolved.network
    assert interface.subnet == ipaddress.IPv4Network("10.100.0.0/24")
    assert (interface.name, interface.default_route, interface.mac) == ("eth0", True, None)


@pytest.mark.parametrize(
    ("manifest", "config", "source"),
    [
        (plugin(network={"mode": "vsock"}), vm(), Source.PLUGIN),
        (plugin(network=WEB), vm(network={"mode": "vsock"}), Source.VM),
        (plugin(network=WEB), vm(interfaces=[]), Source.VM),
        (plugin(interfaces=[]), vm(), Source.PLUGIN),
    ],
)
def test_a_vm_without_interfaces_is_vsock_and_keeps_its_network_json(
    manifest: Manifest, config: VMConfig, source: Source
) -> None:
    resolved = resolve(manifest, config)
    assert resolved.single and resolved.interfaces == () and resolved.default_route is None
    assert resolved.network is not None
    assert (resolved.network.mode, resolved.network.source) == (NetworkMode.VSOCK, source)
    assert resolved.to_json() == []


@pytest.mark.parametrize(
    ("config", "errors"),
    [
        (vm(interfaces=[]), {"interfaces": "does not allow vsock"}),
        (vm(interfaces=[DHCP, LAN]), {"interfaces.1.mode": "does not allow bridged"}),
        (vm(interfaces=[LAN, DHCP | {"network": "ext"}]), {"interfaces.0.mode": "bridged"}),
    ],
)
def test_the_plugins_allowed_modes_apply_to_every_interface(
    config: VMConfig, errors: dict[str, str]
) -> None:
    found = errors_of(plugin(network=DHCP, allowed_network_modes=["dhcp"]), config)
    assert list(found) == list(errors)
    for loc, text in errors.items():
        assert text in found[loc]


@pytest.mark.parametrize(
    ("interface", "loc", "text"),
    [
        ({"mode": "bridged", "network": "lan9"}, "interfaces.1.network", "no network named"),
        ({"mode": "dhcp", "network": "lan2"}, "interfaces.1.network", "runs no DHCP server"),
        ({"mode": "bridged", "network": "dhcp"}, "interfaces.1.network", "no subnet"),
        ({"mode": "bridged", "network": "lan2", "ip": "10.1.0.9"}, "interfaces.1.ip", "inside"),
        ({"mode": "bridged", "network": "lan2", "ip": "10.9.0.1"}, "interfaces.1.ip", "gateway"),
        ({"mode": "bridged", "ip": "10.1.0.9"}, "interfaces.1.ip", "default network"),
        (
            {"mode": "bridged", "network": "lan2", "ipv6": "fd00::10"},
            "interfaces.1.ipv6",
            "not inside the network's prefix",
        ),
        (
            {"mode": "bridged", "network": "lan2", "ipv6": "fd12:3456:789a:1::1"},
            "interfaces.1.ipv6",
            "router",
        ),
        (
            {"mode": "bridged", "network": "ext", "ipv6": "fd12:3456:789a:1::10"},
            "interfaces.1.ipv6",
            "network 'ext' has no IPv6 prefix",
        ),
        (
            {"mode": "bridged", "subnet": "10.2.0.0/24", "auto_assign": True, "ipv6": "fd00::5"},
            "interfaces.1.ipv6",
            "needs a registered network",
        ),
        (
            {"mode": "bridged", "subnet": "10.8.0.0/24", "auto_assign": True},
            "interfaces.1.subnet",
            "is on subnet 10.8.0.0/24, like interface 0",
        ),
    ],
)
def test_each_interface_is_resolved_with_its_errors_at_its_field(
    interface: dict[str, Any], loc: str, text: str
) -> None:
    first = {"mode": "bridged", "network": "plain"}
    found = errors_of(plugin(), vm(interfaces=[first, interface]))
    assert list(found) == [loc], found
    assert text in found[loc]


def test_every_interfaces_errors_are_reported_together() -> None:
    interfaces = [{"mode": "bridged", "network": "nope"}, DHCP, {"mode": "dhcp", "network": "lan2"}]
    assert list(errors_of(plugin(), vm(interfaces=interfaces))) == [
        "interfaces.0.network",
        "interfaces.2.network",
    ]


def test_a_named_network_and_the_subnet_it_has_are_one_network() -> None:
    interfaces = [
        {"mode": "bridged", "network": "lan2"},
        {"mode": "bridged", "subnet": "10.9.0.0/24", "auto_assign": True},
    ]
    assert list(errors_of(plugin(), vm(interfaces=interfaces))) == ["interfaces.1.subnet"]
    interfaces = [
        {"mode": "bridged"},
        {"mode": "bridged", "subnet": "10.57.0.0/24", "auto_assign": True},
    ]
    assert list(errors_of(plugin(), vm(interfaces=interfaces))) == ["interfaces.1.subnet"]


def test_offline_a_named_network_is_left_for_the_daemon() -> None:
    config = vm(interfaces=[{"mode": "bridged", "network": "lan2", "ipv6": "fd00::5"}, DHCP])
    named, dhcp = resolve(plugin(), config, lookup=None).interfaces
    assert named.unresolved == "network lan2: resolved by the daemon"
    assert named.to_json()["unresolved"] == "network lan2: resolved by the daemon"
    assert (named.network, named.subnet, named.ipv6_json()) == ("lan2", None, None)
    assert dhcp.unresolved is None and "unresolved" not in dhcp.to_json()
    single = resolve(plugin(), vm(network={"mode": "bridged", "network": "lan9"}), lookup=None)
    assert single.interfaces[0].unresolved == "network lan9: resolved by the daemon"


def test_a_dhcp_interface_that_names_no_network_is_on_the_dhcp_network() -> None:
    [interface] = resolve(plugin(), vm(interfaces=[DHCP])).interfaces
    assert interface.network == "dhcp"
    assert interface.plan.observe_ip and interface.plan.attach.value == "external"


@pytest.mark.parametrize(
    ("routes", "carrier"),
    [
        ([None, None, None], 0),
        ([None, True, None], 1),
        ([False, None, None], 1),
        ([False, False, True], 2),
    ],
)
def test_exactly_one_interface_carries_the_default_route(
    routes: list[bool | None], carrier: int
) -> None:
    networks = [LAN, DHCP, {"mode": "bridged", "network": "lan2"}]
    written = [net | {"default_route": route} for net, route in zip(networks, routes, strict=True)]
    resolved = resolve(plugin(), vm(interfaces=written))
    assert [i.default_route for i in resolved.interfaces] == [i == carrier for i in range(3)]
    assert resolved.default_route is resolved.interfaces[carrier]


def test_an_interface_json_has_every_field_null_when_unused() -> None:
    lan = {"mode": "bridged", "network": "lan2", "name": "lan", "mac": "02:00:00:00:01:05"}
    config = vm(interfaces=[lan, DHCP])
    lan, dhcp = resolve(plugin(), config).to_json()
    assert lan == {
        "name": "lan",
        "mode": "bridged",
        "network": "lan2",
        "subnet": "10.9.0.0/24",
        "gateway": "10.9.0.1",
        "auto_assign": True,
        "ip": None,
        "mac": "02:00:00:00:01:05",
        "ipv6": {
            "ip": "fd12:3456:789a:1:0:ff:fe00:105",
            "prefix": "fd12:3456:789a:1::/64",
            "gateway": "fd12:3456:789a:1::1",
            "source": "slaac",
        },
        "default_route": True,
    }
    assert dhcp == {
        "name": "eth1",
        "mode": "dhcp",
        "network": "dhcp",
        "subnet": None,
        "gateway": None,
        "auto_assign": None,
        "ip": None,
        "mac": None,
        "ipv6": None,
        "default_route": False,
    }


def test_ipv6_is_static_when_given_and_slaac_unknown_until_roost_picks_the_mac() -> None:
    static, slaac = resolve(
        plugin(),
        vm(
            interfaces=[
                {"mode": "bridged", "network": "lan2", "ipv6": "fd12:3456:789a:1::10"},
                {"mode": "bridged", "network": "ext"},
            ]
        ),
    ).interfaces
    assert static.ipv6_json() == {
        "ip": "fd12:3456:789a:1::10",
        "prefix": "fd12:3456:789a:1::/64",
        "gateway": "fd12:3456:789a:1::1",
        "source": "static",
    }
    assert slaac.ipv6_json() is None  # ext has no prefix
    [on_lan2] = resolve(plugin(), vm(network={"mode": "bridged", "network": "lan2"})).interfaces
    assert on_lan2.ipv6_json() == {
        "ip": None,
        "prefix": "fd12:3456:789a:1::/64",
        "gateway": "fd12:3456:789a:1::1",
        "source": "slaac",
    }


def test_an_allocated_address_completes_the_interfaces_plan() -> None:
    [interface] = resolve(
        plugin(), vm(interfaces=[{"mode": "bridged", "network": "lan2"}])
    ).interfaces
    assert interface.plan.kernel_ip_arg is None
    given_ip = interface.with_ip(ipaddress.IPv4Address("10.9.0.2"), "web-1")
    assert given_ip.ip == ipaddress.IPv4Address("10.9.0.2")
    assert given_ip.plan.kernel_ip_arg == "ip=10.9.0.2::10.9.0.1:255.255.255.0:web-1:eth0:off"


# --- the property: one network, two ways of writing it -----------------------------------------

SUBNETS = ["10.1.0.0/24", "10.57.0.0/24", "172.16.4.0/22", "10.9.0.0/24"]


@st.composite
def networks(draw: st.DrawFn) -> dict[str, Any]:
    """A network as a VM writes it, valid or not: bridged on a subnet, a registered network or
    the daemon's default, with or without an address; or dhcp, on a network or not."""
    mode = draw(st.sampled_from(["bridged", "dhcp"]))
    written: dict[str, Any] = {"mode": mode}
    where = draw(st.sampled_from(["subnet", "named", "default"]))
    if where == "named":
        written["network"] = draw(st.sampled_from([*REGISTRY, "lan9"]))
    if mode == "dhcp":
        return written
    if where == "subnet":
        subnet = ipaddress.IPv4Network(draw(st.sampled_from(SUBNETS)))
        written["subnet"] = str(subnet)
        if draw(st.booleans()):
            written["gateway"] = str(subnet.network_address + draw(st.sampled_from([1, 2, 300])))
        space = subnet
    else:
        found = REGISTRY.get(written.get("network", ""))
        space = found.subnet if found and found.subnet else DEFAULT.subnet
    auto = draw(st.sampled_from([None, True, False]))
    if auto is not None:
        written["auto_assign"] = auto
    if draw(st.booleans()):
        written["ip"] = str(space.network_address + draw(st.sampled_from([1, 5, 77, 1030])))
    return written


def outcome(
    manifest: Manifest, config: dict[str, Any], lookup: NetworkLookup | None
) -> tuple[str, Any]:
    """What resolution makes of a config: its one interface and plan, or its errors' fields
    (`network.x` and `interfaces.0.x` named alike)."""
    try:
        resolved = resolve(manifest, parse(VMConfig, {"plugin": "web", **config}), lookup)
    except InvalidError as error:
        locs = {d.loc.replace("interfaces.0", "network") for d in error.details}
        return "invalid", {loc.split(".")[-1] for loc in locs}
    [interface] = resolved.interfaces
    return "valid", (interface, interface.plan, interface.to_json())


# plugins whose network a VM's inherits nothing from (another mode, or none)
PLUGINS = [
    plugin(),
    plugin(allowed_network_modes=["bridged", "dhcp"]),
    plugin(network={"mode": "vsock"}),
    plugin(network={"mode": "vsock"}, allowed_network_modes=["vsock", "dhcp"]),
    plugin(network={"mode": "vsock"}, allowed_network_modes=["vsock", "bridged"]),
]


@settings(max_examples=300, deadline=None)
@given(written=networks(), offline=st.booleans(), manifest=st.sampled_from(PLUGINS))
def test_a_single_network_and_the_same_one_interface_plan_the_same_host_state(
    written: dict[str, Any], offline: bool, manifest: Manifest
) -> None:
    lookup = None if offline else LOOKUP
    as_network = outcome(manifest, {"network": written}, lookup)
    as_interfaces = outcome(manifest, {"interfaces": [written]}, lookup)
    if as_network[0] == "invalid" and as_interfaces[0] == "invalid":
        # a fault both name: an interface is judged whole when the config is read, a single
        # network partly then and partly at resolution, so each may stop at another stage
        assert as_network[1] & as_interfaces[1]
        return
    assert as_network == as_interfaces
