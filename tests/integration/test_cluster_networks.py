"""Cluster networks in the database: on PostgreSQL (a cluster's) managed and on-demand networks
get the lowest free VNI and MTU 1450, those made before get one at start; of hosts racing to
claim a network's gateway exactly one wins; the overlay's members are read from leases, NICs
and hosts; and every agent's listener hears the changes (migration 0015's NOTIFY, another
agent's announcement), also after its session was ended. On SQLite nothing of this happens:
no VNI, every bridge its gateway."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from roost.engine.clusternet import ClusterNetworks, Listener
from roost.engine.overlay import Member
from roost.engine.settings import ClusterSettings
from roost.state import alloc, outages
from roost.state.db import Database
from roost.state.hosts import HostRegistration, Hosts
from roost.state.models import VM, Network, Plugin
from tests.harness import wait_for

SUBNETS = [ipaddress.IPv4Network(f"10.120.{n}.0/24") for n in range(4)]


@pytest.fixture
def db(migrated_database_url: str) -> Iterator[Database]:
    database = Database(migrated_database_url)
    database.migrate()
    yield database
    database.dispose()


def postgresql_only(db: Database) -> None:
    if not db.url.startswith("postgresql"):
        pytest.skip("a cluster's database is PostgreSQL")


def on_demand(db: Database, subnet: ipaddress.IPv4Network) -> alloc.NetworkRow:
    gateway = next(subnet.hosts())
    return db.transact(lambda session: alloc.ensure_network(session, subnet, gateway))


def vni_and_mtu(db: Database, name: str) -> tuple[int | None, int | None]:
    with db.read() as session:
        found = session.execute(select(Network.vni, Network.mtu).where(Network.name == name))
        row = found.one()
        return row.vni, row.mtu


def add_host(db: Database, name: str, vtep: str) -> None:
    db.transact(
        lambda session: session.execute(
            text(
                "INSERT INTO hosts (name, vtep_address, api, labels, capacity_vcpus, "
                "capacity_memory_mib, facts) VALUES (:name, :vtep, 'unix:///x', '{}', 4, 1024, "
                "'{}')"
            ),
            {"name": name, "vtep": vtep},
        )
    )


def cluster_settings(name: str, vtep: str) -> ClusterSettings:
    return ClusterSettings(name, vtep, "unix:///x", {}, 4, 1024)


def test_networks_get_the_lowest_free_vni_and_mtu_1450_on_postgresql_and_none_on_sqlite(
    db: Database,
) -> None:
    first, second = on_demand(db, SUBNETS[0]), on_demand(db, SUBNETS[1])
    managed = db.transact(
        lambda session: alloc.add_network(
            session, "lan", alloc.MANAGED, None, SUBNETS[2], next(SUBNETS[2].hosts())
        )
    ).name
    external = db.transact(
        lambda session: alloc.add_network(session, "ext", alloc.EXTERNAL, "br-ext", None, None)
    ).name
    if not db.url.startswith("postgresql"):
        for name in (first.name, second.name, managed, external):
            assert vni_and_mtu(db, name) == (None, None)
        return
    assert [vni_and_mtu(db, n) for n in (first.name, second.name, managed)] == [
        (1, 1450),
        (2, 1450),
        (3, 1450),
    ]
    assert vni_and_mtu(db, external) == (None, None)  # the operator's bridge: one host's
    db.transact(
        lambda session: session.execute(Network.__table__.delete().where(Network.id == first.id))
    )
    assert vni_and_mtu(db, on_demand(db, SUBNETS[3]).name) == (1, 1450)  # the lowest free again


def test_networks_made_before_the_cluster_get_a_vni_at_start(db: Database) -> None:
    postgresql_only(db)
    made = [on_demand(db, subnet).name for subnet in SUBNETS[:2]]
    db.transact(lambda session: session.execute(update(Network).values(vni=None, mtu=None)))
    db.transact(
        lambda session: session.execute(
            update(Network).where(Network.name == made[1]).values(vni=1)
        )
    )
    assert db.transact(alloc.span_networks) == [made[0]]
    assert vni_and_mtu(db, made[0]) == (2, 1450)
    assert db.transact(alloc.span_networks) == []


def test_of_hosts_racing_for_a_networks_gateway_exactly_one_carries_it(db: Database) -> None:
    bridge = on_demand(db, SUBNETS[0]).bridge
    names = [f"h{n}" for n in range(1, 7)]
    for n, name in enumerate(names, start=1):
        add_host(db, name, f"192.0.2.{n}")
    if not db.url.startswith("postgresql"):  # no VNI: each host's bridge is its own network
        assert all(
            ClusterNetworks(db, cluster_settings(n, "x")).carried_here(bridge) for n in names
        )
        return
    start = threading.Barrier(len(names))
    won: dict[str, bool] = {}

    def claim(name: str) -> None:
        networks = ClusterNetworks(db, cluster_settings(name, "x"))
        start.wait()
        won[name] = networks.carried_here(bridge)

    threads = [threading.Thread(target=claim, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [name for name, carried in won.items() if carried]
    assert len(winners) == 1, won
    again = {n: ClusterNetworks(db, cluster_settings(n, "x")).carried_here(bridge) for n in names}
    assert again == {name: name == winners[0] for name in names}  # it stays the winner's


def test_a_lost_hosts_gateway_is_freed_and_claimed_by_the_next_host_with_the_bridge(
    db: Database,
) -> None:
    postgresql_only(db)
    registry = Hosts(db)
    joined = {
        name: registry.register(
            HostRegistration(name, f"192.0.2.{n}", "unix:///x", {}, 4, 1024, {})
        )
        for n, name in enumerate(["h1", "h2"], start=1)
    }
    h1, h2 = (ClusterNetworks(db, cluster_settings(n, "x")) for n in ("h1", "h2"))
    network = on_demand(db, SUBNETS[0])
    assert h2.carried_here(network.bridge) and not h1.carried_here(network.bridge)
    [spanned] = h1.spanned({network.bridge, "roost-none"})
    assert (spanned.bridge, spanned.holder, spanned.mtu) == (network.bridge, "h2", 1450)
    assert str(spanned.gateway) == "10.120.0.1/24"

    db.transact(
        lambda session: session.execute(
            text("UPDATE hosts SET heartbeat_at = now() - interval '1 hour' WHERE name = 'h2'")
        )
    )
    lost = db.transact_core(
        lambda connection: outages.lose_host(
            connection, joined["h2"].host_id, joined["h2"].epoch, 60.0, "gone"
        )
    )
    assert lost is not None and lost.gateways == [network.name]
    assert [s.holder for s in h1.spanned({network.bridge})] == [None]

    assert h1.carried_here(network.bridge)  # the next host with the bridge claims it
    assert not h2.carried_here(network.bridge)  # back from its fence: no longer its own
    assert [s.holder for s in h2.spanned({network.bridge})] == ["h1"]


def test_members_are_each_guests_nic_on_its_hosts_vtep_and_the_gateways_host(
    db: Database,
) -> None:
    postgresql_only(db)
    add_host(db, "h1", "192.0.2.1")
    add_host(db, "h2", "192.0.2.2")
    network = on_demand(db, SUBNETS[0])

    def place(session: Session) -> None:
        plugin = Plugin(name="p", version="1", manifest={})
        session.add(plugin)
        session.flush()
        for name, host, user_mac in (("a", "h1", None), ("b", "h2", "02:aa:bb:cc:dd:ee")):
            host_id = session.execute(text("SELECT id FROM hosts WHERE name = :n"), {"n": host})
            vm = VM(
                name=name,
                plugin_id=plugin.id,
                status="created",
                vmm_kind="qemu",
                network={},
                host_id=host_id.scalar_one(),
            )
            session.add(vm)
            session.flush()
            alloc.hold_nic(session, vm, 0, user_mac)
            alloc.allocate_ip(session, network, vm.id, new=True)

    db.transact(place)
    h1 = ClusterNetworks(db, cluster_settings("h1", "192.0.2.1"))
    assert h1.carried_here(network.bridge)
    with db.read() as session:
        guest_macs = dict(
            session.execute(
                text("SELECT v.name, n.mac FROM vm_nics n JOIN vms v ON v.id = n.vm_id")
            ).all()
        )
    assert sorted(h1.members(), key=lambda m: m.vtep + str(m.mac)) == sorted(
        [
            Member(1, network.bridge, 1450, "192.0.2.1", guest_macs["a"]),
            Member(1, network.bridge, 1450, "192.0.2.2", "02:aa:bb:cc:dd:ee"),  # the user's MAC
            Member(1, network.bridge, 1450, "192.0.2.1", alloc.gateway_mac(network.bridge)),
        ],
        key=lambda m: m.vtep + str(m.mac),
    )
    [segment] = h1.desired()
    assert segment.peers == {"192.0.2.2"}
    assert segment.macs == {"02:aa:bb:cc:dd:ee": "192.0.2.2"}


def test_the_listener_hears_each_change_and_comes_back_after_its_session_is_ended(
    db: Database,
) -> None:
    postgresql_only(db)
    heard = threading.Semaphore(0)
    listener = Listener(db.url, heard.release)
    listener.start()
    try:
        assert heard.acquire(timeout=10)  # its connection made: a resync
        on_demand(db, SUBNETS[0])  # a network made
        assert heard.acquire(timeout=10)
        conninfo = db.url.replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(conninfo, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query = 'LISTEN roost_overlay' AND pid <> pg_backend_pid()"
            ).fetchall()
        assert ended == [(True,)]
        assert heard.acquire(timeout=10)  # connected again: a resync
        add_host(db, "h9", "192.0.2.9")
        wait_for(lambda: heard.acquire(timeout=0.1), timeout=10, what="the host's notification")
        # another agent's tap came or went: it announces, every listener hears it
        other = Listener(db.url, lambda: None)
        other.start()
        try:
            other.announce()
            wait_for(lambda: heard.acquire(timeout=0.1), timeout=10, what="the announcement")
        finally:
            other.stop()
    finally:
        listener.stop()
