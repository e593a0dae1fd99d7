"""roost as a CNI runtime on the host, with Debian's real plugins (bridge + host-local).

The test's namespace plays the daemon's (`--netns`): plugins run there, so the bridge they
make and the veths' host ends land in it. Each VM gets its own namespace `roost-vm-<name>`.
In place of a VMM the test holds the tap's queue (TUNSETIFF on /dev/net/tun, inside the VM's
namespace) and answers ARP and ping itself, from the veth's MAC and the result's address: a
stand-in guest reached from the daemon's namespace through the plugin's bridge, the veth and
roost's tc redirect.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import secrets
import select
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import IFT_NO_PI, IFT_TAP, tuntap

from roost.errors import HostError
from roost.host import redirect
from roost.host.cni import (
    Attachment,
    CniRuntime,
    NamespaceExistsError,
    create_namespace,
    delete_namespace,
    vm_namespace,
)
from roost.host.netns import NetnsWorker, netns_path
from roost.spec.cni import CniResult, parse_conflist
from tests.harness import links, run

pytestmark = pytest.mark.root

BIN_DIR = Path("/usr/lib/cni")
NETWORK = "roostcni"
BRIDGE = "rcni0"
SUBNET = ipaddress.IPv4Network("10.88.0.0/24")
SUBNET6 = ipaddress.IPv6Network("fd88::/64")
TAP = "rtapc1"
MTU = 1400

if not (BIN_DIR / "bridge").exists():
    pytest.skip("needs containernetworking-plugins (make setup)", allow_module_level=True)


def bridge_conflist(data_dir: Path, *more: dict[str, Any], ipv6: bool = False) -> dict[str, Any]:
    ranges = [[{"subnet": str(SUBNET)}]] + ([[{"subnet": str(SUBNET6)}]] if ipv6 else [])
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "mtu": MTU,
                "ipam": {"type": "host-local", "ranges": ranges, "dataDir": str(data_dir)},
            },
            *more,
        ],
    }


@dataclass
class Host:
    netns: str
    runtime: CniRuntime
    conf_dir: Path
    data_dir: Path

    def leases(self) -> list[str]:
        """host-local's lease files (one per address, named by it)."""
        directory = self.data_dir / NETWORK
        if not directory.exists():
            return []
        return sorted(p.name for p in directory.iterdir() if p.name[0].isdigit() or ":" in p.name)

    def veths(self) -> list[str]:
        return [name for name, link in links(self.netns).items() if name.startswith("veth")]


@pytest.fixture
def host(netns: str, tmp_path: Path) -> Iterator[Host]:
    conf_dir, data_dir = tmp_path / "net.d", tmp_path / "leases"
    conf_dir.mkdir()
    (conf_dir / "10-roost.conflist").write_text(json.dumps(bridge_conflist(data_dir)))
    worker = NetnsWorker(netns)
    try:
        yield Host(netns, CniRuntime(conf_dir, [BIN_DIR], worker), conf_dir, data_dir)
    finally:
        worker.close()


@pytest.fixture
def vm() -> Iterator[str]:
    """A VM name whose namespace is removed afterwards, whatever the test left."""
    name = f"t{secrets.token_hex(3)}"
    yield name
    delete_namespace(vm_namespace(name))
    assert not netns_path(vm_namespace(name)).exists()


def attach(host: Host, vm: str, **kwargs: Any) -> Attachment:
    path = create_namespace(vm_namespace(vm))
    kwargs.setdefault("network", NETWORK)
    return host.runtime.attachment(
        container_id=f"roost-{vm}", netns=str(path), ifname="eth0", **kwargs
    )


def test_add_puts_the_veth_in_the_vm_namespace_with_every_address_and_del_takes_all_back(
    host: Host, vm: str
) -> None:
    (host.conf_dir / "10-roost.conflist").write_text(
        json.dumps(bridge_conflist(host.data_dir, ipv6=True))
    )
    attachment = attach(host, vm)
    result = host.runtime.add(attachment)

    index, interface = result.sandbox_interface("eth0", attachment.netns)
    in_vm = links(vm_namespace(vm))
    assert in_vm["eth0"]["address"] == interface.mac
    addresses = {ip.address for ip in result.ips_of(index)}
    assert {a.version for a in addresses} == {4, 6}  # both kept, none dropped
    [ipv4] = [ip for ip in result.ips_of(index) if ip.address.version == 4]
    assert ipv4.address in ipaddress.IPv4Interface(f"{SUBNET}").network
    assert ipv4.gateway == SUBNET.network_address + 1
    assert set(host.leases()) == {str(a.ip) for a in addresses}
    lease = (host.data_dir / NETWORK / str(ipv4.address.ip)).read_text()
    assert lease.split() == [attachment.container_id, "eth0"]
    assert links(host.netns)[BRIDGE]["operstate"] in ("UP", "UNKNOWN", "DOWN")
    assert len(host.veths()) == 1

    host.runtime.check(attachment, result)
    host.runtime.delete(attachment, result)
    assert host.leases() == []
    assert host.veths() == []
    assert "eth0" not in links(vm_namespace(vm))

    host.runtime.delete(attachment, result)  # DEL twice succeeds
    delete_namespace(vm_namespace(vm))
    host.runtime.delete(attachment, result)  # and without the namespace
    host.runtime.delete(attachment, None)  # and without a result (a crash mid-ADD)


def test_the_attachment_reloads_from_its_json_and_the_result_from_its_own(
    host: Host, vm: str
) -> None:
    attachment = attach(host, vm)
    result = host.runtime.add(attachment)
    stored = json.loads(json.dumps(attachment.to_json()))
    again = Attachment.from_json(stored)
    assert again == attachment
    cached = CniResult.model_validate(json.loads(json.dumps(result.to_json())))
    host.runtime.check(again, cached)
    host.runtime.delete(again, cached)
    assert host.leases() == []


def test_after_a_crash_mid_add_the_stored_attachment_alone_is_enough_to_clean_up(
    host: Host, vm: str
) -> None:
    stored = json.dumps(attach(host, vm).to_json())  # written before ADD
    host.runtime.add(Attachment.from_json(json.loads(stored)))  # its result never stored
    assert host.leases() and host.veths()

    assert netns_path(vm_namespace(vm)).exists()  # what a reaper finds at start
    host.runtime.delete(Attachment.from_json(json.loads(stored)), None)
    delete_namespace(vm_namespace(vm))
    assert host.leases() == []
    assert host.veths() == []
    assert not netns_path(vm_namespace(vm)).exists()


def test_a_redirect_needs_the_vm_namespace(vm: str) -> None:
    with pytest.raises(HostError, match=f"network namespace {vm_namespace(vm)} does not exist"):
        redirect.connect(vm_namespace(vm), "eth0", TAP)


def test_a_stand_in_guest_behind_the_redirected_tap_answers_ping_from_the_daemon_namespace(
    host: Host, vm: str
) -> None:
    attachment = attach(host, vm)
    result = host.runtime.add(attachment)
    index, _ = result.sandbox_interface("eth0", attachment.netns)
    [ip] = result.ips_of(index)
    made = redirect.connect(vm_namespace(vm), "eth0", TAP)
    try:
        veth = links(vm_namespace(vm))["eth0"]
        assert made.mac == veth["address"]  # the guest must use the veth's MAC
        assert made.mtu == MTU == links(vm_namespace(vm))[TAP]["mtu"]
        assert redirect.check(vm_namespace(vm), "eth0", TAP) == []

        with stand_in_guest(vm_namespace(vm), TAP, made.mac, ip.address.ip) as answered:
            ping = run("ping", "-c", "1", "-W", "5", str(ip.address.ip), netns=host.netns)
            assert ping.returncode == 0, ping.stdout + ping.stderr
        assert answered["arp"] >= 1 and answered["icmp"] == 1

        # a redirect torn down by hand passes the plugins' CHECK (they know nothing of it);
        # roost's own check names what is missing
        run("tc", "filter", "del", "dev", TAP, "ingress", netns=vm_namespace(vm))
        host.runtime.check(attachment, result)
        problems = redirect.check(vm_namespace(vm), "eth0", TAP)
        assert problems[0] == (
            f"no tc filter redirects frames from {TAP} to eth0 in {vm_namespace(vm)}: the "
            "guest's traffic is cut that way"
        )
        assert problems[-1] == "restart the VM to rebuild its redirect"

        redirect.connect(vm_namespace(vm), "eth0", TAP)  # rebuilt over what is left
        assert redirect.check(vm_namespace(vm), "eth0", TAP) == []
    finally:
        redirect.disconnect(vm_namespace(vm), "eth0", TAP)
    redirect.disconnect(vm_namespace(vm), "eth0", TAP)  # twice is fine
    assert TAP not in links(vm_namespace(vm))
    assert "ingress" not in run("tc", "qdisc", "show", "dev", "eth0", netns=vm_namespace(vm)).stdout
    host.runtime.delete(attachment, result)
    delete_namespace(vm_namespace(vm))
    redirect.disconnect(vm_namespace(vm), "eth0", TAP)  # and without the namespace
    assert redirect.check(vm_namespace(vm), "eth0", TAP) == [
        f"network namespace {vm_namespace(vm)} is gone; restart the VM to rebuild it"
    ]


def test_check_fails_with_the_plugins_message_when_the_veth_is_gone(host: Host, vm: str) -> None:
    attachment = attach(host, vm)
    result = host.runtime.add(attachment)
    run("ip", "link", "del", "eth0", netns=vm_namespace(vm))
    with pytest.raises(HostError) as failed:
        host.runtime.check(attachment, result)
    assert failed.value.message.startswith(
        f"CNI plugin 'bridge' (CHECK on network {NETWORK!r}) failed: "
    )
    assert "eth0" in failed.value.message
    host.runtime.delete(attachment, result)
    assert host.leases() == []


def test_a_conflist_naming_a_missing_plugin_is_a_host_error_naming_it_and_leaves_nothing(
    host: Host, vm: str
) -> None:
    conflist = parse_conflist(bridge_conflist(host.data_dir, {"type": "no-such-plugin"}))
    attachment = attach(host, vm, network=None, conflist=conflist)
    with pytest.raises(HostError) as failed:
        host.runtime.add(attachment)
    assert failed.value.code == "host_error" and failed.value.http_status == 502
    assert failed.value.message == (
        f"CNI plugin 'no-such-plugin' of network {NETWORK!r} is not in {BIN_DIR}; install it "
        "or name its directory with roost serve --cni-bin-dir"
    )
    # ADD undid the bridge plugin's work; the namespace is the caller's to remove
    assert host.leases() == []
    assert host.veths() == []
    assert "eth0" not in links(vm_namespace(vm))


def test_a_plugins_error_object_becomes_a_host_error_with_its_message(host: Host, vm: str) -> None:
    conflist = bridge_conflist(host.data_dir)
    conflist["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "10.88.0.0/33"}]]
    attachment = attach(host, vm, network=None, conflist=parse_conflist(conflist))
    with pytest.raises(HostError) as failed:
        host.runtime.add(attachment)
    assert failed.value.message.startswith(
        f"CNI plugin 'bridge' (ADD on network {NETWORK!r}) failed: "
    )
    assert "10.88.0.0/33" in failed.value.message
    assert "[CNI error code" in failed.value.message
    assert host.veths() == []


def test_a_vm_namespace_is_made_once_and_removed_once(vm: str) -> None:
    name = vm_namespace(vm)
    path = create_namespace(name)
    with pytest.raises(NamespaceExistsError, match=f"{name} exists already"):
        create_namespace(name)  # another daemon's VM of that name has it
    assert name in run("ip", "netns", "list").stdout
    assert run("ip", "link", "show", "lo", netns=name).returncode == 0
    assert delete_namespace(name) is True
    assert delete_namespace(name) is False
    assert not path.exists()


def test_a_file_a_crash_left_where_a_namespace_goes_is_taken_and_removed_as_one(vm: str) -> None:
    name = vm_namespace(vm)
    netns_path(name).touch()  # a crash between the file and its mount
    with pytest.raises(NamespaceExistsError):
        create_namespace(name)
    assert delete_namespace(name) is True
    assert create_namespace(name) == netns_path(name)


@contextmanager
def stand_in_guest(
    netns: str, tap: str, mac: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> Iterator[dict[str, int]]:
    """The tap's queue held as a VMM would, answering ARP and ping for `address` from `mac`;
    yields the counts of what it answered."""
    worker = NetnsWorker(netns)
    fd = worker.run(open_tap_queue, tap)
    answered = {"arp": 0, "icmp": 0}
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                frame = os.read(fd, 65536)
                reply, kind = answer(frame, bytes.fromhex(mac.replace(":", "")), address.packed)
                if reply is not None:
                    os.write(fd, reply)
                    answered[kind] += 1

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield answered
    finally:
        stop.set()
        thread.join()
        os.close(fd)
        worker.close()


def open_tap_queue(tap: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    assert tuntap.TUNSETIFF is not None
    fcntl.ioctl(fd, tuntap.TUNSETIFF, struct.pack("16sH", tap.encode(), IFT_TAP | IFT_NO_PI))
    return fd


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int(word) for word in struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def answer(frame: bytes, mac: bytes, address: bytes) -> tuple[bytes | None, str]:
    """The reply a guest at `address` with `mac` sends to `frame` (ARP who-has, ICMP echo)."""
    source, ethertype = frame[6:12], struct.unpack("!H", frame[12:14])[0]
    if ethertype == 0x0806 and frame[20:22] == b"\0\1" and frame[38:42] == address:
        sender = frame[22:32]
        arp = frame[14:20] + b"\0\2" + mac + address + sender
        return source + mac + frame[12:14] + arp, "arp"
    if ethertype == 0x0800 and frame[23] == 1 and frame[30:34] == address:
        header_length = (frame[14] & 0x0F) * 4
        ip = frame[14 : 14 + header_length]
        icmp = frame[14 + header_length :]
        if icmp[0] != 8:
            return None, ""
        ip = ip[:12] + ip[16:20] + ip[12:16] + ip[20:]  # swapped: the checksum stays
        echo = b"\0\0\0\0" + icmp[4:]
        echo = echo[:2] + struct.pack("!H", checksum(echo)) + echo[4:]
        return source + mac + frame[12:14] + ip + echo, "icmp"
    return None, ""
