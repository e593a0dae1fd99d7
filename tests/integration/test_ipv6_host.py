"""IPv6 on a managed bridge, host side: roost's router advertisements (real dnsmasq) give a
guest the SLAAC address roost predicts, and a protected tap lets out only the IPv6 its guest
may send.

The daemon's namespace is the test's `netns`, with a bridge made by roost's host code. A second
namespace plays the guest: a veth port on the bridge, its kernel doing SLAAC. For the rules the
test holds a tap's queue in place of a VMM (TUNSETIFF on /dev/net/tun) and writes Ethernet
frames into it, built here byte by byte; nftables' counters say what was dropped, and a counter
in the namespace's ip6 input hook says what reached the bridge.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import IFT_NO_PI, IFT_TAP, tuntap

from roost.errors import HostError
from roost.host.firewall import DROPS, Firewall
from roost.host.links import TUN_DEVICE, Links
from roost.host.netns import NetnsWorker
from roost.host.ra import RouterAdverts
from roost.plan.ipv6 import link_local, router_address, slaac_address
from roost.state.alloc import tap_mac
from tests.harness import network_namespace, run, wait_for

pytestmark = pytest.mark.root

BRIDGE, GATEWAY = "rbr61", ipaddress.IPv4Interface("10.61.0.1/24")
PREFIX = ipaddress.IPv6Network("fd61:aa:bb:cc::/64")
GUEST_MAC = "02:fc:00:00:61:05"
TAP = "rtap61"


@dataclass
class Host:
    netns: str
    worker: NetnsWorker
    links: Links
    adverts: RouterAdverts


@pytest.fixture
def host(netns: str, tmp_short: Path) -> Iterator[Host]:
    """roost's host parts in `netns`: the managed bridge made, router advertisements on it
    (their dnsmasq stopped, by PID, afterwards)."""
    worker = NetnsWorker(netns)
    links = Links(worker)
    adverts = RouterAdverts(worker, tmp_short)
    try:
        links.ensure_bridge(BRIDGE, GATEWAY)
        yield Host(netns, worker, links, adverts)
    finally:
        adverts.reconcile({})
        adverts.close()
        links.close()
        worker.close()


@contextlib.contextmanager
def guest(daemon_netns: str, mac: str, bridge: str = BRIDGE) -> Iterator[str]:
    """A namespace standing in for a guest: veth `eth0` with `mac`, its port on `bridge`."""
    port = f"vp-{bridge}"
    with network_namespace() as name:
        run(
            "ip",
            *f"link add {port} type veth peer name eth0 netns {name}".split(),
            netns=daemon_netns,
        )
        run("ip", "link", "set", port, "master", bridge, "up", netns=daemon_netns)
        run("ip", "link", "set", "eth0", "address", mac, "up", netns=name)
        yield name


def global_addresses(netns: str, device: str) -> list[ipaddress.IPv6Address]:
    data = json.loads(run("ip", "-j", "-6", "addr", "show", "dev", device, netns=netns).stdout)
    return [
        ipaddress.IPv6Address(a["local"])
        for a in data[0]["addr_info"]
        if a["scope"] == "global" and "tentative" not in a
    ]


def alive(pid: int) -> bool:
    """Whether `pid` runs (not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def dnsmasq_pid(adverts: RouterAdverts) -> int:
    return int((adverts.dir / f"{BRIDGE}.pid").read_text())


def test_a_guest_gets_by_slaac_exactly_the_address_roost_predicts(host: Host) -> None:
    host.adverts.start(BRIDGE, PREFIX)
    with guest(host.netns, GUEST_MAC) as name:
        predicted = slaac_address(PREFIX, GUEST_MAC)
        assert wait_for(lambda: global_addresses(name, "eth0"), what="a SLAAC address") == [
            predicted
        ]
        ping = run("ping", "-6", "-c1", "-W2", str(predicted), netns=host.netns, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        routes = run("ip", "-6", "route", "show", "default", netns=name).stdout
        assert "proto ra" in routes  # advertised as a router without any forwarding on
    bridge = run("ip", "-6", "addr", "show", "dev", BRIDGE, netns=host.netns).stdout
    assert f"inet6 {router_address(PREFIX)}/64 scope global nodad" in bridge
    forwarding = run("cat", "/proc/sys/net/ipv6/conf/all/forwarding", netns=host.netns)
    assert forwarding.stdout.strip() == "0"  # never turned on for the whole namespace


def test_each_bridge_advertises_its_own_prefix(host: Host) -> None:
    second, other = "rbr62", ipaddress.IPv6Network("fd62:aa:bb:cc::/64")
    host.links.ensure_bridge(second, ipaddress.IPv4Interface("10.62.0.1/24"))
    host.adverts.reconcile({BRIDGE: PREFIX, second: other})
    with (
        guest(host.netns, GUEST_MAC) as first,
        guest(host.netns, "02:fc:00:00:62:05", second) as two,
    ):
        assert wait_for(lambda: global_addresses(first, "eth0")) == [
            slaac_address(PREFIX, GUEST_MAC)
        ]
        assert wait_for(lambda: global_addresses(two, "eth0")) == [
            slaac_address(other, "02:fc:00:00:62:05")
        ]
    assert host.adverts.running() == {BRIDGE: PREFIX, second: other}


def test_a_restarted_daemon_adopts_the_advertising_dnsmasq_and_stops_it_by_pid(
    host: Host, tmp_short: Path
) -> None:
    # an earlier daemon starts it and exits: the dnsmasq outlives it
    earlier = (
        "import ipaddress, pathlib, sys\n"
        "from roost.host.netns import NetnsWorker\n"
        "from roost.host.ra import RouterAdverts\n"
        "worker = NetnsWorker(sys.argv[1])\n"
        "adverts = RouterAdverts(worker, pathlib.Path(sys.argv[2]))\n"
        "adverts.start(sys.argv[3], ipaddress.IPv6Network(sys.argv[4]))\n"
        "adverts.close()\n"
        "worker.close()\n"
    )
    subprocess.run(
        [sys.executable, "-c", earlier, host.netns, str(tmp_short), BRIDGE, str(PREFIX)],
        check=True,
    )
    pid = dnsmasq_pid(host.adverts)
    assert host.adverts.running() == {BRIDGE: PREFIX}
    host.adverts.reconcile({BRIDGE: PREFIX})
    assert dnsmasq_pid(host.adverts) == pid  # adopted, not started again
    with guest(host.netns, GUEST_MAC) as name:
        wait_for(lambda: global_addresses(name, "eth0"), what="a SLAAC address")
    host.adverts.reconcile({})
    assert not alive(pid)
    assert host.adverts.running() == {}
    assert sorted(p.name for p in host.adverts.dir.iterdir()) == []
    bridge = run("ip", "-6", "addr", "show", "dev", BRIDGE, netns=host.netns).stdout
    assert str(router_address(PREFIX)) not in bridge


def test_a_dead_dnsmasq_is_started_again_and_a_new_prefix_replaces_the_old(host: Host) -> None:
    host.adverts.start(BRIDGE, PREFIX)
    first = dnsmasq_pid(host.adverts)
    os.kill(first, 9)
    wait_for(lambda: not alive(first), what="dnsmasq's end")
    host.adverts.reconcile({BRIDGE: PREFIX})
    second = dnsmasq_pid(host.adverts)
    assert second != first and host.adverts.running() == {BRIDGE: PREFIX}
    other = ipaddress.IPv6Network("fd61:aa:bb:dd::/64")
    host.adverts.start(BRIDGE, other)
    assert host.adverts.running() == {BRIDGE: other}
    bridge = run("ip", "-6", "addr", "show", "dev", BRIDGE, netns=host.netns).stdout
    assert str(router_address(other)) in bridge and str(router_address(PREFIX)) not in bridge


def test_reconcile_makes_every_bridge_it_can_right_and_names_those_it_cannot(
    host: Host,
) -> None:
    other = ipaddress.IPv6Network("fd61:aa:bb:ee::/64")
    with pytest.raises(HostError, match="bridge rbr404 does not exist"):
        host.adverts.reconcile({"rbr404": other, BRIDGE: PREFIX})
    assert host.adverts.running() == {BRIDGE: PREFIX}
    assert not (host.adverts.dir / "rbr404.conf").exists()


# --- frames written into a protected tap ---


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ipv6_frame(
    source_mac: str,
    destination_mac: str,
    source: str,
    destination: str,
    next_header: int,
    payload: bytes,
    *,
    checksum_at: int,
) -> bytes:
    """An Ethernet frame with an IPv6 packet (hop limit 255, as ND requires); the upper-layer
    checksum at `checksum_at` in `payload` computed over the pseudo-header."""
    src, dst = ipaddress.IPv6Address(source).packed, ipaddress.IPv6Address(destination).packed
    pseudo = src + dst + struct.pack("!I3xB", len(payload), next_header)
    body = bytearray(payload)
    struct.pack_into("!H", body, checksum_at, checksum(pseudo + bytes(body)))
    header = struct.pack("!IHBB", 6 << 28, len(body), next_header, 255) + src + dst
    ethernet = mac_bytes(destination_mac) + mac_bytes(source_mac) + struct.pack("!H", 0x86DD)
    return ethernet + header + bytes(body)


def echo_request(source_mac: str, bridge_mac: str, source: str) -> bytes:
    return ipv6_frame(
        source_mac,
        bridge_mac,
        source,
        str(router_address(PREFIX)),
        58,
        struct.pack("!BBHHH", 128, 0, 0, 0x61, 1) + b"roost",
        checksum_at=2,
    )


def router_advertisement(source_mac: str, bridge_mac: str) -> bytes:
    """From the guest's link-local address: another prefix and itself as default router."""
    prefix_option = (
        struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 3600, 1800, 0)
        + ipaddress.IPv6Address("fd66::").packed
    )
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + prefix_option
    return ipv6_frame(
        source_mac, bridge_mac, str(link_local(source_mac)), "ff02::1", 58, body, checksum_at=2
    )


def dhcpv6_advertise(source_mac: str, bridge_mac: str, source_port: int = 547) -> bytes:
    """A DHCPv6 server's Advertise (UDP 547, or `source_port`, → 546) from the guest's
    link-local address."""
    message = bytes([2, 0, 0, 1])
    udp = struct.pack("!HHHH", source_port, 546, 8 + len(message), 0) + message
    return ipv6_frame(
        source_mac, bridge_mac, str(link_local(source_mac)), "fe80::1", 17, udp, checksum_at=6
    )


def neighbour_advertisement(source_mac: str, bridge_mac: str, source: str, target: str) -> bytes:
    """An unsolicited advertisement (override flag) claiming `target`."""
    body = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + ipaddress.IPv6Address(target).packed
    return ipv6_frame(source_mac, bridge_mac, source, "ff02::1", 58, body, checksum_at=2)


def duplicate_address_probe(source_mac: str, bridge_mac: str, target: str) -> bytes:
    """A neighbour solicitation from :: to the target's solicited-node group (RFC 4862 5.4)."""
    packed = ipaddress.IPv6Address(target).packed
    group = ipaddress.IPv6Address(b"\xff\x02" + bytes(9) + b"\x01\xff" + packed[13:])
    body = struct.pack("!BBHI", 135, 0, 0, 0) + packed
    return ipv6_frame(source_mac, bridge_mac, "::", str(group), 58, body, checksum_at=2)


def ipv4_echo_request(source_mac: str, bridge_mac: str, source: str, destination: str) -> bytes:
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x61, 1) + b"roost")
    struct.pack_into("!H", icmp, 2, checksum(bytes(icmp)))
    header = bytearray(
        struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0)
        + ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address(destination).packed
    )
    struct.pack_into("!H", header, 10, checksum(bytes(header)))
    ethernet = mac_bytes(bridge_mac) + mac_bytes(source_mac) + struct.pack("!H", 0x0800)
    return ethernet + bytes(header) + bytes(icmp)


@contextlib.contextmanager
def tap_queue(worker: NetnsWorker, tap: str) -> Iterator[int]:
    """The tap's queue, held as a VMM holds it (opened inside the daemon's namespace)."""
    with worker.inside():
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            assert tuntap.TUNSETIFF is not None
            fcntl.ioctl(
                fd, tuntap.TUNSETIFF, struct.pack("16sH", tap.encode(), IFT_TAP | IFT_NO_PI)
            )
        except BaseException:
            os.close(fd)
            raise
    try:
        yield fd
    finally:
        os.close(fd)


def drops(netns: str, tap: str) -> dict[str, int]:
    """Packets dropped so far by the tap chain's counted rules, by comment."""
    listed = json.loads(
        run("nft", "-j", "list", "chain", "bridge", "roost", f"vm-{tap}", netns=netns).stdout
    )
    counted: dict[str, int] = {}
    for item in listed["nftables"]:
        rule = item.get("rule")
        if rule and "comment" in rule:
            [counter] = [e["counter"] for e in rule["expr"] if "counter" in e]
            counted[rule["comment"]] = counted.get(rule["comment"], 0) + counter["packets"]
    return counted


def watch_arrivals(netns: str, watched: dict[str, str]) -> None:
    """Count what reaches the namespace's IP layer from the bridge (its prerouting hook, so
    before any multicast membership check), by counter name → match."""
    counters = "".join(f"counter {name} {{ }}\n" for name in watched)
    rules = "".join(f'{match} counter name "{name}"\n' for name, match in watched.items())
    script = (
        f"table inet watch {{\n{counters}chain prerouting {{\n"
        f"type filter hook prerouting priority raw; policy accept;\n{rules}}}\n}}\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script, text=True, check=True
    )


def arrived(netns: str, name: str) -> int:
    listed = json.loads(
        run("nft", "-j", "list", "counter", "inet", "watch", name, netns=netns).stdout
    )
    [found] = [item["counter"] for item in listed["nftables"] if "counter" in item]
    return int(found["packets"])


def bridge_mac(netns: str) -> str:
    return str(
        json.loads(run("ip", "-j", "link", "show", BRIDGE, netns=netns).stdout)[0]["address"]
    )


@pytest.fixture
def tap(host: Host) -> Iterator[Firewall]:
    """Tap `TAP` on the bridge, made by roost's host code for a guest with `GUEST_MAC`; the
    firewall that protects it (its rules removed, and the tap, afterwards)."""
    firewall = Firewall(host.worker)
    host.links.create_tap(TAP, BRIDGE, tap_mac(GUEST_MAC))
    try:
        yield firewall
    finally:
        firewall.release(TAP)
        host.links.delete(TAP)


def test_a_protected_tap_drops_spoofed_ipv6_and_router_advertisements_and_counts_them(
    host: Host, tap: Firewall
) -> None:
    own = str(slaac_address(PREFIX, GUEST_MAC))
    spoofed = str(PREFIX.network_address + 0x99)
    tap.protect(TAP, GUEST_MAC, "10.61.0.5", [own])
    watch_arrivals(
        host.netns,
        {
            "own": f"icmpv6 type echo-request ip6 saddr {own}",
            "spoofed": f"icmpv6 type echo-request ip6 saddr {spoofed}",
            "probe": "icmpv6 type nd-neighbor-solicit ip6 saddr ::",
        },
    )
    to = bridge_mac(host.netns)
    with tap_queue(host.worker, TAP) as fd:
        for frame in (
            echo_request(GUEST_MAC, to, own),
            echo_request(GUEST_MAC, to, spoofed),
            router_advertisement(GUEST_MAC, to),
            dhcpv6_advertise(GUEST_MAC, to),
            dhcpv6_advertise(GUEST_MAC, to, source_port=5000),  # clients take any port's
            neighbour_advertisement(GUEST_MAC, to, own, spoofed),
            duplicate_address_probe(GUEST_MAC, to, own),
            duplicate_address_probe(GUEST_MAC, to, spoofed),  # would make its holder give it up
        ):
            os.write(fd, frame)
        expected = {
            DROPS["source"]: 1,
            DROPS["router"]: 1,
            DROPS["dhcpv6"]: 2,
            DROPS["neighbour"]: 1,
            DROPS["dad"]: 0,
            DROPS["probe"]: 1,
        }
        wait_for(lambda: drops(host.netns, TAP) == expected, what=f"the drop counters {expected}")
        wait_for(lambda: arrived(host.netns, "own") == 1, what="the guest's own echo request")
        wait_for(lambda: arrived(host.netns, "probe") == 1, what="the guest's probe from ::")
    assert arrived(host.netns, "spoofed") == 0


def test_a_tap_on_a_network_without_a_prefix_sends_no_ipv6_at_all(
    host: Host, tap: Firewall
) -> None:
    tap.protect(TAP, GUEST_MAC, "10.61.0.5")
    host.adverts.start(BRIDGE, PREFIX)  # even with a prefix advertised on its bridge
    own = str(slaac_address(PREFIX, GUEST_MAC))
    watch_arrivals(
        host.netns,
        {"v6": f"ip6 saddr {{ {own}, {link_local(GUEST_MAC)} }}", "v4": "ip saddr 10.61.0.5"},
    )
    to = bridge_mac(host.netns)
    with tap_queue(host.worker, TAP) as fd:
        os.write(fd, echo_request(GUEST_MAC, to, own))
        os.write(fd, router_advertisement(GUEST_MAC, to))
        os.write(fd, ipv4_echo_request(GUEST_MAC, to, "10.61.0.5", str(GATEWAY.ip)))
        wait_for(lambda: arrived(host.netns, "v4") == 1, what="the guest's IPv4 echo request")
    assert arrived(host.netns, "v6") == 0
    assert drops(host.netns, TAP) == {}  # today's rules, without a counted IPv6 one
