"""A cluster's events on a real PostgreSQL: buses of several agents on one database see each
other's events in one order with the table's ids, none lost to concurrent publishers (whose ids
commit in any order), resume after an id from the table, keep only the last events, and
follow the table again after their listening session is ended."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select, text

from roost.engine.clusterevents import SharedEventBus
from roost.engine.events import Event
from roost.state.db import Database
from roost.state.models import StoredEvent
from tests.event_readers import run, take
from tests.harness import wait_for
from tests.postgres import PostgresServer


@pytest.fixture
def db(postgres: PostgresServer) -> Iterator[Database]:
    database = Database(postgres.database(migrated=True))
    yield database
    database.dispose()


@pytest.fixture
def buses(db: Database) -> Iterator[Callable[..., SharedEventBus]]:
    """bus(origin, **options): an agent's bus on `db`, started; every one stopped after."""
    made: list[SharedEventBus] = []

    def bus(origin: str, **options: Any) -> SharedEventBus:
        started = SharedEventBus(db, origin, **options)
        made.append(started)
        started.start()
        return started

    yield bus
    for started in made:
        started.close()
        started.stop()


def told(events: list[Event]) -> list[tuple[Any, ...]]:
    return [(e.id, e.type, e.data.get("origin"), e.data.get("vm")) for e in events]


def ids(events: list[Event]) -> list[int]:
    found = [event.id for event in events]
    assert None not in found, "an overflow among them"
    return [event_id for event_id in found if event_id is not None]


def stored(db: Database) -> list[int]:
    with db.read() as session:
        return list(session.scalars(select(StoredEvent.id).order_by(StoredEvent.id)))


def test_two_agents_see_each_other_s_events_in_one_order_with_the_table_s_ids(
    buses: Callable[..., SharedEventBus], db: Database
) -> None:
    one, two = buses("host1"), buses("host2")

    async def scenario() -> tuple[list[Event], list[Event]]:
        readers = one.subscribe(), two.subscribe()
        one.publish("vm.created", vm="a", plugin="p")
        two.publish("vm.created", vm="b", plugin="p")
        one.vm_status({"name": "a", "status": "running", "status_reason": None, "exit_code": None})
        two.publish("host.joined", host="host2", epoch=1)
        first, second = [await take(reader, 4) for reader in readers]
        return first, second

    first, second = run(scenario)
    assert told(first) == told(second)
    assert ids(first) == stored(db)
    assert sorted((e.data["origin"], e.type) for e in first) == [
        ("host1", "vm.created"),
        ("host1", "vm.status"),
        ("host2", "host.joined"),
        ("host2", "vm.created"),
    ]
    running = next(e for e in first if e.type == "vm.status")
    assert set(running.data) == {
        *("id", "type", "time", "origin"),
        *("vm", "status", "status_reason", "exit_code"),
    }
    assert running.data["id"] == running.id and running.data["time"].endswith("Z")
    assert running.sse().startswith(f"event: vm.status\nid: {running.id}\n".encode())


def test_concurrent_publishers_on_several_agents_lose_no_event(
    buses: Callable[..., SharedEventBus], db: Database
) -> None:
    """Ids drawn by concurrent transactions commit in any order unless the writers take turns;
    a reader that skipped a late one would miss it for good."""
    watcher = buses("watcher")
    publishers = [buses(f"host{index}") for index in range(1, 5)]
    threads_each, events_each = 4, 150
    total = len(publishers) * threads_each * events_each

    async def scenario() -> list[Event]:
        reader = watcher.subscribe()
        start = threading.Barrier(len(publishers) * threads_each)

        def publish(bus: SharedEventBus, thread: int) -> None:
            start.wait()
            for index in range(events_each):
                bus.publish("vm.status", vm=f"t{thread}", index=index)

        threads = [
            threading.Thread(target=publish, args=(bus, thread))
            for bus in publishers
            for thread in range(threads_each)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            await asyncio.to_thread(thread.join)
        return await take(reader, total, timeout=120)

    seen = run(scenario)
    assert ids(seen) == sorted(set(ids(seen))) == stored(db)
    assert len({(e.data["origin"], e.vm, e.data["index"]) for e in seen}) == total
    for origin in {e.data["origin"] for e in seen}:  # each thread's events in its own order
        for thread in range(threads_each):
            mine = [
                e.data["index"] for e in seen if (e.data["origin"], e.vm) == (origin, f"t{thread}")
            ]
            assert mine == list(range(events_each))


def test_a_reader_resumes_after_a_table_id_on_an_agent_started_later(
    buses: Callable[..., SharedEventBus],
) -> None:
    first = buses("host1")

    async def publish_five() -> list[Event]:
        reader = first.subscribe()
        for index in range(5):
            first.publish("vm.created", vm=f"v{index}", plugin="p")
        return await take(reader, 5)

    published = run(publish_five)
    later = buses("host2")  # its history: the table's rows

    async def resume(after: int) -> list[Event]:
        reader = later.subscribe(after=after)
        later.publish("vm.deleted", vm="v0")
        return await take(reader, 3 if after == published[2].id else 6)

    again = run(lambda: resume(published[2].id or 0))
    assert told(again[:2]) == told(published[3:])
    assert (again[2].type, again[2].data["origin"]) == ("vm.deleted", "host2")

    # an id of a single host (its daemon's start in µs) is out of the table's range
    single_host = time.time_ns() // 1000
    overflow, *rest = run(lambda: resume(single_host))
    assert overflow.type == "overflow" and overflow.data["after"] == single_host
    assert overflow.data["resumes_at"] == published[0].id
    assert told(rest) == told([*published, again[2]])


def test_only_the_last_events_are_kept_in_the_table_and_the_history(
    buses: Callable[..., SharedEventBus], db: Database
) -> None:
    bus = buses("host1", keep=5, prune_every=10)

    async def publish(count: int) -> list[Event]:
        reader = bus.subscribe()
        for index in range(count):
            bus.publish("vm.status", vm="a", index=index)
        return await take(reader, count)

    published = run(lambda: publish(23))
    numbers = ids(published)
    assert numbers == list(range(numbers[0], numbers[0] + 23))
    # the batch that passed id 20 deleted up to 20 - 5, at most (one batch may hold many)
    wait_for(lambda: stored(db)[0] > 10, what="the table pruned")
    remaining = stored(db)
    assert remaining == numbers[numbers.index(remaining[0]) :] and len(remaining) >= 5

    later = buses("host2", keep=5)

    async def resume() -> list[Event]:
        return await take(later.subscribe(after=numbers[0]), 6)

    overflow, *rest = run(resume)
    assert overflow.type == "overflow" and overflow.data["resumes_at"] == numbers[-5]
    assert ids(rest) == numbers[-5:]


def test_a_tailer_whose_session_is_ended_follows_the_table_again(
    buses: Callable[..., SharedEventBus], postgres: PostgresServer, db: Database
) -> None:
    writer, follower = buses("host1"), buses("host2", poll=0.2)
    database = db.url.split("@/", 1)[1].split("?", 1)[0]

    def ended() -> int:
        with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as connection:
            row = connection.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = 'roost-events host2'",
                (database,),
            ).fetchone()
        assert row is not None
        return int(row[0])

    async def scenario() -> list[Event]:
        reader = follower.subscribe()
        writer.publish("vm.created", vm="before", plugin="p")
        taken = await take(reader, 1)
        await asyncio.to_thread(wait_for, lambda: ended() == 1, what="the tailer's session")
        for name in ("during", "after"):
            writer.publish("vm.created", vm=name, plugin="p")
        return taken + await take(reader, 2)

    seen = run(scenario)
    assert [event.vm for event in seen] == ["before", "during", "after"]
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(StoredEvent)) == 3


def test_an_event_the_database_refuses_is_logged_and_publishing_goes_on(
    buses: Callable[..., SharedEventBus], db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "roost.events")
    bus = buses("host1")
    with db.write() as session:
        session.execute(text("ALTER TABLE events RENAME TO events_away"))
    published = bus.publish("vm.created", vm="a", plugin="p")
    assert published.id is None and published.data["vm"] == "a"
    wait_for(lambda: "not written to the database" in caplog.text, what="the failure logged")
    with db.write() as session:
        session.execute(text("ALTER TABLE events_away RENAME TO events"))

    async def scenario() -> list[Event]:
        reader = bus.subscribe()
        bus.publish("vm.created", vm="b", plugin="p")
        return await take(reader, 1)

    assert [event.vm for event in run(scenario)] == ["b"]
    assert "written to the database again" in caplog.text
