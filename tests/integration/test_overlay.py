"""The overlay on real netlink: two "hosts" (namespaces joined by a fabric bridge in a third),
each with a bridge, `vx<vni>` made by roost.host.vxlan and a stand-in guest (a namespace whose
veth is a port of that bridge); the guests reach each other only through VXLAN."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from roost.engine.overlay import Overlay, Segment
from roost.errors import HostError
from roost.host.netns import NetnsWorker
from roost.host.vxlan import VXLAN_PORT, Vxlans
from tests.harness import links, network_namespace, run, wait_for

pytestmark = pytest.mark.root

VNI = 4242
BRIDGE = "br-c"
MTU = 1450  # a 1500-byte fabric less the 50 bytes of VXLAN over IPv4
VTEPS = ("192.168.77.1", "192.168.77.2")
GUEST_IPS = ("10.99.0.1", "10.99.0.2")
GUEST_MACS = ("02:99:00:00:00:01", "02:99:00:00:00:02")


@dataclass
class Host:
    netns: str
    vtep: str
    guest: str  # the stand-in guest's namespace
    guest_ip: str
    guest_mac: str
    worker: NetnsWorker
    vxlans: Vxlans
    wanted: list[Segment] = field(default_factory=list)
    database_away: bool = False  # desired() fails as a lost database connection would
    asked_while_away: threading.Event = field(default_factory=threading.Event)

    def desired(self) -> list[Segment]:
        if self.database_away:
            self.asked_while_away.set()
            raise ConnectionError("the database is away")
        return list(self.wanted)


def veth(netns: str, name: str, peer_netns: str, peer: str) -> None:
    """A veth pair made straight into its two namespaces (never in the test's own)."""
    run("ip", "-n", netns, "link", "add", name, "type", "veth", "peer", peer, "netns", peer_netns)


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    with contextlib.ExitStack() as stack:
        fabric = stack.enter_context(network_namespace())
        run("ip", "-n", fabric, "link", "add", "fabric", "type", "bridge")
        run("ip", "-n", fabric, "link", "set", "fabric", "up")
        made = []
        for index in range(2):
            netns = stack.enter_context(network_namespace())
            guest = stack.enter_context(network_namespace())
            veth(netns, "fab0", fabric, f"port{index}")
            run("ip", "-n", fabric, "link", "set", f"port{index}", "master", "fabric", "up")
            run("ip", "-n", netns, "addr", "add", f"{VTEPS[index]}/24", "dev", "fab0")
            run("ip", "-n", netns, "link", "set", "fab0", "up")
            run("ip", "-n", netns, "link", "add", BRIDGE, "type", "bridge")
            run("ip", "-n", netns, "link", "set", BRIDGE, "up")
            veth(guest, "eth0", netns, "guest0")
            run("ip", "-n", netns, "link", "set", "guest0", "master", BRIDGE, "up")
            run("ip", "-n", guest, "link", "set", "eth0", "address", GUEST_MACS[index])
            run("ip", "-n", guest, "link", "set", "eth0", "mtu", str(MTU), "up")
            run("ip", "-n", guest, "addr", "add", f"{GUEST_IPS[index]}/24", "dev", "eth0")
            worker = NetnsWorker(netns)
            stack.callback(worker.close)
            vxlans = Vxlans(worker)
            stack.callback(vxlans.close)
            made.append(
                Host(
                    netns, VTEPS[index], guest, GUEST_IPS[index], GUEST_MACS[index], worker, vxlans
                )
            )
        a, b = made
        for host, peer in ((a, b), (b, a)):
            host.wanted = [
                Segment(VNI, BRIDGE, MTU, frozenset({peer.vtep}), {peer.guest_mac: peer.vtep})
            ]
        yield a, b


def fdb(netns: str, device: str) -> set[tuple[str, str]]:
    """(MAC, destination VTEP) of the device's own entries, as `bridge fdb` shows them (none
    while there is no such device)."""
    shown = run("bridge", "-j", "fdb", "show", "dev", device, check=False, netns=netns)
    if shown.returncode != 0:
        return set()
    return {(entry["mac"], entry["dst"]) for entry in json.loads(shown.stdout) if "dst" in entry}
    return {(entry["mac"], entry["dst"]) for entry in shown if "dst" in entry}


def ping(host: Host, target: str, *options: str) -> bool:
    argv = ["ping", "-c", "2", "-i", "0.2", "-W", "2", *options, target]
    return run(*argv, check=False, netns=host.guest).returncode == 0


def test_guests_on_two_hosts_reach_each_other_through_vxlan_at_the_network_mtu(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    own_links = set(links_here())
    assert not ping(a, b.guest_ip)  # no path yet: only the overlay joins the two bridges

    for host in hosts:
        Overlay(host.vxlans, host.vtep, host.desired).sync()

    for host, peer in ((a, b), (b, a)):
        device = links(host.netns)[f"vx{VNI}"]
        data = device["linkinfo"]["info_data"]
        assert (data["id"], data["local"], data["port"], data["learning"]) == (
            VNI,
            host.vtep,
            VXLAN_PORT,
            False,
        )
        assert (device["master"], device["mtu"], links(host.netns)[BRIDGE]["mtu"]) == (
            BRIDGE,
            MTU,
            MTU,
        )
        assert fdb(host.netns, f"vx{VNI}") == {
            ("00:00:00:00:00:00", peer.vtep),
            (peer.guest_mac, peer.vtep),
        }
    # the guests' ARP may still hold the failure of the ping above for a moment
    wait_for(lambda: ping(a, b.guest_ip), timeout=10, what=f"{b.guest_ip} to answer {a.guest_ip}")
    assert ping(b, a.guest_ip)
    assert ping(a, b.guest_ip, "-M", "do", "-s", str(MTU - 28))  # 1450 bytes in, 1500 out
    # a guest that ignores the network's MTU: its bigger frames end at the VXLAN device
    run("ip", "-n", a.guest, "link", "set", "eth0", "mtu", "1500")
    assert not ping(a, b.guest_ip, "-M", "do", "-s", str(MTU - 28 + 1))
    assert ping(a, b.guest_ip, "-M", "do", "-s", str(MTU - 28))

    assert set(links_here()) == own_links  # the test's own namespace is never touched


def links_here() -> list[str]:
    return [link["ifname"] for link in json.loads(run("ip", "-j", "link", "show").stdout)]


def test_entries_follow_the_database_within_seconds_of_a_poke_or_without_one(
    hosts: tuple[Host, Host], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = hosts
    device = f"vx{VNI}"
    polled = Overlay(a.vxlans, a.vtep, a.desired, interval=1.0)
    poked = Overlay(b.vxlans, b.vtep, b.desired, interval=3600.0)
    for overlay in (polled, poked):
        overlay.start()
    try:
        wait_until(lambda: fdb(a.netns, device) and fdb(b.netns, device), "both devices made")
        assert ping(a, b.guest_ip)

        # b's guest goes: its MAC leaves a's entries on the next periodic round
        a.wanted = [Segment(VNI, BRIDGE, MTU, frozenset({b.vtep}), {})]
        wait_until(lambda: fdb(a.netns, device) == {("00:00:00:00:00:00", b.vtep)}, "MAC gone")

        # a's guest goes: b's overlay learns it when poked (as a NOTIFY would)
        b.wanted = [Segment(VNI, BRIDGE, MTU, frozenset({a.vtep}), {})]
        poked.poke()
        wait_until(lambda: fdb(b.netns, device) == {("00:00:00:00:00:00", a.vtep)}, "MAC gone")

        # a failing round (the database away) is logged and the next one does its work
        with caplog.at_level(logging.INFO, logger="roost.engine"):
            a.database_away = True
            wait_until(a.asked_while_away.is_set, "a failed round")
            a.wanted = []
            a.database_away = False
            wait_until(lambda: "in sync again" in caplog.text, "a round that works")
        assert device not in links(a.netns)  # the network has gone from a, and its device
        assert "the database is away" in caplog.text
    finally:
        for overlay in (polled, poked):
            overlay.stop()


def test_a_hundred_remote_macs_are_written_and_read_back(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    macs = {f"02:98:00:00:00:{i:02x}": b.vtep for i in range(100)}
    a.wanted = [Segment(VNI, BRIDGE, MTU, frozenset({b.vtep}), macs)]
    overlay = Overlay(a.vxlans, a.vtep, a.desired)
    changes = overlay.sync()
    assert len(changes.fdb[0].macs_replace) == 100
    assert a.vxlans.present()[VNI].forwarding.macs == macs
    assert fdb(a.netns, f"vx{VNI}") == {("00:00:00:00:00:00", b.vtep), *macs.items()}
    assert not overlay.sync()  # nothing left to do


def test_a_network_mtu_the_fabric_cannot_carry_is_refused(hosts: tuple[Host, Host]) -> None:
    a, _ = hosts
    with pytest.raises(HostError, match="at most 1450"):
        a.vxlans.ensure(VNI, a.vtep, BRIDGE, 1500)
    assert f"vx{VNI}" not in links(a.netns)


def wait_until(predicate: object, what: str) -> None:
    """Within 5 s: the bound the issue sets for entries to follow the database."""
    wait_for(predicate, timeout=5, what=what)


def test_forwarding_changes_need_the_device_and_deleting_what_is_gone_is_no_error(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    with pytest.raises(HostError, match=f"vx{VNI} does not exist"):
        a.vxlans.update(VNI, flood_add=[b.vtep])
    a.vxlans.ensure(VNI, a.vtep, BRIDGE, MTU)
    a.vxlans.update(VNI, flood_add=[b.vtep], macs_replace={b.guest_mac: b.vtep})
    a.vxlans.update(VNI, flood_add=[b.vtep], macs_remove=["02:00:00:00:00:99"])
    a.vxlans.update(VNI, flood_remove=["192.168.77.9"])
    assert fdb(a.netns, f"vx{VNI}") == {("00:00:00:00:00:00", b.vtep), (b.guest_mac, b.vtep)}
    assert a.vxlans.remove(VNI)
    assert not a.vxlans.remove(VNI)


def test_a_network_without_a_bridge_here_is_skipped_and_a_broken_one_spares_the_others(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    run("ip", "-n", a.netns, "link", "add", "br-d", "type", "bridge")
    peers = frozenset({b.vtep})
    a.wanted = [
        Segment(VNI, BRIDGE, 1500, peers, {}),  # more than the fabric carries
        Segment(VNI + 1, "br-d", MTU, peers, {b.guest_mac: b.vtep}),
        Segment(VNI + 2, "br-none", MTU, peers, {}),  # no VM of a's has made its bridge yet
    ]
    overlay = Overlay(a.vxlans, a.vtep, a.desired)
    with pytest.raises(HostError, match="at most 1450"):
        overlay.sync()
    assert set(a.vxlans.present()) == {VNI + 1}
    assert fdb(a.netns, f"vx{VNI + 1}") == {("00:00:00:00:00:00", b.vtep), (b.guest_mac, b.vtep)}

    run("ip", "-n", a.netns, "link", "add", "br-none", "type", "bridge")
    a.wanted[0] = Segment(VNI, BRIDGE, MTU, peers, {})
    overlay.sync()
    assert set(a.vxlans.present()) == {VNI, VNI + 1, VNI + 2}
    run("ip", "-n", a.netns, "link", "del", "br-none")  # its last VM here gone, say
    overlay.sync()
    assert set(a.vxlans.present()) == {VNI, VNI + 1}
