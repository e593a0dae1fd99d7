"""A cluster's membership on a real PostgreSQL: the reconciler's decisions (hosts offline,
lost, back), its lock handed on when its session ends, a fenced member ending its lost VMs'
VMMs and joining again, `unknown` as VMs are read, and changes refused while fenced.

Heartbeats' ages are the database's clock, so the tests move `heartbeat_at` back instead of
sleeping; VMs are made by the engine on fakes (tests/engine_fakes.py), with real leases."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import Connection, make_url, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from roost.api.fencing import Fencing
from roost.engine.cluster import RECONCILER_LOCK, Member, Reconciler, agent_url
from roost.engine.events import Event, EventBus
from roost.engine.settings import ClusterSettings, Settings
from roost.errors import RoostError, UnavailableError
from roost.spec import VMConfig
from roost.state import outages
from roost.state.db import Database
from roost.state.hosts import HostRegistration, Hosts, HostState, Membership
from tests.engine_fakes import FakeVMMProcess, World
from tests.harness import wait_for
from tests.postgres import PostgresServer

OFFLINE_AFTER = 20.0
LOST_AFTER = 300.0


class Recorded(EventBus):
    """An event bus that keeps what was published, for the tests to read."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Event] = []

    def publish(self, type_: str, **fields: Any) -> Event:
        event = super().publish(type_, **fields)
        self.seen.append(event)
        return event

    def taken(self) -> list[tuple[str, str, str | None]]:
        """The events since the last call, as (type, host or VM, status)."""
        taken, self.seen = self.seen, []
        return [(e.type, e.data.get("host") or e.data["vm"], e.data.get("status")) for e in taken]


def cluster(name: str, **changes: Any) -> ClusterSettings:
    number = int(name.removeprefix("h"))
    values: dict[str, Any] = {
        "host_name": name,
        "vtep_address": f"192.0.2.{number}",
        "advertise_api": f"unix:///run/roost-{name}/roost.sock",
        "labels": {},
        "capacity_vcpus": 64,
        "capacity_memory_mib": 65536,
        "offline_after": OFFLINE_AFTER,
        "lost_after": LOST_AFTER,
        **changes,
    }
    return ClusterSettings(**values)


def registration(settings: ClusterSettings) -> HostRegistration:
    return HostRegistration(
        name=settings.host_name,
        vtep_address=settings.vtep_address,
        api=settings.advertise_api,
        labels=dict(settings.labels),
        capacity_vcpus=settings.capacity_vcpus,
        capacity_memory_mib=settings.capacity_memory_mib,
        facts={},
    )


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.database(migrated=True)


@pytest.fixture
def db(url: str) -> Iterator[Database]:
    database = Database(url)
    yield database
    database.dispose()


@pytest.fixture
def agent(tmp_short: Path, url: str) -> Iterator[World]:
    """An engine on fakes (plugin `p`) on the test's PostgreSQL database."""
    world = World(tmp_short, database_url=url)
    yield world
    world.close()


@pytest.fixture
def reconcilers(url: str) -> Iterator[list[Reconciler]]:
    """The reconcilers a test makes (closed after it: their sessions end)."""
    made: list[Reconciler] = []
    yield made
    for reconciler in made:
        reconciler.close()


def reconciler(made: list[Reconciler], url: str, name: str = "h1", **changes: Any) -> Reconciler:
    one = Reconciler(url, cluster(name, **changes), Recorded())
    made.append(one)
    return one


def events_of(one: Reconciler) -> Recorded:
    assert isinstance(one.events, Recorded)
    return one.events


def silent_for(db: Database, name: str, seconds: float) -> None:
    """Move host `name`'s last heartbeat `seconds` into the database's past."""

    def work(connection: Connection) -> None:
        connection.execute(
            text(
                "UPDATE hosts SET heartbeat_at = now() - :s * interval '1 second' WHERE name = :n"
            ),
            {"s": seconds, "n": name},
        )

    db.transact_core(work)


def place(db: Database, host_id: int, *vms: str) -> None:
    """Put VMs on a host (what placement records)."""

    def work(connection: Connection) -> None:
        connection.execute(
            text("UPDATE vms SET host_id = :h WHERE name = ANY(:names)"),
            {"h": host_id, "names": list(vms)},
        )

    db.transact_core(work)


def scalar(db: Database, statement: str, **values: Any) -> Any:
    with db.read() as session:
        return session.connection().execute(text(statement), values).scalar()


def statuses(db: Database) -> dict[str, str]:
    with db.read() as session:
        rows = session.connection().execute(text("SELECT name, status FROM vms")).all()
    return {row.name: row.status for row in rows}


def two_hosts(db: Database) -> tuple[Membership, Membership]:
    hosts = Hosts(db)
    return hosts.register(registration(cluster("h1"))), hosts.register(registration(cluster("h2")))


# ---- the reconciler's decisions ------------------------------------------------------------


def test_a_host_silent_past_offline_after_is_noted_offline_once_and_its_vms_unknown(
    agent: World, db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    _, h2 = two_hosts(db)
    for name in ("a", "b"):
        agent.engine.create_vm(name, VMConfig(plugin="p"), start=False)
    place(db, h2.host_id, "a", "b")
    one = reconciler(reconcilers, url)
    assert one.attempt()
    assert events_of(one).taken() == []

    silent_for(db, "h2", OFFLINE_AFTER + 1)
    assert one.attempt()
    assert events_of(one).taken() == [
        ("host.offline", "h2", None),
        ("vm.status", "a", "unknown"),
        ("vm.status", "b", "unknown"),
    ]
    assert one.attempt()
    assert events_of(one).taken() == []  # once per outage
    assert statuses(db) == {"a": "created", "b": "created"}  # `unknown` is never stored
    assert Hosts(db).get("h2", OFFLINE_AFTER).state is HostState.OFFLINE


def test_a_host_silent_past_lost_after_is_fenced_and_its_vms_lost_with_their_addresses(
    agent: World, db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    h1, h2 = two_hosts(db)
    for name in ("a", "b", "c"):
        agent.engine.create_vm(name, VMConfig(plugin="p"), start=False)
    place(db, h2.host_id, "a", "b")
    place(db, h1.host_id, "c")
    macs = scalar(db, "SELECT count(*) FROM vm_nics")
    one = reconciler(reconcilers, url)

    silent_for(db, "h2", LOST_AFTER + 1)
    assert one.attempt()
    assert events_of(one).taken() == [
        ("host.offline", "h2", None),
        ("vm.status", "a", "unknown"),
        ("vm.status", "b", "unknown"),
        ("host.fenced", "h2", None),
        ("vm.status", "a", "lost"),
        ("vm.status", "b", "lost"),
    ]
    assert statuses(db) == {"a": "lost", "b": "lost", "c": "created"}
    held = "SELECT count(*) FROM ip_leases l JOIN vms v ON v.id = l.vm_id WHERE v.name = :n"
    assert [scalar(db, held, n=name) for name in ("a", "b", "c")] == [0, 0, 1]
    assert scalar(db, "SELECT count(*) FROM vm_nics") == macs  # MACs kept until rm
    assert not Hosts(db).heartbeat(h2)  # fenced: its epoch moved on
    assert Hosts(db).get("h2", OFFLINE_AFTER).epoch == h2.epoch + 1
    with db.read() as session:
        reason = session.connection().execute(text("SELECT status_reason FROM vms")).scalars()
        assert any("was offline for longer than 300 s" in (r or "") for r in reason)

    assert one.attempt()
    assert events_of(one).taken() == []  # fenced once

    # a reconciler taking over later fences it once more (it cannot know), losing nothing
    one.close()
    later = reconciler(reconcilers, url, "h3")
    assert later.attempt()
    assert events_of(later).taken() == [("host.fenced", "h2", None)]
    assert later.attempt()
    assert events_of(later).taken() == []
    assert statuses(db) == {"a": "lost", "b": "lost", "c": "created"}


def test_a_host_beating_again_after_an_outage_is_joined_once(
    db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    _, h2 = two_hosts(db)
    one = reconciler(reconcilers, url)
    silent_for(db, "h2", OFFLINE_AFTER + 1)
    assert one.attempt()
    assert events_of(one).taken() == [("host.offline", "h2", None)]

    assert Hosts(db).heartbeat(h2)
    assert one.attempt()
    assert events_of(one).taken() == [("host.joined", "h2", None)]
    assert one.attempt()
    assert events_of(one).taken() == []
    assert scalar(db, "SELECT offline_noted FROM hosts WHERE name = 'h2'") is False


def test_a_host_that_beats_before_the_fence_commits_is_not_lost(db: Database) -> None:
    _, h2 = two_hosts(db)
    silent_for(db, "h2", LOST_AFTER + 1)
    assert Hosts(db).heartbeat(h2)  # between the sweep's read and its write
    lost = db.transact_core(
        lambda connection: outages.lose_host(connection, h2.host_id, h2.epoch, LOST_AFTER, "r")
    )
    assert lost is None
    assert Hosts(db).heartbeat(h2)


# ---- the lock ------------------------------------------------------------------------------


def holder_pid(postgres: PostgresServer, url: str) -> int | None:
    """The backend holding the reconciler's lock in the test's database."""
    database = make_url(url).database
    assert database is not None
    with psycopg.connect(postgres.conninfo(database), autocommit=True) as connection:
        found = connection.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND (classid::bigint << 32) + objid::bigint = %s",
            (RECONCILER_LOCK,),
        ).fetchone()
        return None if found is None else int(found[0])


def test_one_reconciler_at_a_time_and_ending_its_session_hands_the_lock_on(
    postgres: PostgresServer, db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    two_hosts(db)
    first, second = reconciler(reconcilers, url, "h1"), reconciler(reconcilers, url, "h2")
    assert first.attempt()
    assert not second.attempt()
    pid = holder_pid(postgres, url)
    assert pid is not None

    with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as connection:
        connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(lambda: holder_pid(postgres, url) is None, what="the holder's session to end")
    assert not first.attempt()  # its session is gone: it knows it holds nothing
    assert second.attempt()
    assert not first.attempt()
    assert holder_pid(postgres, url) not in (None, pid)


def test_a_silent_holder_loses_the_lock_when_the_database_ends_its_idle_session(
    postgres: PostgresServer, db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    two_hosts(db)
    fast = {"offline_after": 0.8}  # beats every 0.2 s: a session silent for 0.6 s ends
    first = reconciler(reconcilers, url, "h1", **fast)
    second = reconciler(reconcilers, url, "h2", **fast)
    assert first.attempt()
    # `first` says nothing from now on, as a frozen agent would
    wait_for(second.attempt, what="the other reconciler to take the lock")
    assert not first.attempt()


def test_a_sweep_held_up_by_a_row_a_silent_agent_locked_keeps_the_lock_and_fences_later(
    postgres: PostgresServer, db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    two_hosts(db)
    fast = {"offline_after": 0.8, "lost_after": 1.6}  # a sweep waits 0.6 s for a row at most
    one, other = reconciler(reconcilers, url, "h1", **fast), reconciler(reconcilers, url, "h3")
    silent_for(db, "h2", 10)
    database = make_url(url).database
    assert database is not None
    with psycopg.connect(postgres.conninfo(database)) as frozen:  # mid-transaction, silent
        frozen.execute("SELECT * FROM hosts WHERE name = 'h2' FOR UPDATE")
        assert one.attempt()  # its writes timed out; its session, and the lock, live on
        assert "h2" not in {host for _, host, _ in events_of(one).taken()}
        assert not other.attempt()
    assert one.attempt()
    of_h2 = [kind for kind, host, _ in events_of(one).taken() if host == "h2"]
    assert of_h2 == ["host.offline", "host.fenced"]  # (h1 may have gone quiet meanwhile too)


def test_an_agents_transactions_left_idle_end_once_it_would_be_offline(url: str) -> None:
    database = Database(agent_url(url, cluster("h1")))
    try:
        with database.read() as session:
            shown = session.connection().execute(text("SHOW idle_in_transaction_session_timeout"))
            assert shown.scalar() == "20s"
    finally:
        database.dispose()


# ---- a member --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def member_of(agent: World, db: Database, url: str, name: str, clock: Clock) -> Member:
    settings = Settings(
        state_dir=agent.settings.state_dir,
        run_dir=agent.settings.run_dir,
        database_url=url,
        cluster=cluster(name),
    )
    return Member(settings, db, agent.engine, lambda: {"vmms": ["fake"]}, clock)


def member_with_a(agent: World, db: Database, url: str, *, start: bool = True) -> Member:
    """Member h2, joined, with VM `a` made (started unless `start` is False) and placed on it,
    the engine acting as h2."""
    member = member_of(agent, db, url, "h2", Clock())
    joined = member.join()
    agent.engine.create_vm("a", VMConfig(plugin="p"), start=start)
    place(db, joined.host_id, "a")
    agent.engine.act_as_host(joined.host_id)  # (after the create: the fakes have no placement)
    return member


def test_a_fenced_member_ends_its_lost_vms_vmms_and_joins_again_leaving_their_records(
    agent: World, db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    Hosts(db).register(registration(cluster("h1")))
    clock = Clock()
    member = member_of(agent, db, url, "h2", clock)
    joined = member.join()
    agent.engine.create_vm("a", VMConfig(plugin="p"))
    agent.engine.create_vm("b", VMConfig(plugin="p"))
    place(db, joined.host_id, "a")
    vmm = agent.engine.live["a"].process
    tap = agent.engine.show_vm("a")["network"]["tap"]
    assert tap in agent.links.links

    silent_for(db, "h2", LOST_AFTER + 1)
    assert reconciler(reconcilers, url).attempt()
    assert statuses(db)["a"] == "lost"

    abandon, refusals = agent.engine.abandon, []

    def abandoning(name: str) -> bool:  # what the API would answer meanwhile
        refusals.append((name, member.refusal(), Hosts(db).get("h2", OFFLINE_AFTER).epoch))
        return abandon(name)

    agent.engine.abandon = abandoning  # type: ignore[method-assign]
    member.beat()  # finds itself fenced, ends a's VMM, joins again
    name, refusal, epoch = refusals[0]
    assert name == "a" and refusal is not None and refusal.code == "fenced"
    assert epoch == joined.epoch + 1  # its VMMs end before it registers again
    assert vmm.exited()  # ended by PID and reaped
    assert "a" not in agent.engine.live and "b" in agent.engine.live
    assert tap not in agent.links.links  # its tap and rules released on this host
    assert statuses(db) == {"a": "lost", "b": "running"}  # records as the cluster wrote them
    assert member.membership == Membership(joined.host_id, joined.epoch + 2)
    assert not member.fenced and member.refusal() is None
    assert Hosts(db).heartbeat(member.membership)
    assert [e.type for e in agent.engine.events._history][-1] == "host.joined"


def test_a_lost_vms_vmm_that_ended_while_its_host_was_silent_leaves_its_record_lost(
    agent: World, db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    member_with_a(agent, db, url)
    tap = agent.engine.show_vm("a")["network"]["tap"]
    silent_for(db, "h2", LOST_AFTER + 1)
    assert reconciler(reconcilers, url).attempt()

    vmm = agent.engine.live["a"].process
    assert isinstance(vmm, FakeVMMProcess)
    vmm.child.send_signal(signal.SIGKILL)  # its guest ended while the agent was frozen
    wait_for(lambda: "a" not in agent.engine.live, what="the exit to be handled")
    assert statuses(db) == {"a": "lost"}  # not stopped or crashed: the cluster's record
    assert tap not in agent.links.links


def test_an_operation_under_way_when_its_host_froze_writes_nothing_over_lost(
    agent: World, db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    member_with_a(agent, db, url)
    silent_for(db, "h2", LOST_AFTER + 1)
    assert reconciler(reconcilers, url).attempt()

    stopped = agent.engine.stop_vm("a")  # as a stop the freeze interrupted goes on
    assert stopped["status"] == "lost"
    assert statuses(db) == {"a": "lost"}
    assert "a" not in agent.engine.live


def test_a_start_that_reached_the_host_a_drain_just_moved_its_vm_from_boots_nothing(
    agent: World, db: Database
) -> None:
    h1, h2 = two_hosts(db)
    agent.engine.create_vm("a", VMConfig(plugin="p"), start=False)
    place(db, h1.host_id, "a")
    agent.engine.act_as_host(h1.host_id)
    place(db, h2.host_id, "a")  # a drain's move, committed after the start was routed here
    cids = scalar(db, "SELECT count(*) FROM cid_leases")

    with pytest.raises(RoostError) as refused:
        agent.engine.start_vm("a")
    assert refused.value.code == "misdirected" and "on host h2" in refused.value.message
    assert "a" not in agent.engine.live
    assert statuses(db) == {"a": "created"}  # no starting, no error written over h2's VM
    assert scalar(db, "SELECT count(*) FROM cid_leases") == cids  # no CID taken for it

    place(db, h1.host_id, "a")  # back on this host, it starts
    assert agent.engine.start_vm("a")["status"] == "running"


def test_a_vm_the_cluster_declared_lost_is_not_started_again_by_its_host(
    agent: World, db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    member_with_a(agent, db, url, start=False)
    silent_for(db, "h2", LOST_AFTER + 1)
    assert reconciler(reconcilers, url).attempt()

    with pytest.raises(RoostError) as refused:
        agent.engine.start_vm("a")
    assert refused.value.code == "conflict" and "declared lost" in refused.value.message
    assert "a" not in agent.engine.live
    assert statuses(db) == {"a": "lost"}
    assert scalar(db, "SELECT count(*) FROM ip_leases") == 0  # its released address stays free


def test_a_start_under_way_when_its_host_froze_past_the_grace_takes_no_address_or_vmm(
    agent: World,
    db: Database,
    url: str,
    reconcilers: list[Reconciler],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    member_with_a(agent, db, url, start=False)
    begin_start = agent.engine.records.begin_start

    def frozen_once_started(name: str) -> Any:
        row = begin_start(name)  # `starting` committed, then the agent is frozen past the grace
        silent_for(db, "h2", LOST_AFTER + 1)
        assert reconciler(reconcilers, url).attempt()
        return row

    monkeypatch.setattr(agent.engine.records, "begin_start", frozen_once_started)
    with pytest.raises(RoostError) as refused:
        agent.engine.start_vm("a")  # thawed: its allocation goes on
    assert refused.value.code == "conflict" and "declared lost" in refused.value.message
    assert "a" not in agent.engine.live
    assert statuses(db) == {"a": "lost"}
    assert scalar(db, "SELECT count(*) FROM ip_leases") == 0  # none taken again for it


def test_a_member_takes_no_changes_until_a_heartbeat_confirms_it_after_a_silence(
    agent: World, db: Database, url: str
) -> None:
    clock = Clock()
    member = member_of(agent, db, url, "h2", clock)
    member.join()
    assert member.refusal() is None
    clock.now += OFFLINE_AFTER + 1  # frozen (SIGSTOP), or cut off from the database
    refusal = member.refusal()
    assert isinstance(refusal, UnavailableError) and refusal.code == "fenced"
    member.beat()
    assert member.refusal() is None


def test_a_member_keeps_its_facts_current_for_placement(
    agent: World, db: Database, url: str
) -> None:
    member = member_of(agent, db, url, "h2", Clock())
    has: dict[str, Any] = {"vmms": ["fake"], "external_networks": []}
    member.facts = lambda: dict(has)
    member.join()
    assert Hosts(db).get("h2").facts == has
    has["external_networks"] = ["lab"]  # `network create --external lab` on this host
    member.beat()
    assert Hosts(db).get("h2").facts == {"vmms": ["fake"], "external_networks": ["lab"]}
    assert member.membership is not None and Hosts(db).heartbeat(member.membership)


def test_vms_of_an_offline_host_read_unknown_and_lost_ones_stay_lost(
    agent: World, db: Database, url: str, reconcilers: list[Reconciler]
) -> None:
    _, h2 = two_hosts(db)
    member = member_of(agent, db, url, "h1", Clock())
    member.join()
    agent.engine.offline_hosts = member.offline_hosts
    for name in ("a", "b"):
        agent.engine.create_vm(name, VMConfig(plugin="p"), start=False)
    place(db, h2.host_id, "a", "b")

    def listed() -> dict[str, str]:
        views = [json.loads(view) for _, view in agent.engine.list_vms_encoded()]
        return {view["name"]: view["status"] for view in views}

    assert listed() == {"a": "created", "b": "created"}
    silent_for(db, "h2", OFFLINE_AFTER + 1)
    member.beat()
    assert listed() == {"a": "unknown", "b": "unknown"}
    assert agent.engine.show_vm("a")["status"] == "unknown"
    assert [vm["status"] for vm in agent.engine.list_vms()] == ["unknown", "unknown"]

    silent_for(db, "h2", LOST_AFTER + 1)
    assert reconciler(reconcilers, url).attempt()
    member.beat()
    assert listed() == {"a": "lost", "b": "lost"}

    Hosts(db).register(registration(cluster("h2")))
    member.beat()
    assert agent.engine.show_vm("a")["status"] == "lost"


# ---- the API -------------------------------------------------------------------------------


def test_a_fenced_agent_answers_changes_503_fenced_and_reads_as_usual() -> None:
    refusal: list[RoostError] = []

    async def answer(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.method)

    app = Starlette(routes=[Route("/v1/vms", answer, methods=["GET", "POST", "DELETE"])])
    fencing = Fencing(app, refusal=lambda: refusal[0] if refusal else None)

    async def ask(*methods: str) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=fencing)
        async with httpx.AsyncClient(transport=transport, base_url="http://roost") as api:
            return [await api.request(method, "/v1/vms") for method in methods]

    assert [r.text for r in asyncio.run(ask("POST", "GET"))] == ["POST", "GET"]
    refusal.append(UnavailableError("host h2 was fenced", code="fenced", retry_after=1.0))
    post, delete, get = asyncio.run(ask("POST", "DELETE", "GET"))
    for refused in (post, delete):
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "fenced"
        assert refused.headers["retry-after"] == "1"
    assert get.text == "GET"


def upgrade_through(fencing: Fencing, denial: bool) -> list[dict[str, Any]]:
    """What `fencing` sent for a WebSocket upgrade to the vsock route, from a server that can
    send a denial response when `denial` says so."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/v1/vms/a/vsock/1024",
        "headers": [],
        "extensions": {"websocket.http.response": {}} if denial else {},
    }
    asyncio.run(fencing(scope, receive, send))  # type: ignore[arg-type]
    return sent


def test_a_fenced_agent_refuses_websockets_503_fenced_or_closes_them() -> None:
    refusal: list[RoostError] = []
    reached: list[str] = []

    async def routes(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    fencing = Fencing(routes, refusal=lambda: refusal[0] if refusal else None)
    assert upgrade_through(fencing, denial=True) == []
    assert reached == ["/v1/vms/a/vsock/1024"]

    refusal.append(UnavailableError("host h2 was fenced", code="fenced", retry_after=1.0))
    start, body = upgrade_through(fencing, denial=True)
    assert (start["type"], start["status"]) == ("websocket.http.response.start", 503)
    assert (b"retry-after", b"1") in start["headers"]
    assert json.loads(body["body"])["error"]["code"] == "fenced"
    assert upgrade_through(fencing, denial=False) == [
        {"type": "websocket.close", "code": 1013, "reason": "fenced"}
    ]
    assert reached == ["/v1/vms/a/vsock/1024"]  # neither refused upgrade reached the routes
