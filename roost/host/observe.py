"""Learning which IPv4 address a dhcp-mode guest uses, without running its DHCP server.

In dhcp mode an external server leases the guest its address, yet roost must report it. Two
independent sources, either enough on its own: what crosses the VM's tap (the server's DHCPACK
for the guest's MAC, the guest's own ARP, and — until something better is known — the source
address of its IPv4 packets), seen through a packet socket created inside the daemon's network
namespace; and the server's lease file, when the operator says where it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import re
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NamedTuple

from roost.errors import HostError
from roost.host.netns import NetnsWorker

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
PACKET_OUTGOING = 4  # the frame was sent *toward* the guest (sll_pkttype)
DHCPACK = 5
_DHCP_COOKIE = b"\x63\x82\x53\x63"
_SERVER_TO_CLIENT = struct.pack("!HH", 67, 68)
_CLIENT_TO_SERVER = struct.pack("!HH", 68, 67)
_ARP_ETHERNET_IPV4 = struct.pack("!HHBB", 1, ETH_P_IP, 6, 4)
_MAC = re.compile(r"[0-9a-fA-F]{1,2}(?:[:-][0-9a-fA-F]{1,2}){5}")

Source = Literal["dhcp", "arp", "ipv4"]


class Sighting(NamedTuple):
    """An address seen in one frame. `dhcp` (the server's ACK) and `arp` (the guest claiming
    it) are the guest's address; `ipv4` (a packet's source) is only a hint, since a guest
    may route or hold several addresses."""

    ip: str
    source: Source


def mac_bytes(mac: str) -> bytes:
    """`aa:bb:cc:dd:ee:ff` (or with dashes, or dhcpd's unpadded `0:1:...`) as 6 bytes."""
    if not _MAC.fullmatch(mac.strip()):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(part, 16) for part in re.split("[:-]", mac.strip()))


def _unicast(raw: bytes) -> str | None:
    """The dotted address if it can be a host's own: not 0/8, loopback, multicast or class E."""
    return None if raw[0] in (0, 127) or raw[0] >= 224 else socket.inet_ntoa(raw)


def parse_frame(frame: bytes, mac: str | bytes, *, from_guest: bool = True) -> Sighting | None:
    """The address an Ethernet `frame` shows the guest with `mac` using, or None.

    `from_guest` is False for frames the tap sent toward the guest: only a DHCPACK counts then,
    since anything else bearing the guest's MAC would be someone else spoofing it. Tagged frames
    (802.1Q/802.1ad) are ignored on purpose: an address on a guest VLAN is not the one its
    untagged NIC holds, which is the one roost reaches. Never raises on garbage.
    """
    guest = mac if isinstance(mac, bytes) else mac_bytes(mac)
    if len(frame) < 14:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    own = from_guest and frame[6:12] == guest
    if ethertype == ETH_P_ARP:
        return _arp(frame[14:], guest) if own else None
    if ethertype == ETH_P_IP:
        return _ipv4(frame[14:], guest, own)
    return None


def _arp(arp: bytes, guest: bytes) -> Sighting | None:
    """Requests, replies and gratuitous ARP whose sender is the guest; probes (sender 0.0.0.0,
    a DHCP client checking its offer) say nothing."""
    if len(arp) < 28 or arp[:6] != _ARP_ETHERNET_IPV4 or arp[6:8] not in (b"\0\1", b"\0\2"):
        return None
    if arp[8:14] != guest:
        return None
    ip = _unicast(arp[14:18])
    return Sighting(ip, "arp") if ip else None


def _ipv4(packet: bytes, guest: bytes, own: bool) -> Sighting | None:
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header = (packet[0] & 0x0F) * 4
    total = int.from_bytes(packet[2:4], "big")
    if header < 20 or total < header:
        return None
    whole = not int.from_bytes(packet[6:8], "big") & 0x3FFF  # not a fragment
    udp = packet[header:total]
    if packet[9] == socket.IPPROTO_UDP and whole and udp[:4] == _SERVER_TO_CLIENT:
        length = int.from_bytes(udp[4:6], "big")
        return _dhcp_ack(udp[8:length], guest) if 8 <= length <= len(udp) else None
    if not own or (packet[9] == socket.IPPROTO_UDP and udp[:4] == _CLIENT_TO_SERVER):
        return None  # a client's own DHCP says nothing until the server ACKs (or on release)
    ip = _unicast(packet[12:16])
    return Sighting(ip, "ipv4") if ip else None


def _dhcp_ack(bootp: bytes, guest: bytes) -> Sighting | None:
    """The `yiaddr` of a BOOTREPLY for the guest's `chaddr` whose DHCP message type is ACK."""
    if len(bootp) < 240 or bootp[:3] != b"\x02\x01\x06" or bootp[236:240] != _DHCP_COOKIE:
        return None
    if bootp[28:34] != guest or _message_type(bootp[240:]) != DHCPACK:
        return None
    ip = _unicast(bootp[16:20])
    return Sighting(ip, "dhcp") if ip else None


def _message_type(options: bytes) -> int | None:
    """Option 53 from the options field (not from an overloaded `file`/`sname`; nobody does)."""
    at = 0
    while at < len(options):
        tag = options[at]
        if tag == 255:
            return None
        if tag == 0:
            at += 1
            continue
        if at + 1 >= len(options):
            return None
        length = options[at + 1]
        value = options[at + 2 : at + 2 + length]
        if len(value) < length:
            return None
        if tag == 53:
            return value[0] if length == 1 else None
        at += 2 + length
    return None


# -- lease files ---------------------------------------------------------------------------

_ISC_LEASE = re.compile(r'^[ \t]*lease\s+(\S+)\s*\{((?:[^{}"]|"(?:[^"\\]|\\.)*")*)\}', re.M)
_ISC_MAC = re.compile(r"^\s*hardware\s+ethernet\s+([0-9a-fA-F:]+)\s*;", re.M)
_ISC_STATE = re.compile(r"^\s*binding\s+state\s+(\w+)\s*;", re.M)
_ISC_ENDS = re.compile(r"^\s*ends\s+(?:\d\s+(\d+/\d+/\d+\s+\d+:\d+:\d+)|epoch\s+(\d+))\s*;", re.M)


def read_leases(path: Path, *, now: float | None = None) -> dict[str, str]:
    """MAC (lower-case, colon-separated) → address of its current lease. A missing, unreadable
    or half-written file gives what can be trusted of it, never an error: the server rewrites
    it in place, so a reader may catch it mid-write."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    moment = time.time() if now is None else now
    if _ISC_LEASE.search(text):
        return _isc_leases(text, moment)
    return _dnsmasq_leases(text, moment)


def _dnsmasq_leases(text: str, now: float) -> dict[str, str]:
    """`<expiry> <mac> <ip> <hostname> <client-id>` lines; for a MAC with several, the one
    that expires last (0 = never). The DHCPv6 `duid` line and leases fail to parse and are
    skipped, as is a last line without its newline (still being written)."""
    best: dict[str, tuple[float, str]] = {}
    for line in text.splitlines(keepends=True):
        fields = line.split()
        if not line.endswith("\n") or len(fields) != 5:
            continue
        try:
            expiry = int(fields[0])
            mac = mac_bytes(fields[1]).hex(":")
            ip = str(ipaddress.IPv4Address(fields[2]))
        except ValueError:
            continue
        if 10**9 < expiry < now:  # expired (a small number is a lease length: HAVE_BROKEN_RTC)
            continue
        rank = float(expiry) if expiry else float("inf")
        if mac not in best or rank >= best[mac][0]:
            best[mac] = (rank, ip)
    return {mac: ip for mac, (_, ip) in best.items()}


def _isc_leases(text: str, now: float) -> dict[str, str]:
    """dhcpd.leases is a journal: the last block for an address is its state; of a MAC's
    active, unexpired leases the one written last wins. An unclosed last block is skipped."""
    holders: dict[str, str | None] = {}
    for match in _ISC_LEASE.finditer(text):
        ip, body = match.groups()
        holders.pop(ip, None)  # keep the dict in order of each address's last block
        holders[ip] = _isc_holder(body, now)
    leases: dict[str, str] = {}
    for ip, mac in holders.items():
        try:
            address = str(ipaddress.IPv4Address(ip))
        except ValueError:
            continue
        if mac is not None:
            leases[mac] = address
    return leases


def _isc_holder(body: str, now: float) -> str | None:
    """The MAC holding the lease a block describes, if it is active and not past its end."""
    state = _ISC_STATE.search(body)
    found = _ISC_MAC.search(body)
    if found is None or (state is not None and state.group(1) != "active"):
        return None
    ends = _ISC_ENDS.search(body)
    try:
        if ends is not None:
            stamp, epoch = ends.groups()
            end = (
                float(epoch)
                if epoch
                else datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
            )
            if end < now:
                return None
        return mac_bytes(found.group(1)).hex(":")
    except ValueError:
        return None


# -- the kernel filter ---------------------------------------------------------------------

SO_ATTACH_FILTER = 26
_AD = 0x1_0000_0000 - 0x1000  # SKF_AD_OFF (-4096) as the u32 a classic BPF `k` holds
_AD_PKTTYPE, _AD_VLAN_TAG_PRESENT = 4, 48
_LD_W, _LD_H, _LD_B, _LDH_X, _LDX_IPHDR = 0x20, 0x28, 0x30, 0x48, 0xB1
_JEQ, _JSET, _RET = 0x15, 0x45, 0x06
_WHOLE = 14 + 65535  # bytes kept of a DHCP reply: all of it (the largest IPv4 packet)
_HEAD = 128  # of anything else: its headers

Instruction = tuple[int, int, str | None, str | None]


def bpf_program(mac: bytes, *, seeking: bool) -> list[tuple[int, int, int, int]]:
    """A classic BPF filter so that only frames that may matter wake Python: untagged ARP
    from the guest, DHCP server → client replies and, while `seeking` (no address known yet),
    IPv4 from the guest. The kernel moves VLAN tags out of the frame before a packet socket
    sees it, so only the filter can tell tagged frames apart (it drops them)."""
    other = "guest" if seeking else "drop"
    program: list[Instruction | str] = [
        (_LD_W, _AD + _AD_VLAN_TAG_PRESENT, None, None),
        (_JEQ, 0, None, "drop"),
        (_LD_H, 12, None, None),  # ethertype
        (_JEQ, ETH_P_ARP, "guest", None),
        (_JEQ, ETH_P_IP, None, "drop"),
        (_LD_B, 23, None, None),  # IPv4 protocol
        (_JEQ, socket.IPPROTO_UDP, None, other),
        (_LD_H, 20, None, None),  # flags and fragment offset
        (_JSET, 0x3FFF, other, None),
        (_LDX_IPHDR, 14, None, None),  # X = IPv4 header length
        (_LDH_X, 14, None, None),  # UDP source port
        (_JEQ, 67, None, other),
        (_LDH_X, 16, None, None),  # UDP destination port
        (_JEQ, 68, "whole", other),
        "guest",
        (_LD_W, _AD + _AD_PKTTYPE, None, None),
        (_JEQ, PACKET_OUTGOING, "drop", None),
        (_LD_W, 6, None, None),  # Ethernet source, first four bytes
        (_JEQ, int.from_bytes(mac[:4], "big"), None, "drop"),
        (_LD_H, 10, None, None),
        (_JEQ, int.from_bytes(mac[4:], "big"), None, "drop"),
        (_RET, _HEAD, None, None),
        "whole",
        (_RET, _WHOLE, None, None),
        "drop",
        (_RET, 0, None, None),
    ]
    labels: dict[str, int] = {}
    instructions: list[Instruction] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)

    def offset(pc: int, label: str | None) -> int:
        return 0 if label is None else labels[label] - pc - 1

    return [
        (code, offset(pc, yes), offset(pc, no), k)
        for pc, (code, k, yes, no) in enumerate(instructions)
    ]


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER with a `struct sock_fprog` (the kernel copies the instructions)."""
    code = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    sock.setsockopt(
        socket.SOL_SOCKET,
        SO_ATTACH_FILTER,
        struct.pack("HL", len(program), ctypes.addressof(buffer)),
    )


# -- the observer --------------------------------------------------------------------------


@dataclass(eq=False)
class _Watch:
    key: str
    mac: bytes
    sock: socket.socket | None
    known: str | None = None  # what on_address last said
    leased: str | None = None  # what the lease file last said


class LeaseObserver:
    """Reports, per watched VM, the IPv4 address its guest uses — once per change.

    One thread serves every tap: a selector over one packet socket per tap, a pipe that wakes
    it when watches change, and (with `lease_file`) a poll of the file every half second.
    `on_address(key, ip)` runs on that thread, so it should be quick; one already under way may
    still arrive just after `forget(key)` returns. The sockets are made on `worker`'s thread so
    they live in the daemon's namespace; the thread reading them may live anywhere.
    """

    POLL = 0.5
    SETTLE = 2.0
    BURST = 64  # frames read from one socket before the others get a turn

    def __init__(
        self,
        worker: NetnsWorker,
        on_address: Callable[[str, str], None],
        lease_file: Path | None = None,
    ) -> None:
        self._worker = worker
        self._on_address = on_address
        self._lease_file = lease_file
        self._lock = threading.Lock()
        self._watches: dict[str, _Watch] = {}
        self._added: list[_Watch] = []
        self._retired: list[_Watch] = []
        self._stopping = False
        self._closed = False
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._leases: dict[str, str] = {}
        self._lease_signature: tuple[int, int, int] | None = None
        self._thread = threading.Thread(target=self._run, name="roost-observe", daemon=True)
        self._thread.start()

    def watch(self, key: str, tap: str, mac: str) -> None:
        """Start watching `tap` for the guest with `mac` (replacing any earlier watch of `key`
        and forgetting what it had learned)."""
        guest = mac_bytes(mac)
        if self._stopping:
            raise HostError("the lease observer is closed")

        def open_socket() -> socket.socket:
            # protocol 0 receives nothing until bind, so no frame from another link or
            # unfiltered slips in between
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                attach_filter(sock, bpf_program(guest, seeking=True))
                sock.bind((tap, ETH_P_ALL))
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            return sock

        try:
            sock = self._worker.run(open_socket)
        except OSError as error:
            raise HostError(f"cannot watch {tap} for {key}: {error.strerror or error}") from None
        watch = _Watch(key, guest, sock)
        with self._lock:
            if self._stopping:
                sock.close()
                raise HostError("the lease observer is closed")
            old = self._watches.get(key)
            if old is not None:
                self._retired.append(old)
            self._watches[key] = watch
            self._added.append(watch)
            self._wake()

    def forget(self, key: str) -> None:
        """Stop watching `key`; its socket is closed by the observer's thread."""
        with self._lock:
            old = self._watches.pop(key, None)
            if old is not None and not self._stopping:
                self._retired.append(old)
                self._wake()

    def close(self) -> None:
        """Stop watching everything and join the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._stopping = True
            self._wake()
        self._thread.join()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe has wake-ups enough
            os.write(self._wake_write, b"\0")

    def _run(self) -> None:
        next_poll = time.monotonic()
        try:
            while not self._stopping:
                timeout = None
                if self._lease_file is not None:
                    timeout = max(0.0, next_poll - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        self._apply_changes()
                    else:
                        self._receive(key.data)
                if self._lease_file is not None and time.monotonic() >= next_poll:
                    self._poll_leases(self._lease_file)
                    next_poll = time.monotonic() + self.POLL
        except Exception:
            log.exception("the lease observer stopped")
        finally:
            with self._lock:
                watches = [*self._watches.values(), *self._added, *self._retired]
                self._watches.clear()
                self._stopping = True
            for watch in watches:
                self._drop(watch)
            self._selector.close()

    def _apply_changes(self) -> None:
        while True:
            try:
                if not os.read(self._wake_read, 4096):
                    break
            except BlockingIOError:
                break
        with self._lock:
            added, self._added = self._added, []
            retired, self._retired = self._retired, []
        if added and self._lease_file is not None:
            self._poll_leases(self._lease_file)  # so a new watch starts from the file as it is
        for watch in added:
            if watch.sock is not None:
                self._selector.register(watch.sock, selectors.EVENT_READ, watch)
            self._from_leases(watch)
        for watch in retired:
            self._drop(watch)

    def _drop(self, watch: _Watch) -> None:
        if watch.sock is None:
            return
        if watch.sock in self._selector.get_map():
            self._selector.unregister(watch.sock)
        watch.sock.close()
        watch.sock = None

    def _receive(self, watch: _Watch) -> None:
        for _ in range(self.BURST):
            if watch.sock is None:
                return
            try:
                frame, address = watch.sock.recvfrom(_WHOLE)
            except BlockingIOError:
                return
            except OSError as error:
                # ENETDOWN: the tap went down or away. The socket rearms itself if the link
                # comes back up and stays silent if it was deleted, so it is kept for
                # forget(); any other error ends packet watching for this key.
                if error.errno != errno.ENETDOWN:
                    self._drop(watch)
                return
            sighting = parse_frame(frame, watch.mac, from_guest=address[2] != PACKET_OUTGOING)
            if sighting is not None:
                self._learn(watch, sighting.ip, hint=sighting.source == "ipv4")

    def _poll_leases(self, path: Path) -> None:
        """Re-read the lease file when it changed and tell every watch what it now says. A file
        changed in the last seconds is re-read every time: a same-size rewrite within one
        timestamp tick would leave its signature as it was."""
        try:
            stat: os.stat_result | None = path.stat()
        except OSError:
            stat = None
        signature = None if stat is None else (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        settled = stat is None or time.time() - stat.st_mtime > self.SETTLE
        if signature == self._lease_signature and settled:
            return
        self._lease_signature = signature
        self._leases = read_leases(path) if stat is not None else {}
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            self._from_leases(watch)

    def _from_leases(self, watch: _Watch) -> None:
        ip = self._leases.get(watch.mac.hex(":"))
        if ip is not None and ip != watch.leased:
            watch.leased = ip
            self._learn(watch, ip, hint=False)

    def _learn(self, watch: _Watch, ip: str, *, hint: bool) -> None:
        """Report `ip` if it is news; a hint only counts while nothing better is known."""
        if ip == watch.known or (hint and watch.known is not None):
            return
        with self._lock:
            if self._watches.get(watch.key) is not watch:
                return
        if watch.known is None and watch.sock is not None:
            attach_filter(watch.sock, bpf_program(watch.mac, seeking=False))
        watch.known = ip
        try:
            self._on_address(watch.key, ip)
        except Exception:
            log.exception("on_address(%r, %r) failed", watch.key, ip)
