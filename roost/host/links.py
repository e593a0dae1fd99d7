"""Bridges through netlink (pyroute2), on the namespace's own thread; taps through ioctls.

A tap is made on the path of every boot, so it is made from the calling thread, inside the
namespace for the moment (`NetnsWorker.inside`), with the ioctls pyroute2 itself uses for one
(TUNSETIFF, TUNSETPERSIST) and the classic interface ioctls for its MAC, its bridge port and
its flags: a pyroute2 request costs ≈ 0.5 ms of CPU here, handing work to the namespace's
thread as much again, and the ioctls 0.1 ms in all.

A link is deleted from the calling thread too, with one netlink request of its own: the
kernel spends ≈ 17 ms deleting any netdev (RCU), and VMs removed together then wait for it side
by side instead of one after another on the namespace's thread.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFT_NO_PI, IFT_TAP, IFT_VNET_HDR, tuntap

from roost.errors import HostError
from roost.host.netns import NetnsWorker

IFNAMSIZ = 15
TUN_DEVICE = "/dev/net/tun"
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFHWADDR, SIOCGIFINDEX = 0x8913, 0x8914, 0x8924, 0x8933
SIOCSIFMTU = 0x8922
SIOCBRADDIF = 0x89A2
IFF_UP = 0x1
ARPHRD_ETHER = 1
RTM_DELLINK, NLMSG_ERROR, IFLA_IFNAME = 17, 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4


@dataclass(frozen=True)
class LinkInfo:
    name: str
    kind: str | None
    up: bool
    master: str | None
    mac: str


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def add_tap(name: str, owner: tuple[int, int] | None) -> None:
    """A persistent tap `name` (vnet_hdr, no packet info), or the stale one of that name that
    nothing holds open (EBUSY when something does); `owner` (uid, gid) may open it unprivileged
    (a jailed VMM)."""
    if tuntap.TUNSETIFF is None:
        raise HostError("pyroute2 knows no tun ioctls for this architecture")
    request = struct.pack("16sH", name.encode(), IFT_TAP | IFT_NO_PI | IFT_VNET_HDR)
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, tuntap.TUNSETIFF, request)
        fcntl.ioctl(fd, tuntap.TUNSETPERSIST, 1)
        if owner is not None:
            fcntl.ioctl(fd, tuntap.TUNSETOWNER, owner[0])
            fcntl.ioctl(fd, tuntap.TUNSETGROUP, owner[1])
    finally:
        os.close(fd)


def _ifreq(sock: socket.socket, request: int, name: str, value: bytes = b"") -> bytes:
    """An interface ioctl on `name`; the 24 bytes of the answer after the name."""
    answer = fcntl.ioctl(sock, request, struct.pack("16s24s", name.encode(), value))
    return answer[16:]


def _set_up_tap(name: str, mac: str, bridge: str, mtu: int | None = None) -> None:
    """Give tap `name` its MAC (and `mtu`, if given), make it a port of `bridge` and set it up
    (in the calling thread's namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _ifreq(
            sock,
            SIOCSIFHWADDR,
            name,
            struct.pack("H6s", ARPHRD_ETHER, bytes.fromhex(mac.replace(":", ""))),
        )
        if mtu is not None:
            _ifreq(sock, SIOCSIFMTU, name, struct.pack("i", mtu))
        [tap_index] = struct.unpack_from("i", _ifreq(sock, SIOCGIFINDEX, name))
        try:
            _ifreq(sock, SIOCBRADDIF, bridge, struct.pack("i", tap_index))
        except OSError as error:
            if error.errno != errno.ENODEV:
                raise
            raise HostError(f"bridge {bridge} does not exist; cannot attach tap {name}") from None
        [flags] = struct.unpack_from("H", _ifreq(sock, SIOCGIFFLAGS, name))
        _ifreq(sock, SIOCSIFFLAGS, name, struct.pack("H", flags | IFF_UP))


def delete_link(name: str) -> bool:
    """Delete link `name` of the calling thread's namespace (one RTM_DELLINK naming it, on a
    netlink socket of its own); False when there is none."""
    attribute = name.encode() + b"\0"
    attribute = struct.pack("HH", 4 + len(attribute), IFLA_IFNAME) + attribute
    attribute += bytes(-len(attribute) % 4)
    body = struct.pack("BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0) + attribute
    header = struct.pack("IHHII", 16 + len(body), RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.send(header + body)
        reply = sock.recv(4096)
    [kind] = struct.unpack_from("H", reply, 4)
    if kind != NLMSG_ERROR:
        raise OSError(errno.EPROTO, f"unexpected netlink reply of type {kind}")
    [code] = struct.unpack_from("i", reply, 16)
    if code == -errno.ENODEV:
        return False
    if code != 0:
        raise OSError(-code, os.strerror(-code))
    return True


class Links:
    """The links roost manages in its namespace. Every method runs on the worker's thread,
    so the netlink socket is only ever used by one thread."""

    def __init__(self, worker: NetnsWorker, tap_owner: tuple[int, int] | None = None) -> None:
        self._worker = worker
        self._tap_owner = tap_owner  # the (uid, gid) a jailed VMM's tap is owned by
        self._ipr: IPRoute = worker.run(IPRoute)

    def close(self) -> None:
        self._worker.run(self._ipr.close)

    def _index(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def _info(self, name: str) -> LinkInfo | None:
        index = self._index(name)
        if index is None:
            return None
        link = self._ipr.get_links(index)[0]
        master_index = link.get_attr("IFLA_MASTER")
        master = None
        if master_index:
            master = self._ipr.get_links(master_index)[0].get_attr("IFLA_IFNAME")
        return LinkInfo(
            name=name,
            kind=_kind(link),
            up=bool(link["flags"] & 1),
            master=master,
            mac=link.get_attr("IFLA_ADDRESS"),
        )

    def info(self, name: str) -> LinkInfo | None:
        return self._worker.run(self._info, name)

    def names(self, prefix: str) -> list[str]:
        def work() -> list[str]:
            names = (link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links())
            return sorted(name for name in names if name.startswith(prefix))

        return self._worker.run(work)

    def ensure_bridge(
        self,
        name: str,
        address: ipaddress.IPv4Interface | None,
        *,
        mtu: int | None = None,
        mac: str | None = None,
    ) -> None:
        """A bridge `name`, up, with `address` on it (created if missing; None: no address of
        its own), and the `mtu` and `mac` given (fixed: its ports' do not change them)."""

        def work() -> None:
            # created (the usual case, on a network's first VM) in four requests, not six
            try:
                self._ipr.link("add", ifname=name, kind="bridge", br_stp_state=0)
                created = True
            except NetlinkError as error:
                if error.code != errno.EEXIST:
                    raise
                created = False
            index = self._index(name)
            assert index is not None
            if not created and _kind(self._ipr.get_links(index)[0]) != "bridge":
                raise HostError(f"link {name} exists but is not a bridge; remove or rename it")
            have = set()
            if not created:
                have = {
                    (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                    for a in self._ipr.get_addr(index=index, family=2)
                }
            if address is not None and (str(address.ip), address.network.prefixlen) not in have:
                self._ipr.addr(
                    "add",
                    index=index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                )
            fixed: dict[str, Any] = {"mtu": mtu, "address": mac}
            self._ipr.link(
                "set",
                index=index,
                state="up",
                **{key: value for key, value in fixed.items() if value is not None},
            )

        self._call(f"set up bridge {name}", work)

    def create_tap(
        self, name: str, bridge: str, mac: str, *, owned: bool = False, mtu: int | None = None
    ) -> None:
        """A fresh tap `name` (vnet_hdr, no packet info), with its own `mac` (and `mtu`, if
        given), on `bridge`, up;
        `owned`: given to the jailer's uid and gid (a jailed VMM's tap: only those, or any
        jailed VMM could open another VM's tap). A stale tap of the same name (ours, from a
        crash) is replaced."""
        owner = self._tap_owner if owned else None
        if len(name.encode()) > IFNAMSIZ:
            raise HostError(f"tap name {name!r} is longer than {IFNAMSIZ} bytes")
        try:
            with self._worker.inside():
                try:
                    add_tap(name, owner)
                except OSError as error:
                    if error.errno != errno.EBUSY:
                        raise
                    self.delete(name)  # a stale tap of ours, from a crash, still held open
                    add_tap(name, owner)
                _set_up_tap(name, mac, bridge, mtu)
        except (OSError, HostError) as error:
            self.delete(name)
            if isinstance(error, HostError):
                raise
            raise HostError(f"cannot create tap {name}: {error.strerror or error}") from None

    def drop_address(self, name: str, address: ipaddress.IPv4Interface, mac: str) -> bool:
        """Take `address` off link `name` and give it MAC `mac` (replacing the one that went
        with the address); whether it had the address (a missing link had not)."""

        def work() -> bool:
            index = self._index(name)
            if index is None:
                return False
            have = {
                (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                for a in self._ipr.get_addr(index=index, family=2)
            }
            if (str(address.ip), address.network.prefixlen) not in have:
                return False
            self._ipr.addr(
                "del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
            )
            self._ipr.link("set", index=index, address=mac)
            return True

        return bool(self._call(f"take {address} off {name}", work))

    def delete(self, name: str) -> bool:
        """Remove link `name` if it exists; True when something was removed. From the calling
        thread, inside the namespace (see the module's docstring)."""
        try:
            with self._worker.inside():
                return delete_link(name)
        except OSError as error:
            raise HostError(f"cannot delete link {name}: {error.strerror or error}") from None

    def _call(self, what: str, work: Any) -> Any:
        try:
            return self._worker.run(work)
        except NetlinkError as error:
            raise HostError(f"cannot {what}: {error.args[-1] if error.args else error}") from None
        except OSError as error:
            raise HostError(f"cannot {what}: {error.strerror or error}") from None
