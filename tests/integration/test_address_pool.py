"""Bridged address allocation under concurrent writers, on SQLite (one writer at a time) and
PostgreSQL (writers side by side, each claiming a free address of the network's pool with
`FOR UPDATE SKIP LOCKED`): distinct addresses until the network is full, one winner of a
contested address, and a released address free again in the releasing transaction."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from roost.errors import ConflictError
from roost.state import alloc
from roost.state.db import Database
from roost.state.models import VM, IPLease, IPPoolEntry
from tests.records import make_vms

SUBNET = ipaddress.IPv4Network("10.110.0.0/27")  # 29 addresses besides the gateway
GATEWAY = ipaddress.IPv4Address("10.110.0.1")
ALLOCATABLE = SUBNET.num_addresses - 3


@pytest.fixture
def db(migrated_database_url: str) -> Iterator[Database]:
    database = Database(migrated_database_url)
    database.migrate()
    yield database
    database.dispose()


def allocate(db: Database, vm_id: int, requested: str | None = None) -> str:
    def work(session: Session) -> str:
        network = alloc.ensure_network(session, SUBNET, GATEWAY)
        wanted = None if requested is None else ipaddress.IPv4Address(requested)
        return str(alloc.allocate_ip(session, network, vm_id, wanted, new=True))

    return db.transact(work)


def all_at_once(calls: list[Callable[[], str]]) -> tuple[list[str], list[BaseException]]:
    """Run each call in its own thread, released together; what they returned and raised."""
    start = threading.Barrier(len(calls))
    results: list[str] = []
    errors: list[BaseException] = []

    def run(call: Callable[[], str]) -> None:
        start.wait()
        try:
            results.append(call())
        except BaseException as error:  # collected and asserted by the caller
            errors.append(error)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def codes(errors: list[BaseException]) -> list[str]:
    return [error.code if isinstance(error, ConflictError) else repr(error) for error in errors]


def pooled(db: Database) -> set[str]:
    """The addresses the network's pool holds (PostgreSQL's; SQLite's stays empty)."""
    with db.read() as session:
        found = session.scalars(select(IPPoolEntry.ip))
        return {str(ipaddress.IPv4Address(ip)) for ip in found}


def test_concurrent_auto_allocations_take_distinct_addresses_until_the_network_is_full(
    db: Database,
) -> None:
    allocate(db, make_vms(db, 1)[0], "10.110.0.30")  # the network exists before the race
    ids = make_vms(db, ALLOCATABLE + 10, "racer")
    results, errors = all_at_once([lambda vm_id=vm_id: allocate(db, vm_id) for vm_id in ids])
    assert len(results) == len(set(results)) == ALLOCATABLE - 1
    assert codes(errors) == ["network_full"] * 11
    assert "10.110.0.30" not in results
    hosts = {str(address) for address in SUBNET.hosts()} - {str(GATEWAY), "10.110.0.30"}
    assert set(results) == hosts
    assert pooled(db) == set()


def test_a_contested_manual_address_has_exactly_one_winner(db: Database) -> None:
    allocate(db, make_vms(db, 1)[0])
    manual, auto = make_vms(db, 12, "manual"), make_vms(db, 12, "auto")
    calls = [lambda vm_id=vm_id: allocate(db, vm_id, "10.110.0.20") for vm_id in manual]
    calls += [lambda vm_id=vm_id: allocate(db, vm_id) for vm_id in auto]
    results, errors = all_at_once(calls)
    assert results.count("10.110.0.20") == 1
    assert len(results) == len(set(results)) == 13
    assert codes(errors) == ["ip_taken"] * 11
    with db.read() as session:
        winner = session.scalar(
            select(VM.name)
            .join(IPLease)
            .where(IPLease.ip == int(ipaddress.IPv4Address("10.110.0.20")))
        )
    assert all(f"VM {winner!r}" in str(error) for error in errors)


def test_a_released_address_is_free_again_in_the_releasing_transaction(db: Database) -> None:
    first, second = make_vms(db, 2)
    address = allocate(db, first)

    def hand_over(session: Session) -> str:
        holder = session.get(VM, first)
        assert holder is not None
        alloc.release_ip(session, holder)
        network = alloc.ensure_network(session, SUBNET, GATEWAY)
        taken = alloc.allocate_ip(session, network, second, ipaddress.IPv4Address(address))
        return str(taken)

    assert db.transact(hand_over) == address
    assert address not in pooled(db)


def test_a_removed_vms_address_goes_back_to_the_pool(db: Database) -> None:
    ids = make_vms(db, ALLOCATABLE + 1)
    taken = [allocate(db, vm_id) for vm_id in ids[:ALLOCATABLE]]
    with pytest.raises(ConflictError) as caught:
        allocate(db, ids[-1])
    assert caught.value.code == "network_full"
    with db.write() as session:  # a VM's removal: its leases go with it (ON DELETE CASCADE)
        session.execute(delete(VM).where(VM.id == ids[3]))
    if db.url.startswith("postgresql"):
        assert pooled(db) == {taken[3]}
    assert allocate(db, ids[-1]) == taken[3]
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(IPPoolEntry)) == 0


def test_a_released_lease_on_the_gateway_never_enters_the_pool(db: Database) -> None:
    vm_id = make_vms(db, 1)[0]
    allocate(db, vm_id)  # the network, and its pool
    before = pooled(db)
    with db.write() as session:  # what validation never lets a create do: hold the gateway
        network = alloc.network_by_subnet(session, SUBNET)
        assert network is not None
        session.add(IPLease(network_id=network.id, ip=int(GATEWAY), vm_id=vm_id, interface=1))
    with db.write() as session:
        session.execute(delete(IPLease).where(IPLease.ip == int(GATEWAY)))
    assert pooled(db) == before
