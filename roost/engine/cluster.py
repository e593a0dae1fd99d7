"""An agent's membership in a cluster on PostgreSQL, and the cluster's one reconciler.

`Member`: at start the agent registers (a new epoch, event `host.joined`), then beats every
`heartbeat_interval` with that epoch. A beat that matches no row means the cluster fenced it
(it was silent past `--lost-after`, its VMs were declared `lost` and their addresses given
back): it stops taking changes (503 `fenced`), ends by PID the VMMs of its VMs marked `lost`
(their addresses may be another VM's by now) without touching their records, and registers
again. Until a beat has confirmed its membership within `--offline-after` (a frozen agent that
wakes up, a database it cannot reach) it takes no changes either.

`Reconciler`: every agent runs one, and one at a time works, the holder of a session-level
advisory lock on a connection of its own. That session has `idle_session_timeout`: a holder
frozen (or cut off) stops talking and the database ends its session, which frees the lock for
the next agent that tries; the holder's sweeps run on that same connection, so a holder whose
session has ended cannot act. Each sweep judges every host's heartbeat by the database's clock:
older than `--offline-after`, `host.offline` (once per outage) and `vm.status` `unknown` for
its VMs; older than `--lost-after`, in one transaction its VMs `lost` with their addresses
released and the host fenced (`host.fenced`, `vm.status` `lost`); fresh again after an outage,
`host.joined`. `unknown` is never stored: VMs are shown so as they are read
(`roost.engine.views.with_host_status`), from the late hosts each heartbeat reads.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, make_url, select, text
from sqlalchemy.pool import NullPool

from roost.engine.core import Engine as VMEngine
from roost.engine.events import EventBus
from roost.engine.recovery import live_vmms
from roost.engine.settings import ClusterSettings, Settings
from roost.engine.views import UNKNOWN
from roost.errors import RoostError, UnavailableError
from roost.host.cni import CONF_SUFFIXES
from roost.state import outages
from roost.state.db import Database
from roost.state.hosts import HostRegistration, Hosts, Membership
from roost.state.models import Host, Network
from roost.state.outages import Heartbeat
from roost.vmm.base import Driver

log = logging.getLogger("roost.cluster")

# the reconciler's advisory lock, one per database ("roost_r" in ASCII)
RECONCILER_LOCK = 0x726F6F73745F72
# heartbeat intervals a reconciler's session may stay silent before the database ends it
SILENT_INTERVALS = 3


def agent_url(url: str, cluster: ClusterSettings) -> str:
    """`url` with the agent's sessions ending any transaction left idle for `--offline-after`:
    rows a frozen agent locked (its host's, another host's capacity, a VM's) are freed once
    its peers take it for offline, so they never hold up the reconciler's fence or a peer's
    heartbeat."""
    parsed = make_url(url)
    given = parsed.query.get("options")
    # `--name=value`, without a space: libpq reads the URL too (LISTEN's own connection)
    timeout = f"--idle_in_transaction_session_timeout={int(cluster.offline_after * 1000)}"
    options = f"{given} {timeout}" if isinstance(given, str) else timeout
    return parsed.update_query_dict({"options": options}).render_as_string(hide_password=False)


def host_facts(settings: Settings, drivers: Mapping[str, Driver], db: Database) -> dict[str, Any]:
    """What placement asks of a host: the VMMs whose binaries this agent found, the vsock
    device kinds they give guests, its external networks and its CNI conflists' names."""
    usable = {}
    for kind, driver in sorted(drivers.items()):
        try:
            driver.check_available()
        except RoostError:
            continue
        usable[kind] = driver
    vsock = {
        str(driver.vsock_backend())
        for driver in usable.values()
        if driver.vsock_unavailable() is None
    }
    assert settings.cluster is not None
    own = select(Host.id).where(Host.name == settings.cluster.host_name).scalar_subquery()
    with db.read() as session:
        external = session.scalars(
            select(Network.name)
            .where(Network.kind == "external")
            .where(Network.host_id.is_(None) | (Network.host_id == own))
            .order_by(Network.name)
        ).all()
    return {
        "vmms": sorted(usable),
        "vsock": sorted(vsock),
        "external_networks": list(external),
        "cni_networks": _conflist_names(settings),
    }


def _conflist_names(settings: Settings) -> list[str]:
    """The `name` of each conflist in the CNI conf dir (files that do not parse are skipped:
    a create naming them is refused with the reason)."""
    names = set()
    directory = settings.cni_conf_dir
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if path.suffix not in CONF_SUFFIXES:
            continue
        try:
            name = json.loads(path.read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str):
            names.add(name)
    return sorted(names)


def registration(settings: Settings, facts: dict[str, Any]) -> HostRegistration:
    cluster = _cluster(settings)
    return HostRegistration(
        name=cluster.host_name,
        vtep_address=cluster.vtep_address,
        api=cluster.advertise_api,
        labels=dict(cluster.labels),
        capacity_vcpus=cluster.capacity_vcpus,
        capacity_memory_mib=cluster.capacity_memory_mib,
        facts=facts,
    )


def _cluster(settings: Settings) -> ClusterSettings:
    assert settings.cluster is not None, "cluster mode only"
    return settings.cluster


class Member:
    """This agent's place in the cluster: registration, heartbeats, and what it does once
    fenced. `beat` is one heartbeat (the thread calls it every interval)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        engine: VMEngine,
        facts: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.cluster = _cluster(settings)
        self.db = db
        self.hosts = Hosts(db)
        self.engine = engine
        self.facts = facts
        self.clock = clock
        self.membership: Membership | None = None
        self.fenced = False
        self.offline: frozenset[int] = frozenset()  # the hosts late at the last heartbeat
        self._confirmed = float("-inf")  # when a beat last matched this agent's row
        self._registered: dict[str, Any] = {}  # the facts its row holds
        self._failing = False

    # ---- what the API asks ----------------------------------------------------------------

    def refusal(self) -> RoostError | None:
        """Why this agent must take no change now (None: it may): fenced, or not confirmed in
        the cluster within `--offline-after` (peers may be taking it for offline). Cheap: asked
        on the event loop for every request that would change something."""
        name = self.cluster.host_name
        if self.fenced:
            return _fenced(
                f"host {name} was fenced: the cluster took it for lost while it was silent, and "
                "it is ending its lost VMs' VMMs before it joins again; try again in a moment"
            )
        silent = self.clock() - self._confirmed
        if silent > self.cluster.offline_after:
            return _fenced(
                f"host {name} has not confirmed its membership for {silent:.0f} s (its "
                "heartbeat does not reach the database, or the agent was stopped), so its "
                "peers may take it for offline; it takes changes again once a heartbeat passes"
            )
        return None

    def offline_hosts(self) -> frozenset[int]:
        """The hosts whose heartbeat was late at this agent's last heartbeat."""
        return self.offline

    # ---- registration and heartbeats ------------------------------------------------------

    def join(self) -> Membership:
        """Register (a new epoch) and end the VMMs of this host's VMs marked lost."""
        facts = self.facts()
        membership = self.hosts.register(registration(self.settings, facts))
        self.membership, self._registered = membership, facts
        self._confirmed = self.clock()
        self.end_lost()
        self.fenced = False
        log.info(
            "host %s joined the cluster (host id %d, epoch %d)",
            self.cluster.host_name,
            membership.host_id,
            membership.epoch,
        )
        self.engine.events.publish(
            "host.joined", host=self.cluster.host_name, epoch=membership.epoch
        )
        return membership

    def beat(self) -> None:
        """One heartbeat. A fenced agent (now, or still after a failed attempt) first ends its
        lost VMs' VMMs, then registers again (so no placement finds it before it has). A
        database error is logged (once until a beat passes again) and left to the next beat."""
        try:
            if self.membership is not None and not self.fenced:
                if self.hosts.heartbeat(self.membership):
                    self._confirmed = self.clock()
                    with self.db.read() as session:
                        connection = session.connection()
                        self.offline = outages.offline_hosts(connection, self.cluster.offline_after)
                    self._refresh_facts(self.membership)
                else:
                    self.fenced = True
                    log.warning(
                        "host %s was fenced (epoch %d is no longer its own): it takes no "
                        "changes, ends the VMMs of its VMs marked lost and joins again",
                        self.cluster.host_name,
                        self.membership.epoch,
                    )
            if self.fenced:
                self.end_lost()
            if self.membership is None or self.fenced:
                self.join()
        except Exception as error:
            if not self._failing:
                log.error("host %s: heartbeat failed, retrying: %s", self.cluster.host_name, error)
            self._failing = True
        else:
            if self._failing:
                log.info("host %s: heartbeats pass again", self.cluster.host_name)
            self._failing = False

    def _refresh_facts(self, membership: Membership) -> None:
        """Placement reads what this host has from its row: keep it current (an external
        network or a conflist added since it joined)."""
        facts = self.facts()
        if facts != self._registered:
            self.db.transact_core(
                lambda connection: outages.set_facts(
                    connection, membership.host_id, membership.epoch, facts
                )
            )
            self._registered = facts
            log.info("host %s: its facts are now %s", self.cluster.host_name, facts)

    def end_lost(self) -> list[str]:
        """End, by PID, the VMM of each of this host's VMs the cluster marked lost, and remove
        what it held on this host (taps, rules, sockets, CNI attachments); their records stay
        as the cluster wrote them. A VMM this agent runs for a VM no longer recorded as this
        host's (a lost VM removed through another agent meanwhile) is ended too, with its run
        dir and disk. The names of those whose VMM ran."""
        assert self.membership is not None
        with self.db.read() as session:
            lost = outages.lost_vms(session.connection(), self.membership.host_id)
        removed = set(self.engine.live) - self.engine.records.names()
        gone = [name for name in sorted(removed) if self.engine.abandon(name)]
        for name in gone:
            self.engine.run_dir(name).remove()
            self.engine.disks.remove(name)
            log.warning("VM %s: ended its VMM, as the VM was removed while lost", name)
        if not lost:
            return gone
        ended = [name for name in lost if self.engine.abandon(name)]
        wanted = set(lost) - set(ended)
        settings = self.engine.settings
        for found in live_vmms(settings.run_dir, settings.chroot):
            if found.name in wanted:
                found.end()
                self.engine.release_host(found.name)
                ended.append(found.name)
        for name in sorted(ended):
            log.warning(
                "VM %s: ended its VMM, as the cluster declared the VM lost (its addresses may "
                "be another VM's by now)",
                name,
            )
        return sorted([*gone, *ended])


def _fenced(message: str) -> UnavailableError:
    return UnavailableError(message, code="fenced", retry_after=1.0)


class Decision(StrEnum):
    OFFLINE = "offline"  # note the outage: host.offline, vm.status unknown
    LOSE = "lose"  # fence it and lose its VMs
    BACK = "back"  # host.joined after an outage


def decide(
    beat: Heartbeat,
    offline_after: float,
    lost_after: float,
    noted: set[int],
    fenced: set[tuple[int, int]],
) -> list[Decision]:
    """What a sweep does about one host, in order. `noted` holds the hosts this reconciler
    wrote `host.offline` for (a heartbeat clears `offline_noted`); `fenced`, (host id, epoch)
    of the hosts it fenced that have not registered since."""
    if beat.age < offline_after:
        return [Decision.BACK] if beat.offline_noted or beat.id in noted else []
    decisions = [] if beat.offline_noted else [Decision.OFFLINE]
    if beat.age >= lost_after and (beat.holding > 0 or (beat.id, beat.epoch) not in fenced):
        decisions.append(Decision.LOSE)
    return decisions


class Reconciler:
    """The cluster's reconciler on this agent: takes the lock when it is free, and sweeps
    while it holds it (`attempt`, one interval's work, called by `Cluster`'s thread)."""

    def __init__(self, url: str, cluster: ClusterSettings, events: EventBus) -> None:
        self.cluster = cluster
        self.events = events
        self.interval = cluster.heartbeat_interval
        silent_ms = int(SILENT_INTERVALS * self.interval * 1000)
        keepalive = max(1, int(self.interval))
        self._engine: Engine = create_engine(
            url,
            poolclass=NullPool,
            isolation_level="READ COMMITTED",
            connect_args={
                "application_name": f"roost-reconciler {cluster.host_name}",
                # a silent holder's session ends, and the lock with it; so does a transaction
                # it left open; a sweep never waits long on a row a frozen agent holds
                "options": (
                    f"-c idle_session_timeout={silent_ms} "
                    f"-c idle_in_transaction_session_timeout={silent_ms} "
                    f"-c lock_timeout={silent_ms}"
                ),
                # over TCP, a peer that vanished is noticed (libpq ignores them on Unix sockets)
                "keepalives": 1,
                "keepalives_idle": keepalive,
                "keepalives_interval": keepalive,
                "keepalives_count": SILENT_INTERVALS,
            },
        )
        self._connection: Connection | None = None
        self.holding = False
        self._noted: set[int] = set()
        self._fenced: set[tuple[int, int]] = set()
        self._failing = False

    def attempt(self) -> bool:
        """Take the lock if it is free, then sweep while held; whether this agent holds it.
        A sweep that failed while its session lives (a row a frozen agent holds past
        `lock_timeout`) keeps the lock and sweeps again next time; an ended session (the lock
        is gone with it) drops the connection, and the next attempt starts afresh."""
        try:
            if self._connection is None:
                self._connection = self._engine.connect()
            if not self.holding:
                with self._connection.begin():
                    taken = self._connection.execute(
                        text("SELECT pg_try_advisory_lock(:key)"), {"key": RECONCILER_LOCK}
                    ).scalar()
                if not taken:
                    return False
                self.holding = True
                log.info("host %s is the cluster's reconciler", self.cluster.host_name)
                self.sweep(first=True)
            else:
                self.sweep()
        except Exception as error:
            if self.holding and self._alive():
                log.warning("host %s: a reconciler sweep failed: %s", self.cluster.host_name, error)
                return True
            self._drop(error)
            return False
        self._failing = False
        return True

    def _alive(self) -> bool:
        """Whether the lock's session still answers (so it still holds the lock)."""
        connection = self._connection
        if connection is None or connection.invalidated:
            return False
        try:
            with connection.begin():
                connection.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    def _drop(self, error: Exception) -> None:
        if self.holding:
            log.warning(
                "host %s is no longer the cluster's reconciler (its session failed: %s)",
                self.cluster.host_name,
                error,
            )
        elif not self._failing:
            log.warning(
                "host %s: the reconciler's database session failed (it connects again): %s",
                self.cluster.host_name,
                error,
            )
        self._failing = not self.holding
        self.holding = False
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.invalidate()
                connection.close()
            except Exception:
                log.debug("closing the reconciler's failed connection", exc_info=True)

    def sweep(self, *, first: bool = False) -> None:
        """One interval's work (on the lock's own connection, so only while it is held)."""
        connection = self._connection
        assert connection is not None
        cluster = self.cluster
        with connection.begin():
            beats = outages.heartbeats(connection)
        if first:  # what an earlier holder fenced is not known: a dead host is fenced once more
            self._noted = {beat.id for beat in beats if beat.offline_noted}
            self._fenced = set()
        for beat in beats:
            decisions = decide(
                beat, cluster.offline_after, cluster.lost_after, self._noted, self._fenced
            )
            for decision in decisions:
                with connection.begin():
                    events = self._act(connection, beat, decision)
                # once committed: an event for a write that failed would tell what never was
                for type_, fields in events:
                    self.events.publish(type_, **fields)

    def _act(
        self, connection: Connection, beat: Heartbeat, decision: Decision
    ) -> list[tuple[str, dict[str, Any]]]:
        """Write one decision in the caller's transaction; the events it makes."""
        cluster, name = self.cluster, beat.name
        if decision is Decision.OFFLINE:
            vms = outages.note_offline(connection, beat.id, cluster.offline_after)
            if vms is None:
                return []
            self._noted.add(beat.id)
            reason = f"its host {name} is offline (no heartbeat for {beat.age:.0f} s)"
            log.warning("host %s is offline (no heartbeat for %.1f s)", name, beat.age)
            return [
                ("host.offline", {"host": name, "epoch": beat.epoch}),
                *(("vm.status", _status(vm, UNKNOWN, reason)) for vm in vms),
            ]
        if decision is Decision.LOSE:
            reason = (
                f"its host {name} was offline for longer than {cluster.lost_after:g} s: its "
                "addresses were released; remove it (its name and MACs are kept until then)"
            )
            lost = outages.lose_host(connection, beat.id, beat.epoch, cluster.lost_after, reason)
            if lost is None:
                return []
            self._fenced.add((beat.id, lost.epoch))
            log.warning(
                "host %s fenced (epoch %d) after %.1f s without a heartbeat; VMs lost: %s; "
                "gateways freed for another host: %s",
                name,
                lost.epoch,
                beat.age,
                ", ".join(lost.vms) or "none",
                ", ".join(lost.gateways) or "none",
            )
            return [
                ("host.fenced", {"host": name, "epoch": lost.epoch}),
                *(("vm.status", _status(vm, outages.LOST, reason)) for vm in lost.vms),
            ]
        if not outages.note_back(connection, beat.id, cluster.offline_after):
            return []
        self._noted.discard(beat.id)
        log.info("host %s is back (epoch %d)", name, beat.epoch)
        return [("host.joined", {"host": name, "epoch": beat.epoch})]

    def close(self) -> None:
        """Let the lock go (the session ends) and close the connection."""
        connection, self._connection = self._connection, None
        self.holding = False
        if connection is not None:
            try:
                connection.close()
            except Exception:
                log.debug("closing the reconciler's connection", exc_info=True)
        self._engine.dispose()


def _status(vm: str, status: str, reason: str) -> dict[str, Any]:
    return {"vm": vm, "status": status, "status_reason": reason, "exit_code": None}


@dataclass
class Cluster:
    """This agent's member and reconciler, each on a thread of its own and on connections of
    its own (a heartbeat never waits behind the API's requests for a pooled connection)."""

    member: Member
    reconciler: Reconciler
    db: Database
    _stop: threading.Event
    _threads: list[threading.Thread]

    @classmethod
    def open(cls, settings: Settings, engine: VMEngine) -> Cluster:
        """Register this agent and end its lost VMs' VMMs (before recovery looks at what
        runs); `start` then begins the heartbeats and the reconciler."""
        cluster = _cluster(settings)
        assert settings.database_url is not None
        db = Database(agent_url(settings.database_url, cluster))
        try:
            member = Member(
                settings,
                db,
                engine,
                lambda: host_facts(settings, engine.drivers, engine.db),
            )
            member.join()
            engine.offline_hosts = member.offline_hosts
            reconciler = Reconciler(settings.database_url, cluster, engine.events)
        except BaseException:
            db.dispose()
            raise
        return cls(member, reconciler, db, threading.Event(), [])

    def start(self) -> None:
        """The heartbeat and reconciler threads, each working every heartbeat interval."""
        interval = self.member.cluster.heartbeat_interval
        for name, work in (("heartbeat", self.member.beat), ("reconciler", self._reconcile)):
            thread = threading.Thread(
                target=self._every, args=(interval, work), name=f"roost-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _reconcile(self) -> None:
        self.reconciler.attempt()

    def _every(self, interval: float, work: Callable[[], object]) -> None:
        while not self._stop.wait(interval):
            work()

    def refusal(self) -> RoostError | None:
        return self.member.refusal()

    def close(self) -> None:
        """Stop both threads, let the reconciler's lock go, close the connections."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.reconciler.close()
        self.db.dispose()
