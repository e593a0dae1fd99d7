"""Every network rule of the spec, valid and invalid, with the exact `loc` of each error."""

from __future__ import annotations

from typing import Any

import pytest

from roost.errors import InvalidError
from roost.spec import Manifest, NetworkMode, VMConfig, parse

BASE: dict[str, Any] = {"name": "web", "version": "1.0.0", "initramfs": {"path": "i.cpio"}}


def manifest(**fields: Any) -> dict[str, Any]:
    return {**BASE, **fields}


def errors_of(model: type[Manifest] | type[VMConfig], data: dict[str, Any]) -> list[str]:
    with pytest.raises(InvalidError) as caught:
        parse(model, data)
    return [detail.loc for detail in caught.value.details]


def messages_of(model: type[Manifest] | type[VMConfig], data: dict[str, Any]) -> str:
    with pytest.raises(InvalidError) as caught:
        parse(model, data)
    return " | ".join(f"{d.loc}: {d.msg}" for d in caught.value.details)


# Rule 1: mode trimmed and lower-cased, one of three; required on a manifest.
@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("vsock", NetworkMode.VSOCK),
        (" Bridged ", NetworkMode.BRIDGED),
        ("DHCP", NetworkMode.DHCP),
        ("\tdhcp\n", NetworkMode.DHCP),
    ],
)
def test_mode_is_normalised(written: str, expected: NetworkMode) -> None:
    parsed = parse(Manifest, manifest(network={"mode": written}))
    assert parsed.network is not None
    assert parsed.network.mode is expected


@pytest.mark.parametrize(
    ("network", "loc", "text"),
    [
        ({"mode": "nat"}, "network.mode", "use one of vsock, bridged, dhcp"),
        ({"mode": ""}, "network.mode", "not a network mode"),
        ({"mode": 3}, "network.mode", "must be a string"),
        ({}, "network.mode", "is required"),
        ({"subnet": "10.1.0.0/24", "auto_assign": True}, "network.mode", "is required"),
    ],
)
def test_manifest_mode_errors(network: dict[str, Any], loc: str, text: str) -> None:
    assert errors_of(Manifest, manifest(network=network)) == [loc]
    assert text in messages_of(Manifest, manifest(network=network))


@pytest.mark.parametrize("network", [None, {"ip": "10.100.0.7"}, {"auto_assign": True}])
def test_vm_override_may_omit_mode(network: dict[str, Any] | None) -> None:
    config = parse(VMConfig, {"plugin": "web", "network": network})
    assert config.network is None or config.network.mode is None


def test_absent_or_null_network_is_fine_everywhere() -> None:
    assert parse(Manifest, manifest()).network is None
    assert parse(Manifest, manifest(network=None)).network is None
    assert parse(VMConfig, {"plugin": "web"}).network is None


# Rule 2: bridged with a subnet needs a gateway or auto_assign; gateway needs a subnet.
@pytest.mark.parametrize(
    "network",
    [
        {"mode": "bridged", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1"},
        {"mode": "bridged", "subnet": "10.1.0.0/24", "auto_assign": True},
        {"mode": "bridged", "subnet": "10.1.0.0/24", "gateway": "10.1.0.9", "auto_assign": False},
        {"mode": "bridged"},
        {"mode": "bridged", "auto_assign": True},
        {"mode": "bridged", "auto_assign": False},
    ],
)
def test_valid_bridged_plugin_networks(network: dict[str, Any]) -> None:
    parse(Manifest, manifest(network=network))


@pytest.mark.parametrize(
    ("network", "locs"),
    [
        ({"mode": "bridged", "subnet": "10.1.0.0/24"}, ["network.gateway"]),
        ({"mode": "bridged", "subnet": "10.1.0.0/24", "auto_assign": False}, ["network.gateway"]),
        ({"mode": "bridged", "gateway": "10.1.0.1"}, ["network.gateway"]),
    ],
)
def test_bridged_rule_two(network: dict[str, Any], locs: list[str]) -> None:
    assert errors_of(Manifest, manifest(network=network)) == locs


# Rule 3: strict IPv4 CIDR, /8 to /30, IPv6 "not supported yet".
@pytest.mark.parametrize(
    ("subnet", "text"),
    [
        ("10.9.0.5/24", "has host bits set; did you mean 10.9.0.0/24?"),
        ("10.0.0.0/7", "prefix /7 is out of range"),
        ("10.0.0.0/31", "prefix /31 is out of range"),
        ("10.0.0.0/32", "prefix /32 is out of range"),
        ("10.0.0.0", "is not a CIDR; write it with a prefix"),
        ("fd00::/64", "IPv6 is not supported yet"),
        ("10.0.0.0/33", "is not a CIDR"),
        ("banana/24", "is not a CIDR"),
        (24, "must be a string CIDR"),
        ("10.0.0.0/024", "/024 has a leading zero; write the prefix length, 10.0.0.0/24"),
        ("10.0.0.0/255.255.0.0", "/255.255.0.0 is a mask; write the prefix length, 10.0.0.0/16"),
        ("127.0.0.0/8", "overlaps 127.0.0.0/8, the loopback range"),
        ("169.254.1.0/24", "overlaps 169.254.0.0/16, the link-local range"),
    ],
)
def test_subnet_errors(subnet: Any, text: str) -> None:
    data = manifest(network={"mode": "bridged", "subnet": subnet, "auto_assign": True})
    assert errors_of(Manifest, data) == ["network.subnet"]
    assert text in messages_of(Manifest, data)


@pytest.mark.parametrize("subnet", ["10.0.0.0/8", "192.168.7.252/30", " 10.9.0.0/24 "])
def test_subnet_bounds_accepted(subnet: str) -> None:
    data = manifest(network={"mode": "bridged", "subnet": subnet, "auto_assign": True})
    parsed = parse(Manifest, data)
    assert parsed.network is not None
    assert parsed.network.subnet == subnet.strip()


# Rule 4: gateway and ip inside the subnet, never network/broadcast, ip != gateway.
@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("gateway", "10.9.1.1", "10.9.1.1 is not inside subnet 10.9.0.0/24"),
        ("gateway", "10.9.0.0", "is the network address of 10.9.0.0/24"),
        ("gateway", "10.9.0.255", "is the broadcast address of 10.9.0.0/24"),
        ("gateway", "fd00::1", "IPv6 is not supported yet"),
        ("gateway", "10.9.0", "is not an IPv4 address"),
    ],
)
def test_gateway_errors(field: str, value: str, text: str) -> None:
    data = manifest(network={"mode": "bridged", "subnet": "10.9.0.0/24", field: value})
    assert errors_of(Manifest, data) == [f"network.{field}"]
    assert text in messages_of(Manifest, data)


@pytest.mark.parametrize(
    ("ip", "text"),
    [
        ("10.9.1.7", "10.9.1.7 is not inside subnet 10.9.0.0/24"),
        ("10.9.0.0", "is the network address"),
        ("10.9.0.255", "is the broadcast address"),
        ("10.9.0.1", "is the gateway's address"),
    ],
)
def test_vm_ip_errors_with_own_subnet(ip: str, text: str) -> None:
    network = {"mode": "bridged", "subnet": "10.9.0.0/24", "gateway": "10.9.0.1", "ip": ip}
    data = {"plugin": "web", "network": network}
    assert errors_of(VMConfig, data) == ["network.ip"]
    assert text in messages_of(VMConfig, data)


# Rule 5: ip is per-VM only.
def test_ip_on_a_manifest_is_an_error() -> None:
    network = {"mode": "bridged", "subnet": "10.9.0.0/24", "auto_assign": True, "ip": "10.9.0.7"}
    assert errors_of(Manifest, manifest(network=network)) == ["network.ip"]
    assert "per-VM" in messages_of(Manifest, manifest(network=network))


# Rule 6: bridged-only fields in vsock and dhcp modes are errors.
@pytest.mark.parametrize("mode", ["vsock", "dhcp"])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subnet", "10.9.0.0/24"),
        ("gateway", "10.9.0.1"),
        ("ip", "10.9.0.7"),
        ("auto_assign", True),
    ],
)
def test_bridged_only_fields(mode: str, field: str, value: Any) -> None:
    network = {"mode": mode, field: value}
    expected = [f"network.{field}"]
    if field == "ip":  # a manifest also may not pin an ip; the VM config shows rule 6 alone
        assert errors_of(VMConfig, {"plugin": "web", "network": network}) == expected
    else:
        assert errors_of(Manifest, manifest(network=network)) == expected
        assert "only valid in bridged mode" in messages_of(Manifest, manifest(network=network))
        assert errors_of(VMConfig, {"plugin": "web", "network": network}) == expected


@pytest.mark.parametrize("mode", ["vsock", "dhcp"])
def test_auto_assign_false_is_harmless_outside_bridged(mode: str) -> None:
    parse(Manifest, manifest(network={"mode": mode, "auto_assign": False}))


# Rule 7: a manifest's mode must be within its own allowed modes.
@pytest.mark.parametrize(
    ("fields", "locs"),
    [
        ({"network": {"mode": "dhcp"}, "allowed_network_modes": ["vsock"]}, ["network.mode"]),
        ({"allowed_network_modes": ["vsock", "dhcp"]}, ["network"]),
        ({"allowed_network_modes": []}, ["allowed_network_modes"]),
        (
            {"network": {"mode": "vsock"}, "allowed_network_modes": ["vsock", "Vsock"]},
            ["allowed_network_modes.1"],
        ),
        ({"allowed_network_modes": ["vsock", "nat"]}, ["allowed_network_modes.1"]),
        ({"allowed_network_modes": "vsock"}, ["allowed_network_modes"]),
    ],
)
def test_allowed_modes_errors(fields: dict[str, Any], locs: list[str]) -> None:
    assert errors_of(Manifest, manifest(**fields)) == locs


@pytest.mark.parametrize(
    "fields",
    [
        {"allowed_network_modes": ["bridged", "vsock"]},
        {"network": {"mode": "vsock"}, "allowed_network_modes": ["vsock"]},
        {"network": {"mode": "dhcp"}, "allowed_network_modes": ["dhcp", "bridged"]},
    ],
)
def test_allowed_modes_accepted(fields: dict[str, Any]) -> None:
    parse(Manifest, manifest(**fields))
