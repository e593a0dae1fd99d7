"""Every rule of `interfaces` in a VM config, a patch and a manifest, with the exact `loc` of
each error: the rules of `network` per interface, the fields only an interface has, the rules
between interfaces, and the two forms (`network`, `interfaces`) never together."""

from __future__ import annotations

from typing import Any

import pytest

from roost.errors import InvalidError
from roost.spec import InterfaceConfig, IPv6Static, Manifest, NetworkMode, VMConfig, VMConfigPatch
from roost.spec.interfaces import MAX_INTERFACES
from roost.spec.parse import parse

BASE: dict[str, Any] = {"name": "web", "version": "1.0.0", "initramfs": {"path": "i.cpio"}}
LAN = {"mode": "bridged", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1", "ip": "10.1.0.5"}
DHCP = {"mode": "dhcp"}


def vm(*interfaces: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"plugin": "web", "interfaces": list(interfaces), **fields}


def manifest(*interfaces: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**BASE, "interfaces": list(interfaces), **fields}


Model = type[VMConfig] | type[Manifest] | type[VMConfigPatch]


def errors_of(model: Model, data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidError) as caught:
        parse(model, data)
    return {detail.loc: detail.msg for detail in caught.value.details}


def test_an_interface_is_normalised_and_keeps_every_field() -> None:
    config = parse(
        VMConfig,
        vm(
            {
                "mode": " Bridged ",
                "network": "lan2",
                "name": "uplink",
                "mac": "02-AA-BB-00-00-01",
                "ipv6": " fd12:3456:789a:1:0::10 ",
                "default_route": True,
            }
        ),
    )
    assert config.interfaces == [
        InterfaceConfig(
            mode=NetworkMode.BRIDGED,
            network="lan2",
            name="uplink",
            mac="02:aa:bb:00:00:01",
            ipv6=IPv6Static(ip="fd12:3456:789a:1::10"),
            default_route=True,
        )
    ]


def test_ipv6_as_an_object_reads_as_the_short_form() -> None:
    long = parse(VMConfig, vm({"mode": "bridged", "network": "lan2", "ipv6": {"ip": "fd00::5"}}))
    short = parse(VMConfig, vm({"mode": "bridged", "network": "lan2", "ipv6": "fd00::5"}))
    assert long == short


def test_the_schema_shows_both_forms_of_ipv6_and_only_the_interface_modes() -> None:
    schema = VMConfig.model_json_schema()["$defs"]["InterfaceConfig"]
    assert schema["properties"]["mode"]["enum"] == ["bridged", "dhcp", "cni"]
    assert schema["required"] == ["mode"]
    kinds = [k.get("type") or k.get("$ref") for k in schema["properties"]["ipv6"]["anyOf"]]
    assert kinds == ["string", "#/$defs/IPv6Static", "null"]


def test_an_empty_list_is_a_vsock_only_vm() -> None:
    assert parse(VMConfig, vm()).interfaces == []


@pytest.mark.parametrize(
    ("interface", "loc", "text"),
    [
        # the fields only an interface has
        ({}, "interfaces.0.mode", "is required"),
        ({"mode": "vsock"}, "interfaces.0.mode", "interfaces: [] is a vsock-only VM"),
        ({"mode": "nat"}, "interfaces.0.mode", "not a network mode"),
        ({**DHCP, "name": ""}, "interfaces.0.name", "1-15"),
        ({**DHCP, "name": "a" * 16}, "interfaces.0.name", "16 bytes"),
        ({**DHCP, "name": "eth 1"}, "interfaces.0.name", "not an interface name"),
        ({**DHCP, "name": "eth/1"}, "interfaces.0.name", "not an interface name"),
        ({**DHCP, "name": "eth,1"}, "interfaces.0.name", "not an interface name"),
        ({**DHCP, "name": ".."}, "interfaces.0.name", "not an interface name"),
        ({**DHCP, "name": "lo"}, "interfaces.0.name", "the guest's loopback"),
        ({**DHCP, "name": "all"}, "interfaces.0.name", "/proc/sys/net/ipv4/conf/all"),
        ({**DHCP, "name": 1}, "interfaces.0.name", "must be a string"),
        ({**DHCP, "mac": "02:00:00:00:00"}, "interfaces.0.mac", "not a MAC address"),
        ({**DHCP, "mac": "03:00:00:00:00:01"}, "interfaces.0.mac", "multicast"),
        ({**DHCP, "mac": "00:16:3e:00:00:01"}, "interfaces.0.mac", "locally administered"),
        ({**DHCP, "mac": "fe:00:00:00:00:01"}, "interfaces.0.mac", "host side of each tap"),
        ({**LAN, "ipv6": "fd00::5/64"}, "interfaces.0.ipv6.ip", "without a prefix length"),
        ({**LAN, "ipv6": "10.1.0.9"}, "interfaces.0.ipv6.ip", "is an IPv4 address"),
        ({**LAN, "ipv6": "fe80::5"}, "interfaces.0.ipv6.ip", "link-local"),
        ({**LAN, "ipv6": "ff02::1"}, "interfaces.0.ipv6.ip", "multicast"),
        ({**LAN, "ipv6": "::1"}, "interfaces.0.ipv6.ip", "loopback"),
        ({**LAN, "ipv6": "::"}, "interfaces.0.ipv6.ip", "unspecified"),
        ({**LAN, "ipv6": "::ffff:10.1.0.9"}, "interfaces.0.ipv6.ip", "IPv4-mapped"),
        ({**LAN, "ipv6": {"address": "fd00::5"}}, "interfaces.0.ipv6.address", "not a known"),
        ({**DHCP, "ipv6": "fd00::5"}, "interfaces.0.ipv6", "only valid in bridged mode"),
        ({**DHCP, "default_route": "yes"}, "interfaces.0.default_route", "true or false"),
        ({**DHCP, "colour": "red"}, "interfaces.0.colour", "not a known field"),
        # the rules of `network`, per interface
        ({**DHCP, "ip": "10.1.0.5"}, "interfaces.0.ip", "only valid in bridged mode"),
        ({**DHCP, "auto_assign": True}, "interfaces.0.auto_assign", "only valid in bridged"),
        ({"mode": "bridged", "subnet": "10.1.0.0/33"}, "interfaces.0.subnet", "not a CIDR"),
        ({"mode": "bridged", "subnet": "127.0.0.0/24"}, "interfaces.0.subnet", "loopback"),
        ({**LAN, "ip": "10.2.0.5"}, "interfaces.0.ip", "not inside subnet 10.1.0.0/24"),
        ({**LAN, "ip": "10.1.0.1"}, "interfaces.0.ip", "the gateway's address"),
        ({**LAN, "gateway": "10.9.0.1"}, "interfaces.0.gateway", "not inside subnet"),
        ({"mode": "bridged", "subnet": "10.1.0.0/24"}, "interfaces.0.gateway", "auto_assign"),
        ({"mode": "bridged", "gateway": "10.1.0.1"}, "interfaces.0.gateway", "needs a subnet"),
        ({**LAN, "ip": None}, "interfaces.0", "needs an ip or auto_assign: true"),
        ({"mode": "bridged", "auto_assign": False}, "interfaces.0", "needs an ip or auto_assign"),
        ({**LAN, "network": "lan2"}, "interfaces.0.network", "give network or subnet"),
        ({"mode": "bridged", "network": "Lan 2"}, "interfaces.0.network", "not a network name"),
    ],
)
def test_each_interface_rule_is_reported_at_its_field(
    interface: dict[str, Any], loc: str, text: str
) -> None:
    errors = errors_of(VMConfig, vm(DHCP | {"name": "other"}, interface))
    shifted = loc.replace("interfaces.0", "interfaces.1")
    assert shifted in errors, errors
    assert text in errors[shifted]


@pytest.mark.parametrize(
    ("interfaces", "loc", "text"),
    [
        ([LAN, LAN | {"ip": "10.1.0.6"}], "interfaces.1.subnet", "subnet 10.1.0.0/24"),
        (
            [{"mode": "bridged", "network": "lan2"}, {"mode": "bridged", "network": "lan2"}],
            "interfaces.1.network",
            "network 'lan2'",
        ),
        ([DHCP, DHCP], "interfaces.1.network", "network 'dhcp'"),
        ([DHCP, DHCP | {"network": "dhcp"}], "interfaces.1.network", "network 'dhcp'"),
        (
            [{"mode": "bridged"}, {"mode": "bridged", "ip": "10.57.0.9"}],
            "interfaces.1.network",
            "the daemon's default network",
        ),
        ([LAN, DHCP | {"name": "eth0"}], "interfaces.1.name", "the guest name 'eth0'"),
        (
            [LAN | {"name": "lan"}, DHCP | {"name": "lan"}],
            "interfaces.1.name",
            "the guest name 'lan'",
        ),
        (
            [LAN | {"mac": "02:00:00:00:00:01"}, DHCP | {"mac": "02:00:00:00:00:01"}],
            "interfaces.1.mac",
            "MAC 02:00:00:00:00:01",
        ),
        (
            [LAN | {"default_route": True}, DHCP | {"default_route": True}],
            "interfaces.1.default_route",
            "interface 0 already carries the default route",
        ),
        (
            [LAN | {"default_route": False}, DHCP | {"default_route": False}],
            "interfaces.0.default_route",
            "one must carry the default route",
        ),
    ],
)
def test_interfaces_of_one_vm_share_no_network_name_mac_or_default_route(
    interfaces: list[dict[str, Any]], loc: str, text: str
) -> None:
    errors = errors_of(VMConfig, vm(*interfaces))
    assert list(errors) == [loc]
    assert text in errors[loc]


def test_the_same_mac_written_in_two_cases_is_one_mac() -> None:
    interfaces = [LAN | {"mac": "02:AA:00:00:00:01"}, DHCP | {"mac": "02:aa:00:00:00:01"}]
    assert list(errors_of(VMConfig, vm(*interfaces))) == ["interfaces.1.mac"]


def test_a_vm_has_at_most_eight_interfaces_read_or_not() -> None:
    many = [DHCP | {"network": f"n{i}"} for i in range(MAX_INTERFACES)]
    assert len(parse(VMConfig, vm(*many)).interfaces or []) == MAX_INTERFACES
    errors = errors_of(VMConfig, vm(*many, DHCP | {"network": "one-more"}))
    assert list(errors) == ["interfaces"]
    assert f"at most {MAX_INTERFACES}" in errors["interfaces"]
    assert list(errors_of(VMConfig, vm(*["not read"] * 1000))) == ["interfaces"]  # type: ignore[arg-type]


@pytest.mark.parametrize("model", [VMConfig, Manifest])
def test_network_and_interfaces_together_are_invalid(model: Model) -> None:
    base = vm() if model is VMConfig else manifest()
    errors = errors_of(model, {**base, "network": {"mode": "vsock"}})
    assert list(errors) == ["interfaces"]
    assert "not both" in errors["interfaces"]


@pytest.mark.parametrize(
    ("interface", "loc", "text"),
    [
        (LAN | {"auto_assign": True}, "interfaces.0.ip", "is per-VM"),
        (DHCP | {"mac": "02:00:00:00:00:01"}, "interfaces.0.mac", "is per-VM"),
        (
            {"mode": "bridged", "network": "lan2", "ipv6": "fd00::5"},
            "interfaces.0.ipv6",
            "is per-VM",
        ),
        (
            {"mode": "bridged", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1"},
            "interfaces.0.auto_assign",
            "cannot add an ip",
        ),
        ({"mode": "bridged", "subnet": "10.1.0.0/24"}, "interfaces.0.gateway", "auto_assign"),
    ],
)
def test_a_plugins_interfaces_leave_what_is_per_vm_to_the_vm(
    interface: dict[str, Any], loc: str, text: str
) -> None:
    errors = errors_of(Manifest, manifest(interface))
    assert list(errors) == [loc]
    assert text in errors[loc]


def test_a_plugins_interfaces_auto_assign_on_their_subnets_or_named_networks() -> None:
    parsed = parse(
        Manifest,
        manifest(
            {
                "mode": "bridged",
                "subnet": "10.1.0.0/24",
                "gateway": "10.1.0.1",
                "auto_assign": True,
            },
            {"mode": "bridged", "network": "lan2"},
            {"mode": "bridged", "subnet": "10.2.0.0/24", "auto_assign": True},
            DHCP,
        ),
    )
    assert [i.mode for i in parsed.interfaces or []] == ["bridged"] * 3 + ["dhcp"]


@pytest.mark.parametrize(
    ("allowed", "interfaces", "errors"),
    [
        (["dhcp"], [DHCP], {}),
        (["dhcp"], [DHCP, {"mode": "bridged"}], {"interfaces.1.mode": "allowed_network_modes"}),
        (["dhcp", "bridged"], [], {"interfaces": "vsock is not in"}),
        (["vsock"], [], {}),
        (["vsock"], [DHCP], {"interfaces.0.mode": "allowed_network_modes"}),
    ],
)
def test_allowed_network_modes_apply_to_every_interface_and_vsock_is_none(
    allowed: list[str], interfaces: list[dict[str, Any]], errors: dict[str, str]
) -> None:
    data = manifest(*interfaces, allowed_network_modes=allowed)
    if not errors:
        parse(Manifest, data)
        return
    found = errors_of(Manifest, data)
    assert list(found) == list(errors)
    for loc, text in errors.items():
        assert text in found[loc]


def test_a_manifest_with_interfaces_needs_no_network_when_bridged_is_not_allowed() -> None:
    parse(Manifest, manifest(DHCP, allowed_network_modes=["dhcp"]))


def test_configs_without_interfaces_dump_as_before_the_field_existed() -> None:
    config = parse(VMConfig, {"plugin": "web", "network": {"mode": "dhcp"}})
    assert "interfaces" not in config.model_dump()
    assert "interfaces" not in config.model_dump(mode="json")
    plugin = parse(Manifest, {**BASE, "network": {"mode": "dhcp"}})
    assert "interfaces" not in plugin.model_dump(mode="json")


def test_an_empty_list_is_kept_in_the_stored_json() -> None:
    stored = parse(VMConfig, vm()).model_dump(mode="json")
    assert stored["interfaces"] == []
    assert VMConfig.model_validate(stored) == parse(VMConfig, vm())


def test_stored_interfaces_read_back_equal() -> None:
    config = parse(VMConfig, vm(LAN | {"mac": "02:00:00:00:00:01"}, DHCP | {"ipv6": None}))
    assert VMConfig.model_validate(config.model_dump(mode="json")) == config
    assert VMConfig.model_validate(config.model_dump(exclude_none=True)) == config


ON_NETWORK = parse(VMConfig, {"plugin": "web", "network": {"mode": "dhcp"}})
ON_INTERFACES = parse(VMConfig, vm(LAN))


@pytest.mark.parametrize(
    ("before", "patch", "network", "interfaces"),
    [
        (ON_NETWORK, {"interfaces": [LAN]}, None, [LAN]),
        (ON_NETWORK, {"interfaces": []}, None, []),
        (ON_INTERFACES, {"network": {"mode": "vsock"}}, {"mode": "vsock"}, None),
        (ON_INTERFACES, {"network": None}, None, None),
        (ON_NETWORK, {"interfaces": None}, None, None),
        (ON_INTERFACES, {"interfaces": [DHCP]}, None, [DHCP]),
        (ON_INTERFACES, {"labels": {"a": "b"}}, None, [LAN]),
        (ON_NETWORK, {"labels": {"a": "b"}}, {"mode": "dhcp"}, None),
    ],
)
def test_a_patch_carrying_one_form_clears_the_other(
    before: VMConfig,
    patch: dict[str, Any],
    network: dict[str, Any] | None,
    interfaces: list[dict[str, Any]] | None,
) -> None:
    after = parse(VMConfigPatch, patch).apply(before)
    expected = parse(VMConfig, {"plugin": "web", "network": network, "interfaces": interfaces})
    assert (after.network, after.interfaces) == (expected.network, expected.interfaces)


def test_a_patch_with_both_forms_is_invalid() -> None:
    errors = errors_of(VMConfigPatch, {"network": {"mode": "dhcp"}, "interfaces": [LAN]})
    assert list(errors) == ["interfaces"]


def test_a_patchs_interfaces_follow_every_rule() -> None:
    errors = errors_of(VMConfigPatch, {"interfaces": [LAN, LAN | {"ip": "10.1.0.6"}]})
    assert list(errors) == ["interfaces.1.subnet"]
