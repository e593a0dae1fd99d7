"""IPv6 on managed networks, as pure functions: the /64 prefixes a network may have, the
addresses a guest gets on one (predicted from its MAC, as SLAAC makes them, or written by the
user) and the link-local address its anti-spoofing rules let out.

roost predicts a guest's SLAAC address instead of asking the guest: the kernel forms it from
the router advertisement's /64 and the MAC's modified EUI-64 (RFC 4291 appendix A), so no
guest agent is needed, and the address is known before the VM boots.
"""

from __future__ import annotations

import ipaddress
import random
import re

from roost.spec.interfaces import parse_static_ipv6

PREFIX_LENGTH = 64
ULA_RANGE = ipaddress.IPv6Network("fd00::/8")  # RFC 4193's locally assigned half of fc00::/7
LINK_LOCAL_PREFIX = ipaddress.IPv6Network("fe80::/64")
EXAMPLE = "fd12:3456:789a:1::/64"
# what a VM network's prefix may not overlap, and what it is
RESERVED_PREFIXES = (
    (ipaddress.IPv6Network("::1/128"), "loopback address"),
    (ipaddress.IPv6Network("::/128"), "unspecified address"),
    (ipaddress.IPv6Network("fe80::/10"), "link-local range"),
    (ipaddress.IPv6Network("ff00::/8"), "multicast range"),
)
# RFC 2526: interface identifiers fdff:ffff:ffff:ff80 to fdff:ffff:ffff:ffff of a /64 (EUI-64
# format: 57 one bits, the universal/local bit zero, a 7-bit anycast ID) are reserved anycast
RESERVED_ANYCAST = range(0xFDFF_FFFF_FFFF_FF80, 0xFDFF_FFFF_FFFF_FFFF + 1)
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_LENGTH = re.compile(r"[1-9][0-9]*|0")


def _mac_bytes(mac: str) -> bytes:
    if not _MAC.fullmatch(mac):
        raise ValueError(f"{mac!r} is not a MAC address such as 02:fc:00:00:00:01")
    return bytes.fromhex(mac.replace(":", ""))


def interface_id(mac: str) -> int:
    """The modified EUI-64 interface identifier of `mac`: ff:fe inserted in its middle and the
    universal/local bit flipped (RFC 4291 appendix A)."""
    raw = bytearray(_mac_bytes(mac))
    raw[0] ^= 0x02
    return int.from_bytes(bytes(raw[:3]) + b"\xff\xfe" + bytes(raw[3:]), "big")


def slaac_address(prefix: ipaddress.IPv6Network, mac: str) -> ipaddress.IPv6Address:
    """The address a guest with `mac` forms by SLAAC from a router advertising `prefix`."""
    if prefix.prefixlen != PREFIX_LENGTH:
        raise ValueError(f"{prefix}: SLAAC forms addresses in a /64 only")
    return prefix.network_address + interface_id(mac)


def link_local(mac: str) -> ipaddress.IPv6Address:
    """The link-local address (fe80::/64, EUI-64) a guest with `mac` has on that interface."""
    return slaac_address(LINK_LOCAL_PREFIX, mac)


def random_ula_prefix(rng: random.Random) -> ipaddress.IPv6Network:
    """A random unique local /64 (fdXX:XXXX:XXXX:XXXX::/64, RFC 4193): 40 random bits of
    global ID and 16 of subnet ID, so two networks made this way practically never collide."""
    bits = rng.getrandbits(128 - ULA_RANGE.prefixlen - PREFIX_LENGTH)
    return ipaddress.IPv6Network((int(ULA_RANGE.network_address) | bits << 64, PREFIX_LENGTH))


def router_address(prefix: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """The bridge's own address on `prefix` (`<prefix>::1`), the guests' IPv6 gateway."""
    return prefix.network_address + 1


def parse_ipv6_prefix(text: str) -> ipaddress.IPv6Network:
    """A /64 written strictly (an IPv6 network, its length 64, no host bits) that overlaps no
    reserved range; errors say what to write instead."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string IPv6 prefix such as {EXAMPLE}")
    text = text.strip()
    if "/" not in text:
        raise ValueError(
            f"{text!r} is not an IPv6 prefix; write it with its length, e.g. {text}/64"
        )
    address, _, length = text.partition("/")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IPv6 prefix; write a /64 such as {EXAMPLE} (or auto for a "
            "random one)"
        ) from None
    if not isinstance(network, ipaddress.IPv6Network):
        raise ValueError(f"{text} is an IPv4 network; write an IPv6 /64 such as {EXAMPLE}")
    if not _LENGTH.fullmatch(length):
        raise ValueError(f"{text}: /{length} is not a prefix length; write {address}/64")
    if network.prefixlen != PREFIX_LENGTH:
        if network.prefixlen < PREFIX_LENGTH:
            suggestion = ipaddress.IPv6Network((network.network_address, PREFIX_LENGTH))
        else:
            suggestion = network.supernet(new_prefix=PREFIX_LENGTH)
        raise ValueError(
            f"{text}: a network's IPv6 prefix is a /64 (SLAAC needs 64 bits for the interface "
            f"identifier); write a /64 such as {suggestion}"
        )
    if ipaddress.IPv6Address(address) != network.network_address:
        raise ValueError(f"{text} has host bits set; did you mean {network}?")
    for reserved, what in RESERVED_PREFIXES:
        if network.overlaps(reserved):
            raise ValueError(
                f"{network} overlaps {reserved}, the {what}, which a VM network cannot use; "
                f"choose a unique local prefix from {ULA_RANGE} such as {EXAMPLE} (or auto)"
            )
    return network


def parse_ipv6_address(text: str, prefix: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """A static guest address (written as `parse_static_ipv6` takes it) inside `prefix`, that
    is neither the router's (`<prefix>::1`) nor a reserved anycast address (the subnet-router
    `<prefix>::`, RFC 2526's 128 subnet anycast addresses)."""
    address = ipaddress.IPv6Address(parse_static_ipv6(text))
    example = router_address(prefix) + 0x10
    if address not in prefix:
        raise ValueError(
            f"{address} is not inside the network's prefix {prefix}; use e.g. {example}"
        )
    if address == prefix.network_address:
        raise ValueError(
            f"{address} is the subnet-router anycast address of {prefix}; use e.g. {example}"
        )
    if address == router_address(prefix):
        raise ValueError(f"{address} is the network's router (its bridge); use e.g. {example}")
    if int(address) - int(prefix.network_address) in RESERVED_ANYCAST:
        raise ValueError(
            f"{address} is one of the reserved subnet anycast addresses of {prefix} "
            f"(RFC 2526: interface identifiers fdff:ffff:ffff:ff80 and up); use e.g. {example}"
        )
    return address
