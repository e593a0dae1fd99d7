"""VXLAN devices and their forwarding entries, through netlink (pyroute2) on the namespace's own
thread: the host side of a cluster network that spans hosts.

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
import re
from collections.abc import Callable, Iterable, Mapping
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


def _vxlan_data(link: Any) -> Any:
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
            for peer in flood_add:
                self._ipr.fdb("append", ifindex=index, lladdr=FLOOD_MAC, dst=peer)
            for peer in flood_remove:
                _absent_ok(self._ipr.fdb, "del", ifindex=index, lladdr=FLOOD_MAC, dst=peer)
            for mac, peer in (macs_replace or {}).items():
                self._ipr.fdb(
                    "replace", ifindex=index, lladdr=mac, dst=peer, state=STATIC, flags=NTF_SELF
                )
            for mac in macs_remove:
                _absent_ok(self._ipr.fdb, "del", ifindex=index, lladdr=mac)

        self._call(f"update the forwarding entries of {device_name(vni)}", work)

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
        found = self._ipr.link_lookup(ifname=device_name(vni))
        if not found:
            raise HostError(f"{device_name(vni)} does not exist; set it up first")
        return int(found[0])

    def _present(self) -> dict[int, VxlanDevice]:
        links = list(self._ipr.get_links())
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        devices: dict[int, VxlanDevice] = {}
        for link in links:
            match = DEVICE.fullmatch(names[link["index"]])
            data = _vxlan_data(link)
            if match is None or data is None or data.get_attr("IFLA_VXLAN_ID") != int(match[1]):
                continue
            devices[int(match[1])] = VxlanDevice(
                vni=int(match[1]),
                local=data.get_attr("IFLA_VXLAN_LOCAL"),
                port=data.get_attr("IFLA_VXLAN_PORT"),
                learning=bool(data.get_attr("IFLA_VXLAN_LEARNING")),
                mtu=link.get_attr("IFLA_MTU"),
                master=names.get(link.get_attr("IFLA_MASTER") or 0),
                up=bool(link["flags"] & 1),
                forwarding=self._forwarding(link["index"]),
            )
        return devices

    def _forwarding(self, index: int) -> Forwarding:
        flood: set[str] = set()
        macs: dict[str, str] = {}
        for entry in self._ipr.fdb("dump", ifindex=index):
            mac, dst = entry.get_attr("NDA_LLADDR"), entry.get_attr("NDA_DST")
            if not entry["flags"] & NTF_SELF or dst is None:
                continue  # the bridge's own entries for the port, not the device's
            if mac == FLOOD_MAC:
                flood.add(dst)
            else:
                macs[mac.lower()] = dst
        return Forwarding(frozenset(flood), macs)

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


def _absent_ok(fdb: Callable[..., Any], command: str, **entry: Any) -> None:
    """An FDB request whose entry may be gone already."""
    try:
        fdb(command, **entry)
    except NetlinkError as error:
        if error.code != errno.ENOENT:
            raise
