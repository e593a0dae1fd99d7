"""A cluster's events (PostgreSQL): every agent's readers see every agent's events, in one
order, with the ids of table `events`.

Publishing never waits for the database: an event is queued, and a writer thread inserts
what is queued in one transaction under an advisory lock that every agent's writer takes, then
NOTIFY `roost_events`. Ids are drawn under that lock and the lock is let go only once the
commit is visible, so ids become visible in the order of their values: a tailer that has seen
id 8 can never later find a 7 (ids of a transaction that failed are skipped for good). A
failed insert is logged and the event dropped: telling it never fails what it tells of. An
agent frozen while it holds the lock holds up the others' writers (not their operations) only
until its session's `idle_in_transaction_session_timeout` (`--offline-after`) ends it.

Each agent's bus tails the table on a connection of its own: LISTEN `roost_events`, and on
each notification (or every `POLL` seconds, in case one was missed, and at each reconnection)
reads the rows after the last id it has, in id order, into its history and to its readers.
Its own events reach its readers that way too. The history is the table's last `KEEP` events,
loaded when the agent starts: a reader resumes (`Last-Event-ID`) across an agent's restart and
from any agent. The writer whose batch passes a multiple of `PRUNE_EVERY` deletes the rows
older than the last `KEEP` (one agent at a time, by the ids it wrote).

Ids never pass for a single host's: those start at a daemon's start time in microseconds
(about 1.7e15 and growing), the table's at 1, so an id of either kind given to the other is
out of its history's range and the reader is told `overflow`, never handed a silent gap.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import Connection, delete, func, insert, select, text
from sqlalchemy.engine import make_url

from roost.engine.events import Event, EventBus
from roost.state.db import Database
from roost.state.models import StoredEvent

log = logging.getLogger("roost.events")

CHANNEL = "roost_events"
# the writers' advisory lock, one per database ("roost_ev" in ASCII)
WRITE_LOCK = 0x726F6F73745F6576
KEEP = 10_000  # events kept in the table, and in each agent's history
PRUNE_EVERY = 1_000  # ids between two prunes
POLL = 1.0  # seconds between reads without a notification
BATCH = 1_000  # rows per insert and per read
PENDING = 10_000  # events waiting for the writer before new ones are dropped
RECONNECT_AFTER = 1.0  # seconds between a tailer's failed connection and its next attempt
STOP_WITHIN = 10.0  # seconds the writer may take to write what is queued when the agent stops

_ROWS = select(
    StoredEvent.id, StoredEvent.at, StoredEvent.type, StoredEvent.data, StoredEvent.origin
)
_AFTER = "SELECT id, at, type, data, origin FROM events WHERE id > %s ORDER BY id LIMIT " + str(
    BATCH
)


class SharedEventBus(EventBus):
    """An agent's event bus in a cluster: `publish` queues for the table, the tailer brings
    the table's rows to this agent's readers. `start` loads the history and starts both
    threads; `close` (as the API stops) ends the readers; `stop` (as the daemon closes,
    after the engine's last events) writes what is queued and ends the threads."""

    def __init__(
        self,
        db: Database,
        origin: str,
        *,
        keep: int = KEEP,
        prune_every: int = PRUNE_EVERY,
        poll: float = POLL,
    ) -> None:
        super().__init__(history=keep, first_id=1)
        self.db = db
        self.origin = origin
        self.keep = keep
        self.prune_every = prune_every
        self.poll = poll
        self._conninfo = make_url(db.url).set(drivername="postgresql").render_as_string(False)
        self._pending: deque[dict[str, Any]] = deque()
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._write_failing = False
        self._dropping = False

    def publish(self, type_: str, **fields: Any) -> Event:
        """Queue the event for the table (never waiting): its id is the table's, known once
        written, so the event returned has none."""
        with self._wake:
            if len(self._pending) < PENDING:
                self._pending.append({"type": type_, "data": fields, "origin": self.origin})
                self._wake.notify()
                self._dropping = False
            elif not self._dropping:
                log.error(
                    "events: %d wait for the database already; dropping new ones until it "
                    "takes them",
                    PENDING,
                )
                self._dropping = True
        return Event(None, type_, {"type": type_, **fields})

    # ---- the threads ---------------------------------------------------------------------

    def start(self) -> None:
        """Load the table's last events as the history (before any reader subscribes), then
        start the writer and the tailer."""
        with self.db.read() as session:
            recent = _ROWS.order_by(StoredEvent.id.desc()).limit(self.keep).subquery()
            rows = session.execute(select(recent).order_by(recent.c.id)).all()
        with self._lock:
            for row in rows:
                self._keep(_event(*row))
        for name, work in (("write", self._write_queued), ("tail", self._tail)):
            thread = threading.Thread(target=work, name=f"roost-events-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Write what is queued (within `STOP_WITHIN` seconds), then end both threads."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(STOP_WITHIN)
        self._threads = []

    def _write_queued(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping.is_set():
                    self._wake.wait()
                if not self._pending:
                    return
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            self._write(batch)

    def _write(self, batch: list[dict[str, Any]]) -> None:
        try:
            ids = self.db.transact_core(lambda connection: _insert(connection, batch))
        except Exception as error:
            if not self._write_failing:
                log.error("events: %d not written to the database (dropped): %s", len(batch), error)
            self._write_failing = True
            return
        if self._write_failing:
            log.info("events: written to the database again")
        self._write_failing = False
        first, last = min(ids), max(ids)
        if (first - 1) // self.prune_every != last // self.prune_every:
            self._prune(last - self.keep)

    def _prune(self, through: int) -> None:
        try:
            self.db.transact_core(
                lambda connection: connection.execute(
                    delete(StoredEvent).where(StoredEvent.id <= through)
                )
            )
        except Exception as error:
            log.warning("events: pruning those up to id %d failed: %s", through, error)

    def _tail(self) -> None:
        """LISTEN and read on a connection of its own; a lost connection (logged once) is made
        again every `RECONNECT_AFTER` seconds, and the rows written meanwhile read then."""
        failing = False
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, application_name=f"roost-events {self.origin}"
                ) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    if failing:
                        log.info("events: following the table again")
                    failing = False
                    self._read(connection)
                    while not self._stopping.is_set():
                        for _ in connection.notifies(timeout=self.poll, stop_after=1):
                            pass
                        self._read(connection)
            except psycopg.Error as error:
                if not failing:
                    log.warning("events: lost the table's events (reconnecting): %s", error)
                failing = True
                self._stopping.wait(RECONNECT_AFTER)

    def _read(self, connection: psycopg.Connection[Any]) -> None:
        """Every row after the last id this bus has, in id order, to the history and readers."""
        while True:
            rows = connection.execute(_AFTER, (self._last,)).fetchall()
            with self._lock:
                for row in rows:
                    self._keep(_event(*row))
            if len(rows) < BATCH:
                return


def _insert(connection: Connection, batch: list[dict[str, Any]]) -> list[int]:
    """Insert `batch` under the writers' lock (held until the commit is visible), stamped by
    the database's clock, and notify the tailers; the ids given."""
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK})
    ids = connection.scalars(
        insert(StoredEvent).values(at=func.clock_timestamp()).returning(StoredEvent.id),
        batch,
    ).all()
    connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
    return list(ids)


def _event(id_: int, at: datetime, type_: str, data: Mapping[str, Any], origin: str) -> Event:
    time = at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return Event(id_, type_, {"id": id_, "type": type_, "time": time, **data, "origin": origin})
