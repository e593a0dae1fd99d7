"""The hosts of a cluster on real databases, SQLite and PostgreSQL: registration with epochs,
heartbeats and fencing, cordons, states from the database's clock, and capacity reserved by
one statement that never overcommits a host, however many reserve at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, select

from roost.errors import ConflictError, NotFoundError
from roost.state.db import Database
from roost.state.hosts import HostRegistration, Hosts, HostState, Membership, Need
from roost.state.models import Host

FRESH = 3600.0  # any heartbeat of this test is fresher than that
STALE = 0.0  # and none is fresher than this


@pytest.fixture
def db(migrated_database_url: str) -> Iterator[Database]:
    database = Database(migrated_database_url)
    database.migrate()
    yield database
    database.dispose()


def registration(name: str, number: int, **changes: object) -> HostRegistration:
    values: dict[str, object] = {
        "name": name,
        "vtep_address": f"192.0.2.{number}",
        "api": f"unix:///run/roost-{name}/roost.sock",
        "labels": {"zone": "a" if number % 2 else "b"},
        "capacity_vcpus": 8,
        "capacity_memory_mib": 4096,
        "facts": {"vmms": ["firecracker", "qemu"], "vsock": ["firecracker"]},
    }
    values.update(changes)
    return HostRegistration(**values)  # type: ignore[arg-type]


def reserve(db: Database, host_id: int, vcpus: int, memory_mib: int, fresh: float = FRESH) -> bool:
    return db.transact_core(
        lambda connection: Hosts.reserve(connection, host_id, vcpus, memory_mib, fresh)
    )


def test_a_host_joins_with_epoch_one_and_each_registration_fences_the_one_before(
    db: Database,
) -> None:
    hosts = Hosts(db)
    first = hosts.register(registration("h1", 1))
    assert first.epoch == 1
    assert hosts.heartbeat(first)
    again = hosts.register(registration("h1", 1, api="tcp://192.0.2.1:7070"))
    assert again == Membership(first.host_id, 2)
    assert not hosts.heartbeat(first)  # the earlier run of the agent is fenced
    assert hosts.heartbeat(again)
    assert hosts.get("h1", FRESH).api == "tcp://192.0.2.1:7070"


def test_the_reconciler_fences_a_host_once_and_it_comes_back_by_registering(db: Database) -> None:
    hosts = Hosts(db)
    member = hosts.register(registration("h1", 1))
    assert hosts.fence(member.host_id, member.epoch)
    assert not hosts.fence(member.host_id, member.epoch)  # someone fenced it already
    assert not hosts.heartbeat(member)
    back = hosts.register(registration("h1", 1))
    assert back.epoch == member.epoch + 2
    assert hosts.heartbeat(back)


def test_a_host_json_is_the_issues_and_its_state_comes_from_its_heartbeats_age(
    db: Database,
) -> None:
    hosts = Hosts(db)
    hosts.register(registration("h1", 1))
    shown = hosts.get("h1", FRESH).json()
    heartbeat = shown.pop("heartbeat_at")
    assert heartbeat.endswith("Z")
    assert shown == {
        "name": "h1",
        "state": "active",
        "vtep_address": "192.0.2.1",
        "api": "unix:///run/roost-h1/roost.sock",
        "labels": {"zone": "a"},
        "capacity": {"vcpus": 8, "memory_mib": 4096},
        "allocated": {"vcpus": 0, "memory_mib": 0},
        "epoch": 1,
    }
    assert hosts.get("h1", STALE).state is HostState.OFFLINE
    assert hosts.set_cordoned("h1", True, FRESH).state is HostState.CORDONED
    assert hosts.get("h1", STALE).state is HostState.OFFLINE  # offline says more than cordoned
    assert hosts.set_cordoned("h1", False, FRESH).state is HostState.ACTIVE


def test_hosts_are_listed_by_name_and_an_unknown_one_is_not_found(db: Database) -> None:
    hosts = Hosts(db)
    for number, name in enumerate(("c", "a", "b"), start=1):
        hosts.register(registration(name, number))
    assert [host.name for host in hosts.list(FRESH)] == ["a", "b", "c"]
    with pytest.raises(NotFoundError, match="'z' is not in the cluster"):
        hosts.get("z")
    with pytest.raises(NotFoundError):
        hosts.set_cordoned("z", True)


def test_a_vtep_address_is_one_hosts_and_capacity_never_drops_below_what_vms_hold(
    db: Database,
) -> None:
    hosts = Hosts(db)
    member = hosts.register(registration("h1", 1))
    hosts.register(registration("h2", 2))
    with pytest.raises(ConflictError, match=r"192\.0\.2\.1 is host 'h1'"):
        hosts.register(registration("h3", 1))
    assert reserve(db, member.host_id, 6, 1024)
    with pytest.raises(ConflictError, match="hold 6 vCPUs"):
        hosts.register(registration("h1", 1, capacity_vcpus=4))
    assert hosts.register(registration("h1", 1, capacity_vcpus=6)).epoch == 2
    record = hosts.get("h1", FRESH)
    assert (record.capacity.vcpus, record.allocated.vcpus) == (6, 6)  # its VMs' hold is kept


def test_reserve_takes_capacity_only_from_an_active_host_with_room(db: Database) -> None:
    hosts = Hosts(db)
    host_id = hosts.register(registration("h1", 1)).host_id
    assert reserve(db, host_id, 6, 3000)
    assert not reserve(db, host_id, 3, 10)  # 9 > 8 vCPUs
    assert not reserve(db, host_id, 1, 2000)  # memory
    assert reserve(db, host_id, 2, 1096)  # exactly full
    assert not reserve(db, host_id, 0, 1)
    db.transact_core(lambda connection: Hosts.release(connection, host_id, 4, 2048))
    assert not reserve(db, host_id, 1, 1, fresh=STALE)  # offline: its heartbeat is too old
    hosts.set_cordoned("h1", True)
    assert not reserve(db, host_id, 1, 1)
    hosts.set_cordoned("h1", False)
    assert reserve(db, host_id, 1, 1)
    assert reserve(db, host_id, -1, -1)  # a smaller patch gives back
    record = hosts.get("h1", FRESH)
    assert (record.allocated.vcpus, record.allocated.memory_mib) == (4, 2048)
    db.transact_core(lambda connection: Hosts.release(connection, host_id, 100, 100_000))
    assert hosts.get("h1", FRESH).allocated.vcpus == 0  # never below zero


def test_concurrent_reservations_never_overcommit_a_host(db: Database) -> None:
    host_id = Hosts(db).register(registration("h1", 1, capacity_vcpus=10)).host_id
    results: list[bool] = []
    errors: list[BaseException] = []
    start = threading.Barrier(40)

    def work() -> None:
        try:
            start.wait()
            results.append(reserve(db, host_id, 1, 100))
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results.count(True) == 10
    with db.read() as session:
        held = session.execute(
            select(Host.allocated_vcpus, Host.allocated_memory_mib).where(Host.id == host_id)
        ).one()
    assert tuple(held) == (10, 1000)


def test_candidates_are_the_active_hosts_with_room_that_have_what_a_vm_needs(
    db: Database,
) -> None:
    hosts = Hosts(db)
    ids = {
        name: hosts.register(registration(name, number)).host_id
        for number, name in enumerate(("h1", "h2", "h3", "h4"), start=1)
    }
    assert reserve(db, ids["h1"], 4, 0)  # h3 is emptier than h1 (both zone a)
    hosts.set_cordoned("h4", True)

    def names(need: Need) -> list[tuple[str, list[str]]]:
        return [(found.name, found.missing) for found in hosts.candidates(need, FRESH)]

    assert names(Need(vcpus=1, memory_mib=64)) == [("h2", []), ("h3", []), ("h1", [])]
    assert names(Need(vcpus=1, memory_mib=64, labels={"zone": "a"})) == [
        ("h3", []),
        ("h1", []),
        ("h2", ["label zone=a"]),
    ]
    assert names(Need(vcpus=5, memory_mib=64, host="h1")) == []  # no room
    wants_ch = Need(vcpus=1, memory_mib=64, host="h2", requires={"vmms": ["cloud-hypervisor"]})
    assert names(wants_ch) == [("h2", ["vmms cloud-hypervisor"])]
    with pytest.raises(NotFoundError):
        hosts.candidates(Need(vcpus=1, memory_mib=64, host="nowhere"))
    assert hosts.candidates(Need(vcpus=1, memory_mib=64), STALE) == []


def test_fencing_joins_the_callers_transaction(db: Database) -> None:
    hosts = Hosts(db)
    member = hosts.register(registration("h1", 1))

    def fence_then_fail(connection: Connection) -> None:
        assert hosts.fence(member.host_id, member.epoch, connection)
        raise RuntimeError("the reconciler's transaction failed")

    with pytest.raises(RuntimeError):
        db.transact_core(fence_then_fail)
    assert hosts.heartbeat(member)  # rolled back with it
