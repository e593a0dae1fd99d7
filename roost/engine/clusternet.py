"""This host's part in the cluster's networks (a cluster on PostgreSQL only): which host's
bridge carries each network's gateway address, and the overlay (`roost.engine.overlay`) kept as
the database says.

What the overlay wants is read in one query: every VM interface holding an address on a network
that has a VNI, with its guest's MAC and the VTEP of its VM's host, and each network's gateway
host with its bridge's MAC (`alloc.gateway_mac`). Agents hear of changes on channel
`roost_overlay`: migration 0015's triggers notify it in the transactions that change networks,
hosts or a VM's host; an agent that makes or removes a tap notifies it just after (its VM's
lease has committed, or is going), from its listener's connection, so no create's transaction
notifies (PostgreSQL lets transactions that notify commit only one at a time). A listener on
a connection of its own pokes the overlay at each notification and at each (re)connection, and
the overlay resyncs every second in any case.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from typing import Any

import psycopg
from sqlalchemy import CompoundSelect, func, null, select, union_all
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from roost.engine.overlay import Member, Overlay, Segment, segments
from roost.engine.settings import ClusterSettings
from roost.host.netns import NetnsWorker
from roost.host.vxlan import Vxlans
from roost.state import alloc
from roost.state.db import Database
from roost.state.models import VM, Host, IPLease, Network, VMNic

log = logging.getLogger("roost.engine")

CHANNEL = "roost_overlay"  # the channel migration 0015's triggers notify
LISTEN_TIMEOUT = 0.1  # seconds a listener waits for a notification before its other duties
RECONNECT_AFTER = 1.0  # seconds between a listener's failed connection and its next attempt

_GUESTS = (
    select(
        Network.vni,
        Network.bridge,
        Network.mtu,
        Host.vtep_address,
        func.coalesce(VMNic.user_mac, VMNic.mac).label("mac"),
    )
    .select_from(IPLease)
    .join(Network, Network.id == IPLease.network_id)
    .join(VM, VM.id == IPLease.vm_id)
    .join(Host, Host.id == VM.host_id)
    .join(VMNic, (VMNic.vm_id == IPLease.vm_id) & (VMNic.index == IPLease.interface))
    .where(Network.vni.is_not(None), IPLease.purpose == alloc.CURRENT)
)
_GATEWAYS = (
    select(
        Network.vni,
        Network.bridge,
        Network.mtu,
        Host.vtep_address,
        null().label("mac"),
    )
    .join(Host, Host.id == Network.gateway_host_id)
    .where(Network.vni.is_not(None))
)
_MEMBERS: CompoundSelect[Any] = union_all(_GUESTS, _GATEWAYS)


class ClusterNetworks:
    """This host (`cluster.host_name`, VTEP `cluster.vtep_address`) in the cluster's networks:
    `carried_here` decides where a network's gateway lives, `start` brings networks made before
    the cluster into it and starts the overlay and its listener, `stop` ends them."""

    def __init__(self, db: Database, cluster: ClusterSettings) -> None:
        self.db = db
        self.host_name = cluster.host_name
        self.vtep = cluster.vtep_address
        self.overlay: Overlay | None = None
        self.settle: Callable[[], None] | None = None
        self._vxlans: Vxlans | None = None
        self._listener: Listener | None = None

    def carried_here(self, bridge: str, session: Session | None = None) -> bool:
        """Whether this host's bridge `bridge` carries its network's gateway (claimed if no
        host does yet), in `session`'s transaction or one of its own."""
        if session is not None:
            return alloc.carries_gateway(session, bridge, self.host_name)
        return self.db.transact(lambda own: alloc.carries_gateway(own, bridge, self.host_name))

    def recorded_here(self, bridge: str) -> bool:
        """Whether a network on `bridge` exists and records this host as its gateway's."""
        with self.db.read() as session:
            return alloc.gateway_recorded(session, bridge, self.host_name)

    def spanned(self, bridges: Collection[str]) -> list[alloc.SpannedBridge]:
        """The cluster networks on `bridges` (this host's), with the host carrying each one's
        gateway."""
        with self.db.read() as session:
            return alloc.spanned_bridges(session, bridges)

    def members(self) -> list[Member]:
        """Every host's part in every cluster network, from one read."""
        with self.db.read() as session:
            rows = session.execute(_MEMBERS).all()
        return [
            Member(
                row.vni,
                row.bridge,
                row.mtu,
                row.vtep_address,
                alloc.gateway_mac(row.bridge) if row.mac is None else row.mac,
            )
            for row in rows
        ]

    def desired(self) -> list[Segment]:
        """What the overlay wants, once this host's bridges carry the gateways the database
        says they do (`settle`, set by the daemon: `HostNetwork.settle_gateways`)."""
        if self.settle is not None:
            self.settle()
        return segments(self.vtep, self.members())

    def start(self, worker: NetnsWorker) -> None:
        """Networks made before this database was a cluster's get a VNI; then the overlay
        runs, poked by the database's notifications."""
        spanned = self.db.transact(alloc.span_networks)
        if spanned:
            log.info("networks %s now span the cluster's hosts", ", ".join(spanned))
        self._vxlans = Vxlans(worker)
        self.overlay = Overlay(self._vxlans, self.vtep, self.desired)
        self.overlay.start()
        self._listener = Listener(self.db.url, self._resync)
        self._listener.start()

    def poke(self) -> None:
        """A bridge or tap was made or removed here (its VM's lease just committed or went):
        sync the overlay soon and tell the other agents to."""
        self._resync()
        if self._listener is not None:
            self._listener.announce()

    def _resync(self) -> None:
        if self.overlay is not None:
            self.overlay.poke()

    def stop(self) -> None:
        """The listener, then the overlay, then its netlink socket (before the namespace's
        worker closes). The devices stay: running VMs keep their network."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self.overlay is not None:
            self.overlay.stop()
            self.overlay = None
        if self._vxlans is not None:
            self._vxlans.close()
            self._vxlans = None


class Listener:
    """LISTEN `roost_overlay` on a connection of its own, from a thread: `notified()` at each
    notification, and at each (re)connection (what changed meanwhile was not heard); NOTIFY it
    after `announce()` (announcements made before the thread got to them count as one). A
    lost connection is logged once and made again every second."""

    def __init__(self, url: str, notified: Callable[[], None]) -> None:
        self._conninfo = make_url(url).set(drivername="postgresql").render_as_string(False)
        self._notified = notified
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False  # its connection was lost: logged once until it is back
        self._announce = threading.Event()

    def announce(self) -> None:
        """Tell every listener (this one too) to resync, soon, without waiting for it."""
        self._announce.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="roost-overlay-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except psycopg.Error as error:
                if not self._failing:
                    log.warning("overlay: lost LISTEN %s (reconnecting): %s", CHANNEL, error)
                self._failing = True
                self._stopping.wait(RECONNECT_AFTER)

    def _listen(self) -> None:
        with psycopg.connect(self._conninfo, autocommit=True) as connection:
            connection.execute(f"LISTEN {CHANNEL}")
            if self._failing:
                log.info("overlay: listening on %s again", CHANNEL)
                self._failing = False
            self._notified()  # what changed while no one listened
            while not self._stopping.is_set():
                if self._announce.is_set():
                    self._announce.clear()
                    connection.execute(f"NOTIFY {CHANNEL}")
                for _ in connection.notifies(timeout=LISTEN_TIMEOUT, stop_after=1):
                    self._notified()
