"""What happens to VMs, plugins and networks, as events readers can follow (`GET /v1/events`).

Engine threads publish; publishing takes one short lock and hands each event to the event
loops of its readers without waiting for any of them, so a reader that reads slowly (or not at
all) never holds up a VM's own work. Each reader has a bounded queue: one that falls further
behind is taken back to the history of the last `HISTORY` events, and only a reader behind
even that is told `overflow` — events are never dropped silently.

Ids increase by one per event and start at the daemon's start time in microseconds, so ids
from an earlier daemon are always older than this one's history: a reader that resumes across
a restart is told `overflow`, never handed a silent gap. In a cluster the bus is
`roost.engine.clusterevents.SharedEventBus`: every agent's events, with the ids of the
database's table (from 1, so never within a single host's range).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, UOWTransaction

from roost.state.db import Database
from roost.state.models import Network

HISTORY = 1000  # events kept for readers that resume (Last-Event-ID)
QUEUE = 256  # events a reader may have waiting before it is taken back to the history
OVERFLOW = "overflow"
_NETWORK_CHANGES = "roost.network_changes"  # where a session keeps them until it commits


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    """One event: `data` is what readers get (`id`, `type`, `time` and its subject). An
    overflow has no id: it says events are missing, it is not one of them."""

    id: int | None
    type: str
    data: Mapping[str, Any]

    @property
    def vm(self) -> str | None:
        vm = self.data.get("vm")
        return vm if isinstance(vm, str) else None

    def sse(self) -> bytes:
        """The event as Server-Sent Events lines."""
        id_line = "" if self.id is None else f"id: {self.id}\n"
        return f"event: {self.type}\n{id_line}data: {json.dumps(self.data)}\n\n".encode()


class EventBus:
    """Events of one daemon: published from any thread, kept in a bounded history, and
    delivered to subscribers on their event loops."""

    def __init__(self, history: int = HISTORY, first_id: int | None = None) -> None:
        self._lock = threading.Lock()
        self._history: deque[Event] = deque(maxlen=history)
        self._last = (time.time_ns() // 1000 if first_id is None else first_id) - 1
        self._readers: dict[asyncio.AbstractEventLoop, set[Subscription]] = {}
        self._closed = False

    def publish(self, type_: str, **fields: Any) -> Event:
        """Record an event and hand it to every subscriber's loop (never waiting for one)."""
        with self._lock:
            event_id = self._last + 1
            event = Event(
                event_id, type_, {"id": event_id, "type": type_, "time": _now(), **fields}
            )
            self._keep(event)
        return event

    def _keep(self, event: Event) -> None:
        """Add `event` (the next id) to the history and hand it to every subscriber's loop;
        the lock is held, so that each loop gets the events in the order of their ids."""
        assert event.id is not None
        self._last = event.id
        self._history.append(event)
        for loop, readers in list(self._readers.items()):
            try:
                loop.call_soon_threadsafe(_deliver, tuple(readers), event)
            except RuntimeError:  # the loop is closed: its readers are gone with it
                del self._readers[loop]

    def vm_status(self, row: Mapping[str, Any]) -> Event:
        """`vm.status` from a VM's record as just written."""
        return self.publish(
            "vm.status",
            vm=row["name"],
            status=row["status"],
            status_reason=row["status_reason"],
            exit_code=row["exit_code"],
        )

    def subscribe(self, after: int | None = None, vm: str | None = None) -> Subscription:
        """A subscription on the running loop: events from now on, or (`after`) those after
        that id first, from the history. `vm` keeps only the events of that VM."""
        loop = asyncio.get_running_loop()
        with self._lock:
            start = self._last if after is None else after
            reader = Subscription(self, loop, start, vm, behind=start != self._last)
            if self._closed:
                reader.closed = True
            else:
                self._readers.setdefault(loop, set()).add(reader)
        return reader

    def close(self) -> None:
        """End every subscription (their streams end too): a daemon that stops must not wait
        for readers that never leave on their own."""
        with self._lock:
            self._closed = True
            readers, self._readers = self._readers, {}
        for loop, subscriptions in readers.items():
            for reader in subscriptions:
                try:
                    loop.call_soon_threadsafe(reader.end)
                except RuntimeError:
                    continue

    def _leave(self, reader: Subscription) -> None:
        with self._lock:
            readers = self._readers.get(reader.loop)
            if readers is not None:
                readers.discard(reader)
                if not readers:
                    del self._readers[reader.loop]

    def _since(self, after: int) -> tuple[list[Event], int, bool]:
        """The history's events after id `after`, the last id, and whether events after
        `after` are missing (older than the history, or from another daemon)."""
        with self._lock:
            oldest = self._history[0].id if self._history else self._last + 1
            assert oldest is not None
            missing = not oldest - 1 <= after <= self._last
            events = [e for e in self._history if missing or (e.id is not None and e.id > after)]
            return events, self._last, missing


def _deliver(readers: tuple[Subscription, ...], event: Event) -> None:
    for reader in readers:
        reader.offer(event)


class Subscription:
    """One reader's events, in order. Lives on one event loop: `offer` and `next` run there.
    While `behind`, it has lost events from its queue and takes them from the history next."""

    def __init__(
        self,
        bus: EventBus,
        loop: asyncio.AbstractEventLoop,
        after: int,
        vm: str | None,
        *,
        behind: bool,
    ) -> None:
        self.bus = bus
        self.loop = loop
        self.vm = vm
        self.closed = False
        self._queue: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._taken = after  # the last id the reader has had (or skipped, by its filter)
        self._queued = after  # the last id offered to the queue
        self.behind = behind

    def offer(self, event: Event) -> None:
        assert event.id is not None
        if self.closed or self.behind or event.id <= self._queued:
            return  # ended; to be read from the history; or read from it already
        self._queued = event.id
        if self.vm is not None and event.vm != self.vm:
            return
        if len(self._queue) >= QUEUE:
            self.behind = True
            self._queue.clear()
        else:
            self._queue.append(event)
        self._ready.set()

    def end(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self, timeout: float) -> list[Event] | None:
        """The events since the last call (an overflow first where some are missing); an
        empty list after `timeout` seconds without any; None once the bus has closed."""
        if not self.behind and not self._queue and not self.closed:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return []
        if self.closed:
            return None
        events = self._catch_up() if self.behind else []
        events += self._queue
        self._queue.clear()
        self._taken = self._queued
        return events

    def _catch_up(self) -> list[Event]:
        events, last, missing = self.bus._since(self._taken)
        self.behind = False
        self._queued = last
        kept = [e for e in events if self.vm is None or e.vm == self.vm]
        if not missing:
            return kept
        resumes = events[0].id if events else last + 1
        lost = {"type": OVERFLOW, "time": _now(), "after": self._taken, "resumes_at": resumes}
        return [Event(None, OVERFLOW, lost), *kept]

    def close(self) -> None:
        """The reader has gone."""
        self.closed = True
        self.bus._leave(self)


def follow_networks(db: Database, bus: EventBus) -> None:
    """`network.created` and `network.removed` for each network a write transaction adds or
    deletes, once it has committed: allocation makes and drops networks inside the
    transactions of creates, starts, patches and removes (and retries them), so these are
    told by the transactions themselves."""

    def flushed(session: Session, _: UOWTransaction) -> None:
        changes = session.info.setdefault(_NETWORK_CHANGES, [])
        changes += [("network.created", o.name) for o in session.new if isinstance(o, Network)]
        changes += [("network.removed", o.name) for o in session.deleted if isinstance(o, Network)]

    def committed(session: Session) -> None:
        for type_, name in session.info.pop(_NETWORK_CHANGES, []):
            bus.publish(type_, network=name)

    def rolled_back(session: Session) -> None:
        session.info.pop(_NETWORK_CHANGES, None)

    db.on_write_sessions("after_flush", flushed)
    db.on_write_sessions("after_commit", committed)
    db.on_write_sessions("after_rollback", rolled_back)
