"""Lease observation against a real DHCP exchange: dnsmasq serves a bridge in the test's
namespace (the daemon's), busybox udhcpc leases from a second namespace (the guest) across a
veth whose bridge end stands in for the VM's tap."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from roost.errors import HostError
from roost.host.netns import NetnsWorker
from roost.host.observe import LeaseObserver
from tests.harness import addresses, network_namespace, run, wait_for

pytestmark = pytest.mark.root

MAC = "02:ab:cd:ef:01:23"
DEADLINE = 20
RANGE = ipaddress.IPv4Network("10.77.0.0/24")
SCRIPT = """#!/bin/sh
# udhcpc calls this with the lease in its environment; configure it like a guest would
case "$1" in
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
esac
"""


class Reports:
    """What on_address said, in order, safe to read from the test's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[str, str]] = []

    def __call__(self, key: str, ip: str) -> None:
        with self._lock:
            self._seen.append((key, ip))

    @property
    def seen(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._seen)


@dataclass
class Lab:
    host: str  # the daemon's namespace: bridge, dnsmasq, the "tap"
    guest: str  # the guest's namespace
    dir: Path

    @property
    def leases(self) -> Path:
        return self.dir / "dnsmasq.leases"


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def lab(netns: str, tmp_short: Path) -> Iterator[Lab]:
    """br0 (10.77.0.1/24) with `vtap` on it in `netns`; its peer `vguest`, with MAC, in a
    second namespace; dnsmasq serving br0 (stopped, by PID, afterwards)."""
    with network_namespace() as guest:
        run("ip", "link", "add", "br0", "type", "bridge", netns=netns)
        run("ip", "addr", "add", "10.77.0.1/24", "dev", "br0", netns=netns)
        run(
            "ip",
            "link",
            "add",
            "vtap",
            "type",
            "veth",
            "peer",
            "name",
            "vguest",
            "netns",
            guest,
            netns=netns,
        )
        run("ip", "link", "set", "vtap", "master", "br0", "up", netns=netns)
        run("ip", "link", "set", "br0", "up", netns=netns)
        run("ip", "link", "set", "vguest", "address", MAC, "up", netns=guest)
        here = Lab(netns, guest, tmp_short)
        log = (tmp_short / "dnsmasq.log").open("wb")
        dnsmasq = subprocess.Popen(
            [
                "ip", "netns", "exec", netns,
                "dnsmasq", "--no-daemon", "--no-ping", "--bind-interfaces", "--port=0",
                "--conf-file=/dev/null", "--interface=br0",
                "--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h",
                f"--dhcp-leasefile={here.leases}", f"--pid-file={tmp_short / 'dnsmasq.pid'}",
            ],
            stdout=log,
            stderr=log,
        )  # fmt: skip
        try:
            yield here
        finally:
            stop(dnsmasq)
            log.close()


def lease(lab: Lab) -> str:
    """Run udhcpc in the guest's namespace until it has configured a lease; the address."""
    script = lab.dir / "udhcpc.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    argv = ["busybox", "udhcpc", "-i", "vguest", "-n", "-q", "-f", "-s", str(script)]
    client = subprocess.Popen(
        ["ip", "netns", "exec", lab.guest, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = client.communicate(timeout=DEADLINE)
    finally:
        stop(client)
    assert client.returncode == 0, output.decode(errors="replace")
    (address,) = addresses(lab.guest, "vguest")
    ip = ipaddress.IPv4Interface(address).ip
    assert ip in RANGE
    return str(ip)


@contextlib.contextmanager
def observer(netns: str, lease_file: Path | None = None) -> Iterator[tuple[LeaseObserver, Reports]]:
    worker = NetnsWorker(netns)
    reports = Reports()
    watcher = LeaseObserver(worker, reports, lease_file=lease_file)
    try:
        yield watcher, reports
    finally:
        watcher.close()
        worker.close()


def test_the_lease_file_alone_reports_the_leased_address(lab: Lab) -> None:
    # the watched link is a veth that carries nothing: only the lease file can tell
    run("ip", "link", "add", "vidle", "type", "veth", "peer", "name", "vidle-peer", netns=lab.host)
    with observer(lab.host, lab.leases) as (watcher, reports):
        watcher.watch("vm-1", "vidle", MAC)
        ip = lease(lab)
        wait_for(lambda: reports.seen, DEADLINE, "the lease file's address")
        assert reports.seen == [("vm-1", ip)]
        assert f" {MAC} {ip} " in lab.leases.read_text()


def test_the_packet_socket_alone_reports_the_leased_address_once(lab: Lab) -> None:
    with observer(lab.host) as (watcher, reports):
        watcher.watch("vm-1", "vtap", MAC)
        ip = lease(lab)
        wait_for(lambda: reports.seen, DEADLINE, "the DHCPACK on the tap")
        assert reports.seen == [("vm-1", ip)]
        # traffic from the guest (its ARP for the gateway, its pings) repeats nothing
        run("ping", "-c", "2", "-i", "0.2", "-W", "2", "10.77.0.1", netns=lab.guest)
        assert reports.seen == [("vm-1", ip)]
        # the guest moves to another address and says so (gratuitous ARP): that is news
        run("ip", "addr", "flush", "dev", "vguest", netns=lab.guest)
        run("ip", "addr", "add", "10.77.0.99/24", "dev", "vguest", netns=lab.guest)
        run("busybox", "arping", "-U", "-c", "1", "-I", "vguest", "10.77.0.99", netns=lab.guest)
        wait_for(lambda: len(reports.seen) == 2, DEADLINE, "the gratuitous ARP")
        assert reports.seen == [("vm-1", ip), ("vm-1", "10.77.0.99")]


def test_lease_file_changes_forget_and_a_vanishing_tap(netns: str, tmp_short: Path) -> None:
    """No DHCP server: the test writes the lease file itself, as dnsmasq would (in place)."""
    leases = tmp_short / "leases"
    for name in ("vtap", "vpeer"):
        run("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}-x", netns=netns)
        run("ip", "link", "set", name, "up", netns=netns)
    fds = len(os.listdir("/proc/self/fd"))
    with observer(netns, leases) as (watcher, reports):
        with pytest.raises(HostError, match="cannot watch nothere for vm-x"):
            watcher.watch("vm-x", "nothere", MAC)
        watcher.watch("vm-1", "vtap", MAC)
        watcher.watch("vm-2", "vpeer", "02:00:00:00:00:02")
        leases.write_text(f"0 {MAC} 10.77.0.101 guest *\n0 02:00:00:00:00:02 10.77.0.102 * *\n")
        wait_for(lambda: len(reports.seen) == 2, DEADLINE, "both leases")
        assert sorted(reports.seen) == [("vm-1", "10.77.0.101"), ("vm-2", "10.77.0.102")]

        # the link goes away under a watch: nothing breaks, the lease file still counts
        run("ip", "link", "del", "vtap", netns=netns)
        leases.write_text(f"0 {MAC} 10.77.0.111 guest *\n0 02:00:00:00:00:02 10.77.0.102 * *\n")
        wait_for(lambda: len(reports.seen) == 3, DEADLINE, "the changed lease")
        assert reports.seen[2] == ("vm-1", "10.77.0.111")

        # a half-written file, then the same leases again: no news
        leases.write_text(f"0 {MAC} 10.77.0.1")
        leases.write_text(f"0 {MAC} 10.77.0.111 guest *\n0 02:00:00:00:00:02 10.77.0.102 * *\n")
        watcher.forget("vm-2")
        watcher.forget("vm-2")
        watcher.forget("never-watched")
        leases.write_text(f"0 {MAC} 10.77.0.111 guest *\n0 02:00:00:00:00:02 10.77.0.122 * *\n")
        # a watch started late learns what the file already says, a fresh one anew
        watcher.watch("vm-3", "vpeer", "02:00:00:00:00:02")
        watcher.watch("vm-1", "vpeer", MAC)
        wait_for(lambda: len(reports.seen) == 5, DEADLINE, "the late watches")
        assert sorted(reports.seen[3:]) == [("vm-1", "10.77.0.111"), ("vm-3", "10.77.0.122")]
    assert len(os.listdir("/proc/self/fd")) == fds
    with pytest.raises(HostError, match="closed"):
        watcher.watch("vm-4", "vpeer", MAC)


def gratuitous_arp(ip: str, vid: int | None = None) -> bytes:
    mac = bytes.fromhex(MAC.replace(":", ""))
    tag = b"" if vid is None else struct.pack("!HH", 0x8100, vid)
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(ip)
    return b"\xff" * 6 + mac + tag + b"\x08\x06" + body + b"\0" * 6 + socket.inet_aton(ip)


def test_only_untagged_frames_from_the_guest_count(netns: str) -> None:
    """The kernel takes VLAN tags out of the frame before a packet socket sees it, and frames
    bearing the guest's MAC that travel toward it are someone else's: the filter drops both."""
    run("ip", "link", "add", "vtap", "type", "veth", "peer", "name", "vguest", netns=netns)
    for name in ("vtap", "vguest"):
        run("ip", "link", "set", name, "up", netns=netns)

    def send(link: str, frame: bytes) -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((link, 0))
            sock.send(frame)

    with observer(netns) as (watcher, reports):
        watcher.watch("vm-1", "vtap", MAC)
        worker = NetnsWorker(netns)
        try:
            worker.run(send, "vtap", gratuitous_arp("10.77.0.52"))  # toward the guest
            worker.run(send, "vguest", gratuitous_arp("10.77.0.50", vid=10))
            worker.run(send, "vguest", gratuitous_arp("10.77.0.51"))
        finally:
            worker.close()
        wait_for(lambda: reports.seen, DEADLINE, "the untagged gratuitous ARP")
        assert reports.seen == [("vm-1", "10.77.0.51")]
