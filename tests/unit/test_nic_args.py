"""The guest's kernel arguments for its interfaces: roost.nic= per address, roost.default=,
and the classic ip= for a lone static interface; what they say parses back to the input."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roost.plan.nic_args import GuestNIC, nic_args

V4 = ipaddress.IPv4Interface
V6 = ipaddress.IPv6Interface
GW4 = ipaddress.IPv4Address
GW6 = ipaddress.IPv6Address
A = "06:00:0a:01:00:05"
B = "06:00:0a:02:00:07"

STATIC = GuestNIC(A, ipv4=V4("10.1.0.5/24"), gateway=GW4("10.1.0.1"), default_route=True)
DHCP = GuestNIC(B, name="lan", dhcp=True, mtu=1400)

CASES: dict[str, tuple[tuple[GuestNIC, ...], tuple[str, ...]]] = {
    "no interface": ((), ()),
    "one static interface also gets the classic ip=": (
        (STATIC,),
        (
            "ip=10.1.0.5::10.1.0.1:255.255.255.0:web:eth0:off",
            f"roost.nic={A},10.1.0.5/24,10.1.0.1",
            f"roost.default={A}",
        ),
    ),
    "one dhcp interface gets no ip=": (
        (DHCP,),
        (f"roost.nic={B},dhcp,name=lan,mtu=1400",),
    ),
    "two interfaces: no ip=, the default named by MAC": (
        (DHCP, STATIC),
        (
            f"roost.nic={B},dhcp,name=lan,mtu=1400",
            f"roost.nic={A},10.1.0.5/24,10.1.0.1",
            f"roost.default={A}",
        ),
    ),
    "IPv4 and IPv6 addresses: one argument each, each family's gateway on its own": (
        (
            GuestNIC(
                A,
                name="eth1",
                ipv4=V4("10.1.0.5/24"),
                gateway=GW4("10.1.0.1"),
                ipv6=V6("fd00::5/64"),
                ipv6_gateway=GW6("fd00::1"),
                mtu=9000,
            ),
            GuestNIC(B, dhcp=True, ipv6=V6("fd01::7/64"), default_route=True),
        ),
        (
            f"roost.nic={A},10.1.0.5/24,10.1.0.1,name=eth1,mtu=9000",
            f"roost.nic={A},fd00::5/64,fd00::1",
            f"roost.nic={B},dhcp",
            f"roost.nic={B},fd01::7/64",
            f"roost.default={B}",
        ),
    ),
    "a static interface without a gateway gets no ip= (the kernel's needs one)": (
        (GuestNIC(A, ipv4=V4("10.1.0.5/24")),),
        (f"roost.nic={A},10.1.0.5/24",),
    ),
    "an IPv6-only interface": (
        (GuestNIC(A, ipv6=V6("fd00::5/64")),),
        (f"roost.nic={A},fd00::5/64",),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_arguments_for_each_kind_of_interface_list(case: str) -> None:
    nics, expected = CASES[case]
    assert nic_args(nics, "web") == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(mac="06:00:0A:01:00:05", dhcp=True), "lower-case hex"),
        (dict(mac="06:00:0a:01:00", dhcp=True), "lower-case hex"),
        (dict(mac=A, dhcp=True, name="a,b"), "interface name"),
        (dict(mac=A, dhcp=True, name="sixteen-bytes-xx"), "interface name"),
        (dict(mac=A, dhcp=True, ipv4=V4("10.0.0.2/24")), "both DHCP and static"),
        (dict(mac=A), "has no address"),
        (dict(mac=A, dhcp=True, gateway=GW4("10.0.0.1")), "IPv4 gateway but no static"),
        (dict(mac=A, dhcp=True, ipv6_gateway=GW6("fd00::1")), "IPv6 gateway but no static"),
        (dict(mac=A, dhcp=True, mtu=67), "MTU 67"),
    ],
)
def test_an_interface_that_cannot_be_said_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GuestNIC(**fields)


@pytest.mark.parametrize(
    ("nics", "message"),
    [
        ((GuestNIC(A, dhcp=True), GuestNIC(A, dhcp=True)), "share a MAC"),
        ((GuestNIC(A, dhcp=True, name="x"), GuestNIC(B, dhcp=True, name="x")), "share a name"),
        (
            (
                GuestNIC(A, dhcp=True, default_route=True),
                GuestNIC(B, dhcp=True, default_route=True),
            ),
            "only one interface may carry the default route",
        ),
    ],
)
def test_an_interface_list_the_guest_could_not_tell_apart_is_refused(
    nics: tuple[GuestNIC, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        nic_args(nics, "web")


def parse(args: tuple[str, ...]) -> tuple[list[GuestNIC], str | None]:
    """What a guest's init reads from the arguments (the demo guest's rules): every roost.nic=
    grouped by MAC in first-seen order, and the classic ip= if any."""
    fields: dict[str, dict[str, Any]] = {}
    classic = None
    default = None
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "ip":
            classic = arg
        elif key == "roost.default":
            default = value
        else:
            assert key == "roost.nic"
            mac, how, *rest = value.split(",")
            nic = fields.setdefault(mac, {"mac": mac})
            options = dict(item.split("=", 1) for item in rest if "=" in item)
            gateways = [item for item in rest if "=" not in item]
            nic.update(name=options.get("name", nic.get("name")))
            if "mtu" in options:
                nic["mtu"] = int(options["mtu"])
            if how == "dhcp":
                nic["dhcp"] = True
                continue
            address = ipaddress.ip_interface(how)
            family = "ipv4" if address.version == 4 else "ipv6"
            assert family not in nic, f"a second {family} address for {mac}"
            nic[family] = address
            if gateways:
                [gateway] = gateways
                nic["gateway" if family == "ipv4" else "ipv6_gateway"] = ipaddress.ip_address(
                    gateway
                )
    nics = [GuestNIC(**nic, default_route=mac == default) for mac, nic in fields.items()]
    return nics, classic


def mac_of(value: int) -> str:
    """A locally administered unicast MAC: 06 and five bytes of `value`."""
    return ":".join(f"{byte:02x}" for byte in (6, *value.to_bytes(5, "big")))


macs = st.lists(st.integers(0, 2**40 - 1), max_size=4, unique=True).map(
    lambda values: [mac_of(value) for value in values]
)


@st.composite
def interface_lists(draw: st.DrawFn) -> tuple[GuestNIC, ...]:
    nics = []
    addresses = draw(macs)
    default = draw(st.none() | st.integers(0, max(len(addresses) - 1, 0)))
    for index, mac in enumerate(addresses):
        dhcp = draw(st.booleans())
        ipv4 = None if dhcp else draw(st.none() | st.ip_addresses(v=4).map(lambda a: V4(f"{a}/24")))
        ipv6 = draw(st.none() | st.ip_addresses(v=6).map(lambda a: V6(f"{a}/64")))
        if not dhcp and ipv4 is None and ipv6 is None:
            dhcp = True
        nics.append(
            GuestNIC(
                mac,
                name=draw(st.none() | st.just(f"net{index}")),
                ipv4=ipv4,
                gateway=draw(st.none() | st.just(GW4("10.0.0.1"))) if ipv4 else None,
                dhcp=dhcp,
                ipv6=ipv6,
                ipv6_gateway=draw(st.none() | st.just(GW6("fd00::1"))) if ipv6 else None,
                default_route=index == default,
                mtu=draw(st.none() | st.integers(68, 65535)),
            )
        )
    return tuple(nics)


@given(interface_lists())
def test_the_arguments_parse_back_to_the_interfaces_in_their_order(
    nics: tuple[GuestNIC, ...],
) -> None:
    args = nic_args(nics, "web")
    parsed, classic = parse(args)
    assert tuple(parsed) == nics
    lone_static = len(nics) == 1 and nics[0].ipv4 is not None and nics[0].gateway is not None
    assert (classic is not None) == lone_static
    assert all(" " not in arg for arg in args)  # each is one word of the command line
