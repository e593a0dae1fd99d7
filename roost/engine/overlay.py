"""The overlay of cluster networks on this host: its `vx<vni>` devices and their forwarding
entries made to match what the database says (the OpenStack l2population pattern), resynced
when poked (the engine pokes it on a LISTEN/NOTIFY of a change) and every `interval` seconds.

`diff` is pure: what the host has against what is wanted gives the fewest changes, so a resync
with nothing changed costs only the reading of the devices.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from roost.errors import HostError
from roost.host.vxlan import FLOOD_MAC, VXLAN_PORT, Forwarding, VxlanDevice

log = logging.getLogger("roost.engine")


@dataclass(frozen=True)
class Segment:
    """A cluster network present on this host, as wanted: its VNI, its bridge here, its MTU,
    the VTEPs of the other hosts that carry it and where each of its remote guests' MACs is
    (MAC → VTEP)."""

    vni: int
    bridge: str
    mtu: int
    peers: frozenset[str]
    macs: Mapping[str, str]


@dataclass(frozen=True)
class FdbChange:
    """The forwarding entries of one device to add and remove."""

    vni: int
    flood_add: frozenset[str] = frozenset()
    flood_remove: frozenset[str] = frozenset()
    macs_replace: Mapping[str, str] = field(default_factory=dict)
    macs_remove: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Changes:
    """What a sync does: devices removed, devices made or corrected, then entries changed."""

    remove: tuple[int, ...] = ()
    ensure: tuple[Segment, ...] = ()
    fdb: tuple[FdbChange, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.remove or self.ensure or self.fdb)


class VxlanHost(Protocol):
    """The host's VXLAN devices (`roost.host.vxlan.Vxlans`)."""

    def present(self) -> dict[int, VxlanDevice]: ...

    def ensure(self, vni: int, local: str, bridge: str, mtu: int) -> None: ...

    def update(
        self,
        vni: int,
        *,
        flood_add: Iterable[str] = (),
        flood_remove: Iterable[str] = (),
        macs_replace: Mapping[str, str] | None = None,
        macs_remove: Iterable[str] = (),
    ) -> None: ...

    def remove(self, vni: int) -> bool: ...

    def existing(self, names: Iterable[str]) -> set[str]: ...


@dataclass(frozen=True)
class Member:
    """One host's part in a cluster network, as the database has it: a VM's NIC on it (`mac`:
    the guest's MAC, not its tap's) on the host of VTEP `vtep`, or, with `mac` None, the host
    whose bridge carries the network's gateway address."""

    vni: int
    bridge: str
    mtu: int
    vtep: str
    mac: str | None = None


def segments(local: str, members: Iterable[Member]) -> list[Segment]:
    """The segments this host (VTEP `local`) wants: one per cluster network it has a part in,
    flooding to every other host that has one and sending each remote guest's MAC to its
    host. A network with no part here is absent (its device goes)."""
    grouped: dict[int, list[Member]] = {}
    for member in members:
        grouped.setdefault(member.vni, []).append(member)
    wanted = []
    for vni, parts in sorted(grouped.items()):
        if not any(part.vtep == local for part in parts):
            continue
        wanted.append(
            Segment(
                vni,
                parts[0].bridge,
                parts[0].mtu,
                frozenset(part.vtep for part in parts) - {local},
                {p.mac.lower(): p.vtep for p in parts if p.mac is not None and p.vtep != local},
            )
        )
    return wanted


def wanted_forwarding(segment: Segment, local: str) -> Forwarding:
    """A segment's entries as the device should hold them: never this host's own VTEP, MACs
    in lower case, no entry for the all-zero MAC (that is the flood list's)."""
    macs = {mac.lower(): vtep for mac, vtep in segment.macs.items() if vtep != local}
    macs.pop(FLOOD_MAC, None)
    return Forwarding(frozenset(segment.peers - {local}), macs)


def _made_as_wanted(device: VxlanDevice, local: str) -> bool:
    """A device that can be kept (its entries with it); otherwise it is made again, empty."""
    return device.local == local and device.port == VXLAN_PORT and not device.learning


def diff(wanted: Iterable[Segment], present: Mapping[int, VxlanDevice], local: str) -> Changes:
    """The changes that make `present` (this host's devices) what `wanted` says."""
    segments = {segment.vni: segment for segment in wanted}
    ensure: list[Segment] = []
    fdb: list[FdbChange] = []
    for vni, segment in sorted(segments.items()):
        device = present.get(vni)
        have = Forwarding()
        if device is not None and _made_as_wanted(device, local):
            have = device.forwarding
            if (device.mtu, device.master, device.up) != (segment.mtu, segment.bridge, True):
                ensure.append(segment)
        else:
            ensure.append(segment)
        want = wanted_forwarding(segment, local)
        change = FdbChange(
            vni,
            flood_add=want.flood - have.flood,
            flood_remove=have.flood - want.flood,
            macs_replace={
                mac: vtep for mac, vtep in want.macs.items() if have.macs.get(mac) != vtep
            },
            macs_remove=frozenset(have.macs.keys() - want.macs.keys()),
        )
        if change != FdbChange(vni):
            fdb.append(change)
    remove = tuple(sorted(vni for vni in present if vni not in segments))
    return Changes(remove=remove, ensure=tuple(ensure), fdb=tuple(fdb))


class Overlay:
    """Keeps this host's VXLAN devices as `desired()` (the cluster networks present on this
    host, read from the database) says, from a thread of its own: at each `poke()` and at least
    every `interval` seconds. A failed round (database or netlink) is logged and tried again the
    next round."""

    def __init__(
        self,
        vxlans: VxlanHost,
        vtep: str,
        desired: Callable[[], Iterable[Segment]],
        interval: float = 1.0,
    ) -> None:
        self.vxlans = vxlans
        self.vtep = vtep
        self._desired = desired
        self.interval = interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: str | None = None  # the last round's error, logged once until it changes

    def sync(self) -> Changes:
        """One round: read what is wanted and what the host has, make only the difference. A
        network whose bridge this host lacks (none of its VMs has made it yet) is not wanted
        here. A device that cannot be set right does not keep the others from it: the first
        failure is raised once every device has had its turn."""
        wanted = list(self._desired())
        bridges = self.vxlans.existing({segment.bridge for segment in wanted})
        here = [segment for segment in wanted if segment.bridge in bridges]
        changes = diff(here, self.vxlans.present(), self.vtep)
        failures: list[HostError] = []
        for vni in changes.remove:
            with _collect(failures):
                self.vxlans.remove(vni)
                log.info("removed vx%d: this host has no part (or no bridge) in VNI %d", vni, vni)
        broken: set[int] = set()
        for segment in changes.ensure:
            with _collect(failures, broken, segment.vni):
                self.vxlans.ensure(segment.vni, self.vtep, segment.bridge, segment.mtu)
        for change in changes.fdb:
            if change.vni in broken:
                continue
            with _collect(failures):
                self.vxlans.update(
                    change.vni,
                    flood_add=change.flood_add,
                    flood_remove=change.flood_remove,
                    macs_replace=change.macs_replace,
                    macs_remove=change.macs_remove,
                )
        if failures:
            raise HostError("; ".join(str(failure) for failure in failures))
        return changes

    def poke(self) -> None:
        """Sync soon (something the overlay derives from changed)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="roost-overlay", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Sync until `stop()`: at once, then on each poke and every `interval` seconds."""
        while not self._stopping.is_set():
            self._wake.clear()
            self._round()
            self._wake.wait(self.interval)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _round(self) -> None:
        try:
            self.sync()
        except Exception as error:  # any failure is retried next round
            message = str(error) or type(error).__name__
            if message != self._failing:
                log.warning("cannot sync the overlay (retried every round): %s", message)
            self._failing = message
            return
        if self._failing is not None:
            log.info("the overlay is in sync again")
            self._failing = None


@contextmanager
def _collect(
    failures: list[HostError], broken: set[int] | None = None, vni: int = 0
) -> Iterator[None]:
    """A host failure of the block kept in `failures` (and its device in `broken`) instead of
    ending the round."""
    try:
        yield
    except HostError as error:
        failures.append(error)
        if broken is not None:
            broken.add(vni)
