"""VXLAN devices and their forwarding entries, through netlink on the namespace's own thread:
the host side of a cluster network that spans hosts. Devices are made and removed through
pyroute2; the entries, read every second and written in batches, in netlink messages made and
parsed here (see below why).

Each cluster network on a host has `vx<vni>` (VXLAN id vni, source = the host's VTEP address,
UDP port 4789, learning off) as a port of the network's bridge. With learning off the device
sends only where its forwarding database says: an all-zero entry per peer VTEP (broadcast,
multicast and unknown unicast go to every one of them: head-end replication) and an entry per
remote guest MAC naming the VTEP of the host it lives on. The encapsulation costs 50 bytes
(inner Ethernet 14, VXLAN 8, UDP 8, outer IPv4 20), so the device's MTU — the network's — must
be at most the MTU of the link carrying the VTEP address minus 50.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from roost.errors import HostError
from roost.host.netns import NetnsWorker

VXLAN_PORT = 4789  # the IANA port, which every host of a cluster uses
OVERHEAD = 50  # bytes VXLAN over IPv4 adds to each inner frame's payload
FLOOD_MAC = "00:00:00:00:00:00"  # the entry of the VTEPs broadcast and unknown unicast go to
DEVICE = re.compile(r"vx(\d+)")
NTF_SELF = ndmsg.flags["self"]
STATIC = ndmsg.states["permanent"] | ndmsg.states["noarp"]  # what `bridge fdb` writes
T = TypeVar("T")


def device_name(vni: int) -> str:
    return f"vx{vni}"


@dataclass(frozen=True)
class Forwarding:
    """A VXLAN device's forwarding entries: the peer VTEPs it floods to and where each remote
    MAC (lower case) is."""

    flood: frozenset[str] = frozenset()
    macs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VxlanDevice:
    """A `vx<vni>` device as the kernel has it."""

    vni: int
    local: str | None
    port: int
    learning: bool
    mtu: int
    master: str | None
    up: bool
    forwarding: Forwarding


def _vxlan_data(link: Any) -> Any:  # of a link pyroute2 parsed
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return None
    return info.get_attr("IFLA_INFO_DATA")


class Vxlans:
    """The `vx<vni>` devices of the namespace. Every netlink request runs on the worker's
    thread; each method is one hand-off to it."""

    def __init__(self, worker: NetnsWorker) -> None:
        self._worker = worker
        self._ipr: IPRoute = worker.run(IPRoute)

    def close(self) -> None:
        self._worker.run(self._ipr.close)

    def present(self) -> dict[int, VxlanDevice]:
        """Every `vx<vni>` VXLAN device (by vni) with its forwarding entries."""
        return self._call("read the VXLAN devices", self._present)

    def ensure(self, vni: int, local: str, bridge: str, mtu: int) -> None:
        """`vx<vni>` from `local` on port 4789 with learning off, of MTU `mtu`, a port of
        `bridge` (whose MTU becomes `mtu` too), up. A device of that name made otherwise (another
        VTEP address, learning on) is made again, without forwarding entries."""
        self._call(f"set up {device_name(vni)}", self._ensure, vni, local, bridge, mtu)

    def update(
        self,
        vni: int,
        *,
        flood_add: Iterable[str] = (),
        flood_remove: Iterable[str] = (),
        macs_replace: Mapping[str, str] | None = None,
        macs_remove: Iterable[str] = (),
    ) -> None:
        """Change `vx<vni>`'s forwarding entries: flood to the VTEPs of `flood_add` too and no
        longer to those of `flood_remove`; send each MAC of `macs_replace` to its VTEP; forget
        the MACs of `macs_remove`. Adding what is there or removing what is not is no error."""

        def work() -> None:
            index = self._index(vni)
            requests = [
                *(_FdbRequest(RTM_NEWNEIGH, NLM_F_APPEND, index, FLOOD_MAC, p) for p in flood_add),
                *(_FdbRequest(RTM_DELNEIGH, 0, index, FLOOD_MAC, p) for p in flood_remove),
                *(
                    _FdbRequest(RTM_NEWNEIGH, NLM_F_REPLACE, index, mac, peer)
                    for mac, peer in (macs_replace or {}).items()
                ),
                *(_FdbRequest(RTM_DELNEIGH, 0, index, mac, None) for mac in macs_remove),
            ]
            _send_all(requests)

        self._call(f"update the forwarding entries of {device_name(vni)}", work)

    def existing(self, names: Iterable[str]) -> set[str]:
        """Those of the links `names` the namespace has."""

        def work() -> set[str]:
            found = set()
            for name in names:
                try:
                    socket.if_nametoindex(name)
                except OSError:
                    continue
                found.add(name)
            return found

        return self._call("look up links", work)

    def remove(self, vni: int) -> bool:
        """Delete `vx<vni>` (its entries go with it); False when there is none."""

        def work() -> bool:
            try:
                self._ipr.link("del", ifname=device_name(vni))
            except NetlinkError as error:
                if error.code != errno.ENODEV:
                    raise
                return False
            return True

        return self._call(f"delete {device_name(vni)}", work)

    # ---- on the worker's thread -----------------------------------------------------------

    def _index(self, vni: int) -> int:
        try:
            return socket.if_nametoindex(device_name(vni))
        except OSError:
            raise HostError(f"{device_name(vni)} does not exist; set it up first") from None

    def _present(self) -> dict[int, VxlanDevice]:
        devices: dict[int, VxlanDevice] = {}
        for link in _vxlan_links():
            match = DEVICE.fullmatch(link.name)
            if match is None or link.vni != int(match[1]):
                continue
            devices[link.vni] = VxlanDevice(
                vni=link.vni,
                local=link.local,
                port=link.port,
                learning=link.learning,
                mtu=link.mtu,
                master=socket.if_indextoname(link.master) if link.master else None,
                up=link.up,
                forwarding=_forwarding(link.index),
            )
        return devices

    def _ensure(self, vni: int, local: str, bridge: str, mtu: int) -> None:
        name = device_name(vni)
        self._check_underlay(local, mtu)
        bridge_index = self._ipr.link_lookup(ifname=bridge)
        if not bridge_index:
            raise HostError(f"bridge {bridge} does not exist; cannot attach {name} to it")
        found = self._ipr.link_lookup(ifname=name)
        if found and not self._made_as_wanted(found[0], vni, local):
            self._ipr.link("del", index=found[0])
            found = []
        if not found:
            self._ipr.link(
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_id=vni,
                vxlan_local=local,
                vxlan_port=VXLAN_PORT,
                vxlan_learning=0,
            )
            found = self._ipr.link_lookup(ifname=name)
        bridge_link = self._ipr.get_links(bridge_index[0])[0]
        if bridge_link.get_attr("IFLA_MTU") != mtu:
            self._ipr.link("set", index=bridge_index[0], mtu=mtu)
        self._ipr.link("set", index=found[0], mtu=mtu, master=bridge_index[0], state="up")

    def _made_as_wanted(self, index: int, vni: int, local: str) -> bool:
        data = _vxlan_data(self._ipr.get_links(index)[0])
        return (
            data is not None
            and data.get_attr("IFLA_VXLAN_ID") == vni
            and data.get_attr("IFLA_VXLAN_LOCAL") == local
            and data.get_attr("IFLA_VXLAN_PORT") == VXLAN_PORT
            and not data.get_attr("IFLA_VXLAN_LEARNING")
        )

    def _check_underlay(self, local: str, mtu: int) -> None:
        """The VTEP address must be on a link of the namespace that carries `mtu` + 50."""
        holders = [a["index"] for a in self._ipr.get_addr(family=2, address=local)]
        if not holders:
            raise HostError(
                f"VTEP address {local} is on no link of the daemon's namespace; add it to the "
                "link facing the other hosts or give --vtep-address an address the host has"
            )
        underlay = self._ipr.get_links(holders[0])[0]
        fabric_mtu = underlay.get_attr("IFLA_MTU")
        if mtu + OVERHEAD > fabric_mtu:
            raise HostError(
                f"a network MTU of {mtu} needs {mtu + OVERHEAD} bytes on the link of VTEP "
                f"{local} ({underlay.get_attr('IFLA_IFNAME')}, MTU {fabric_mtu}); give the "
                f"network an MTU of at most {fabric_mtu - OVERHEAD} or raise the link's MTU"
            )

    def _call(self, what: str, work: Callable[..., T], *args: Any) -> T:
        try:
            return self._worker.run(work, *args)
        except NetlinkError as error:
            raise HostError(f"cannot {what}: {error.args[-1] if error.args else error}") from None
        except OSError as error:
            raise HostError(f"cannot {what}: {error.strerror or error}") from None


# ---- forwarding entries and VXLAN links, in netlink messages made and parsed here ----------
# pyroute2 costs ≈ 0.3 ms of CPU per message it makes or parses here: reading 100 entries every
# second would cost a host 3 % of a core, 1,000 of them 30 %, and writing them one request at a
# time as long. The messages below take a few µs each; the kernel itself keeps only VXLAN links
# and only the entries of one device in its dumps, and takes a batch of changes in one send.

NLMSG_DONE, NLMSG_ERROR = 3, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x400, 0x800
RTM_GETLINK, RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 18, 28, 29, 30
BATCH = 256  # requests per send: well within a netlink socket's buffers
IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_LINKINFO = 3, 4, 10, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING, IFLA_VXLAN_PORT = 1, 4, 7, 15
NDA_DST, NDA_LLADDR = 1, 2
IFINFOMSG = struct.Struct("BxHiII")  # family, type, index, flags, change
NDMSG = struct.Struct("BxxxiHBB")  # family, ifindex, state, flags, type
NLA_TYPE_MASK = 0x3FFF


@dataclass(frozen=True)
class _Link:
    index: int
    name: str
    mtu: int
    master: int
    up: bool
    vni: int
    local: str | None
    port: int
    learning: bool


def _attribute(kind: int, payload: bytes) -> bytes:
    attribute = struct.pack("HH", 4 + len(payload), kind) + payload
    return attribute + bytes(-len(attribute) % 4)


def _attributes(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("HH", data, offset)
        if length < 4:
            break
        found[kind & NLA_TYPE_MASK] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def _dump(kind: int, request: bytes) -> Iterator[bytes]:
    """The bodies of a netlink dump's messages, on a socket of the calling thread's
    namespace."""
    header = struct.pack("IHHII", 16 + len(request), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.send(header + request)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, message = struct.unpack_from("IH", data, offset)
                if message == NLMSG_DONE:
                    return
                if message == NLMSG_ERROR:
                    [code] = struct.unpack_from("i", data, offset + 16)
                    raise OSError(-code, os.strerror(-code))
                yield data[offset + 16 : offset + length]
                offset += (length + 3) & ~3


def _vxlan_links() -> Iterator[_Link]:
    kind_filter = _attribute(IFLA_LINKINFO, _attribute(IFLA_INFO_KIND, b"vxlan\0"))
    request = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + kind_filter
    for body in _dump(RTM_GETLINK, request):
        _, _, index, flags, _ = IFINFOMSG.unpack_from(body)
        attributes = _attributes(body[IFINFOMSG.size :])
        info = _attributes(attributes.get(IFLA_LINKINFO, b""))
        if info.get(IFLA_INFO_KIND, b"").rstrip(b"\0") != b"vxlan":
            continue  # a kernel that ignores the filter sends every link
        data = _attributes(info.get(IFLA_INFO_DATA, b""))
        local = data.get(IFLA_VXLAN_LOCAL)
        yield _Link(
            index=index,
            name=attributes[IFLA_IFNAME].rstrip(b"\0").decode(),
            mtu=struct.unpack("I", attributes[IFLA_MTU])[0],
            master=struct.unpack("I", attributes[IFLA_MASTER])[0]
            if IFLA_MASTER in attributes
            else 0,
            up=bool(flags & 1),
            vni=struct.unpack("I", data[IFLA_VXLAN_ID])[0],
            local=None if local is None else str(ipaddress.IPv4Address(local)),
            port=struct.unpack("!H", data[IFLA_VXLAN_PORT])[0],
            learning=bool(data.get(IFLA_VXLAN_LEARNING, b"\0")[0]),
        )


def _forwarding(index: int) -> Forwarding:
    """The device's own entries (those with a destination; the bridge's entries for it as a
    port have none)."""
    flood: set[str] = set()
    macs: dict[str, str] = {}
    # an ifinfomsg naming the port: what makes the kernel dump one device's entries
    request = IFINFOMSG.pack(socket.AF_BRIDGE, 0, index, 0, 0)
    for body in _dump(RTM_GETNEIGH, request):
        _, ifindex, _, flags, _ = NDMSG.unpack_from(body)
        attributes = _attributes(body[NDMSG.size :])
        dst, lladdr = attributes.get(NDA_DST), attributes.get(NDA_LLADDR)
        if ifindex != index or not flags & NTF_SELF or dst is None or lladdr is None:
            continue
        mac = lladdr.hex(":")
        if len(dst) != 4:
            continue  # an IPv6 VTEP: not roost's
        if mac == FLOOD_MAC:
            flood.add(str(ipaddress.IPv4Address(dst)))
        else:
            macs[mac] = str(ipaddress.IPv4Address(dst))
    return Forwarding(frozenset(flood), macs)


@dataclass(frozen=True)
class _FdbRequest:
    """One forwarding entry to write (`RTM_NEWNEIGH`, with append or replace) or delete."""

    kind: int
    flags: int
    index: int
    mac: str
    dst: str | None

    def message(self, sequence: int) -> bytes:
        body = NDMSG.pack(socket.AF_BRIDGE, self.index, STATIC, NTF_SELF, 0)
        body += _attribute(NDA_LLADDR, bytes.fromhex(self.mac.replace(":", "")))
        if self.dst is not None:
            body += _attribute(NDA_DST, ipaddress.IPv4Address(self.dst).packed)
        flags = NLM_F_REQUEST | NLM_F_ACK | self.flags
        if self.kind == RTM_NEWNEIGH:
            flags |= NLM_F_CREATE
        return struct.pack("IHHII", 16 + len(body), self.kind, flags, sequence, 0) + body

    def describe(self) -> str:
        verb = "delete" if self.kind == RTM_DELNEIGH else "write"
        return f"{verb} {self.mac}" + ("" if self.dst is None else f" -> {self.dst}")


def _send_all(requests: list[_FdbRequest]) -> None:
    """Make every request, `BATCH` to a send, and read each one's answer. A delete of what is
    not there is no error; any other failure is raised, naming its entry, once every answer of
    its batch has been read."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        for start in range(0, len(requests), BATCH):
            batch = requests[start : start + BATCH]
            sock.send(b"".join(r.message(sequence) for sequence, r in enumerate(batch, 1)))
            failed: tuple[_FdbRequest, int] | None = None
            answered = 0
            while answered < len(batch):
                data = sock.recv(1 << 16)
                offset = 0
                while offset + 16 <= len(data):
                    length, message, _, sequence = struct.unpack_from("IHHI", data, offset)
                    if message == NLMSG_ERROR:
                        answered += 1
                        [code] = struct.unpack_from("i", data, offset + 16)
                        request = batch[sequence - 1]
                        gone = request.kind == RTM_DELNEIGH and code == -errno.ENOENT
                        if code and not gone and failed is None:
                            failed = (request, -code)
                    offset += (length + 3) & ~3
            if failed is not None:
                request, code = failed
                raise OSError(code, f"{request.describe()}: {os.strerror(code)}")
