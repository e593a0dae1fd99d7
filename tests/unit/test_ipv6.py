"""IPv6's pure parts: SLAAC and link-local prediction, ULA prefixes, the strict parsing of a
network's /64 and of a static address in it, the per-tap rules, dnsmasq's RA-only config."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roost.host.firewall import DROPS, tap_rules
from roost.host.ra import dnsmasq_config
from roost.plan.ipv6 import (
    ULA_RANGE,
    interface_id,
    link_local,
    parse_ipv6_address,
    parse_ipv6_prefix,
    random_ula_prefix,
    router_address,
    slaac_address,
)

PREFIX = ipaddress.IPv6Network("fd00:1:2:3::/64")
macs = st.binary(min_size=6, max_size=6).map(lambda raw: ":".join(f"{b:02x}" for b in raw))
prefixes = st.integers(min_value=0, max_value=2**64 - 1).map(
    lambda high: ipaddress.IPv6Network((high << 64, 64))
)


@pytest.mark.parametrize(
    ("mac", "address"),
    [
        # RFC 4291 appendix A's example, and the universal/local bit flipped both ways
        ("34:56:78:9a:bc:de", "fd00:1:2:3:3656:78ff:fe9a:bcde"),
        ("52:54:00:12:34:56", "fd00:1:2:3:5054:ff:fe12:3456"),
        ("02:fc:00:00:00:01", "fd00:1:2:3:fc:ff:fe00:1"),
        ("00:00:00:00:00:00", "fd00:1:2:3:200:ff:fe00:0"),
        ("FF:FF:FF:FF:FF:FF", "fd00:1:2:3:fdff:ffff:feff:ffff"),
    ],
)
def test_a_slaac_address_is_the_prefix_and_the_macs_modified_eui64(mac: str, address: str) -> None:
    assert slaac_address(PREFIX, mac) == ipaddress.IPv6Address(address)


def test_a_link_local_address_is_the_same_identifier_in_fe80() -> None:
    assert link_local("52:54:00:12:34:56") == ipaddress.IPv6Address("fe80::5054:ff:fe12:3456")


@given(prefixes, macs)
def test_a_slaac_address_lies_in_its_prefix_and_gives_back_the_mac(
    prefix: ipaddress.IPv6Network, mac: str
) -> None:
    address = slaac_address(prefix, mac)
    assert address in prefix
    identifier = (int(address) & (2**64 - 1)).to_bytes(8, "big")
    assert identifier[3:5] == b"\xff\xfe"
    back = bytes([identifier[0] ^ 0x02]) + identifier[1:3] + identifier[5:]
    assert back.hex(":") == mac
    assert int(link_local(mac)) & (2**64 - 1) == interface_id(mac)


@pytest.mark.parametrize("mac", ["52:54:00:12:34", "52-54-00-12-34-56", "5254.0012.3456", "zz"])
def test_a_malformed_mac_is_refused(mac: str) -> None:
    with pytest.raises(ValueError, match="not a MAC address"):
        slaac_address(PREFIX, mac)


def test_slaac_needs_a_64() -> None:
    with pytest.raises(ValueError, match="/64"):
        slaac_address(ipaddress.IPv6Network("fd00::/48"), "02:00:00:00:00:01")


@given(st.integers(min_value=0))
def test_a_random_ula_prefix_is_a_64_in_fd00_8_that_parses_back(seed: int) -> None:
    prefix = random_ula_prefix(random.Random(seed))
    assert prefix.prefixlen == 64 and prefix.subnet_of(ULA_RANGE)
    assert parse_ipv6_prefix(str(prefix)) == prefix


def test_random_ula_prefixes_differ() -> None:
    rng = random.Random(7)
    assert len({random_ula_prefix(rng) for _ in range(100)}) == 100


@pytest.mark.parametrize(
    ("text", "prefix"),
    [
        ("fd00:1:2:3::/64", "fd00:1:2:3::/64"),
        (" fd00:0001:0002:0003:0:0:0:0/64 ", "fd00:1:2:3::/64"),
        ("2001:db8:1:2::/64", "2001:db8:1:2::/64"),
    ],
)
def test_a_64_written_strictly_is_a_prefix(text: str, prefix: str) -> None:
    assert parse_ipv6_prefix(text) == ipaddress.IPv6Network(prefix)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("fd00:1:2:3::", "write it with its length, e.g. fd00:1:2:3::/64"),
        ("fd00:1::/48", "write a /64 such as fd00:1::/64"),
        ("fd00:1:2:3:4::/80", "write a /64 such as fd00:1:2:3::/64"),
        ("fd00:1:2:3::1/64", "host bits set; did you mean fd00:1:2:3::/64"),
        ("fd00:1:2:3::/064", "write fd00:1:2:3::/64"),
        ("10.1.0.0/24", "is an IPv4 network"),
        ("nonsense/64", "not an IPv6 prefix; write a /64 such as"),
        ("::/64", "the loopback address"),
        ("fe80::/64", "the link-local range"),
        ("febf:1::/64", "the link-local range"),
        ("ff02::/64", "the multicast range"),
        ("::1/128", "is a /64"),
    ],
)
def test_a_prefix_that_is_not_a_usable_64_is_refused_saying_what_to_write(
    text: str, says: str
) -> None:
    with pytest.raises(ValueError) as refused:
        parse_ipv6_prefix(text)
    assert says in str(refused.value)


@pytest.mark.parametrize("text", ["fd00:1:2:3::2", "fd00:1:2:3::abcd", "fd00:1:2:3:fdff::1"])
def test_a_static_address_inside_the_prefix_is_accepted(text: str) -> None:
    assert parse_ipv6_address(text, PREFIX) == ipaddress.IPv6Address(text)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("fd00:1:2:3::", "subnet-router anycast"),
        ("fd00:1:2:3::1", "the network's router"),
        ("fd00:1:2:3:fdff:ffff:ffff:ff80", "reserved subnet anycast"),
        ("fd00:1:2:3:fdff:ffff:ffff:ffff", "reserved subnet anycast"),
        ("fd00:1:2:4::5", "not inside the network's prefix fd00:1:2:3::/64"),
    ],
)
def test_a_static_address_the_network_cannot_give_is_refused(text: str, says: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_ipv6_address(text, PREFIX)
    assert says in str(refused.value)
    assert "fd00:1:2:3::11" in str(refused.value)  # every refusal shows an address that works


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("fd00:1:2:3::5/64", "without a prefix length"),
        ("10.0.0.5", "is an IPv4 address"),
        ("fd00:1:2:3::g", "is not an IPv6 address"),
        ("::ffff:10.0.0.5", "an IPv4-mapped address"),
    ],
)
def test_a_static_address_is_judged_as_the_spec_judges_its_form(text: str, says: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_ipv6_address(text, PREFIX)
    assert says in str(refused.value)


def _a_network_may_have(prefix: ipaddress.IPv6Network) -> bool:
    try:
        parse_ipv6_prefix(str(prefix))
    except ValueError:
        return False
    return True


@given(prefixes.filter(_a_network_may_have), macs)
def test_a_predicted_slaac_address_is_a_valid_static_one_unless_reserved(
    prefix: ipaddress.IPv6Network, mac: str
) -> None:
    address = slaac_address(prefix, mac)
    if address != router_address(prefix) and int(address) & (2**64 - 1) < 0xFDFF_FFFF_FFFF_FF80:
        assert parse_ipv6_address(str(address), prefix) == address


def test_a_tap_without_ipv6_sends_no_ipv6_and_no_dhcp_answer() -> None:
    assert tap_rules("rtap1", "02:fc:00:00:00:01", "10.57.0.2") == (
        "add chain bridge roost vm-rtap1\n"
        "flush chain bridge roost vm-rtap1\n"
        "add rule bridge roost vm-rtap1 ether saddr != 02:fc:00:00:00:01 drop\n"
        "add rule bridge roost vm-rtap1 ether type != { ip, arp } drop\n"
        "add rule bridge roost vm-rtap1 udp sport 67 drop\n"
        "add rule bridge roost vm-rtap1 udp dport 68 drop\n"
        "add rule bridge roost vm-rtap1 ether type ip ip saddr != 10.57.0.2 drop\n"
        "add rule bridge roost vm-rtap1 ether type arp arp saddr ip != 10.57.0.2 drop\n"
        'add element bridge roost taps { "rtap1" : jump vm-rtap1 }\n'
    )
    assert tap_rules("rtap2", "02:fc:00:00:00:02", None) == (
        "add chain bridge roost vm-rtap2\n"
        "flush chain bridge roost vm-rtap2\n"
        "add rule bridge roost vm-rtap2 ether saddr != 02:fc:00:00:00:02 drop\n"
        "add rule bridge roost vm-rtap2 ether type != { ip, arp } drop\n"
        "add rule bridge roost vm-rtap2 udp sport 67 drop\n"
        "add rule bridge roost vm-rtap2 udp dport 68 drop\n"
        'add element bridge roost taps { "rtap2" : jump vm-rtap2 }\n'
    )


def test_a_tap_with_ipv6_may_send_it_only_from_its_own_and_link_local_address() -> None:
    rules = tap_rules("rtap1", "02:fc:00:00:00:01", "10.57.0.2", ["fd00:1:2:3:0:0:0:20"])
    assert "ether type != { ip, arp, ip6 } drop" in rules
    assert "ip6 saddr != { ::, fd00:1:2:3::20, fe80::fc:ff:fe00:1 } counter drop" in rules
    assert "nd-router-advert" in rules and "udp sport 547 counter drop" in rules
    assert "0xfd000001000200030000000000000020" in rules  # a neighbour advertisement's target
    for comment in DROPS.values():
        assert f'comment "{comment}"' in rules
    # the IPv4 part is today's
    assert "ether type ip ip saddr != 10.57.0.2 drop" in rules


def test_an_ipv6_address_that_is_not_one_never_reaches_nftables() -> None:
    with pytest.raises(ValueError):
        tap_rules("rtap1", "02:fc:00:00:00:01", None, ["fd00::1 } accept"])


def test_dnsmasq_is_told_to_advertise_one_prefix_on_one_bridge_and_serve_nothing_else() -> None:
    config = dnsmasq_config("rbr7", PREFIX, Path("/run/roost/ra/rbr7.pid")).splitlines()
    assert "port=0" in config
    assert "interface=rbr7" in config and "bind-interfaces" in config
    assert "enable-ra" in config
    assert "dhcp-range=fd00:1:2:3::,ra-only,64" in config
    assert "pid-file=/run/roost/ra/rbr7.pid" in config
    assert not [line for line in config if line.startswith("dhcp-range") and "ra-only" not in line]
