"""What belongs to one host of a cluster, in the database (SQLite and PostgreSQL, whose schema is
the same): an external network's name, bridge and subnet are unique per host and never a
cluster network's; a name resolves to the host's own network first; a persisted forward's
address is unique per host; a CNI attachment is seen, DELeted and forgotten only by its host.
A single host (no host ids) keeps every rule it had."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from roost.engine.networks import policy_lookup_in
from roost.errors import ConflictError
from roost.state import alloc, cni, forwards
from roost.state.db import Database
from roost.state.hosts import Hosts
from roost.state.models import VM, Network, Plugin
from tests.records import host_registration

EXTERNAL = alloc.EXTERNAL
ATTACHMENT = {
    "conflist": {"name": "c"},
    "container_id": "roost-x",
    "netns": "/run/netns/x",
    "ifname": "eth0",
    "args": {},
    "capability_args": {},
}


@pytest.fixture
def db(migrated_database_url: str) -> Iterator[Database]:
    database = Database(migrated_database_url)
    yield database
    database.dispose()


@pytest.fixture
def hosts(db: Database) -> tuple[int, int]:
    registry = Hosts(db)
    return (
        registry.register(host_registration("h1", "10.251.0.1")).host_id,
        registry.register(host_registration("h2", "10.251.0.2")).host_id,
    )


def add(
    db: Database,
    name: str,
    kind: str,
    bridge: str | None,
    host_id: int | None,
    subnet: str | None = None,
) -> Network:
    net = None if subnet is None else ipaddress.IPv4Network(subnet)
    gateway = None if net is None else net.network_address + 1

    def work(session: Session) -> Network:
        network = alloc.add_network(session, name, kind, bridge, net, gateway, host_id=host_id)
        session.expunge(network)
        return network

    return db.transact(work)


def resolved(db: Database, name: str, host_id: int | None, **how: Any) -> tuple[str, int | None]:
    with db.read() as session:
        found = session.scalar(alloc.named(name, host_id, **how))
        assert found is not None
        return found.bridge or "", found.host_id


def add_vm(db: Database, name: str, host_id: int | None) -> None:
    def work(session: Session) -> None:
        plugin = session.scalar(select(Plugin).where(Plugin.name == "p"))
        if plugin is None:
            plugin = Plugin(name="p", version="1", manifest={})
            session.add(plugin)
            session.flush()
        session.add(
            VM(
                name=name,
                plugin_id=plugin.id,
                status="created",
                vmm_kind="qemu",
                network={},
                host_id=host_id,
            )
        )

    db.transact(work)


def test_two_hosts_each_register_an_external_network_of_one_name_and_bridge(
    db: Database, hosts: tuple[int, int]
) -> None:
    h1, h2 = hosts
    add(db, "ext", EXTERNAL, "br-ext", h1, "192.168.50.0/24")
    add(db, "ext", EXTERNAL, "br-ext", h2, "192.168.50.0/24")
    with pytest.raises(ConflictError, match="'ext' already exists"):
        add(db, "ext", EXTERNAL, "br-other", h1)
    with pytest.raises(ConflictError, match="already has bridge br-ext"):
        add(db, "ext2", EXTERNAL, "br-ext", h2)
    with pytest.raises(ConflictError, match="overlaps network 'ext'"):
        add(db, "ext3", EXTERNAL, "br-3", h2, "192.168.50.128/25")
    assert resolved(db, "ext", h1) == ("br-ext", h1)
    assert resolved(db, "ext", h2) == ("br-ext", h2)


def test_a_cluster_network_and_a_hosts_network_never_share_a_name_or_a_bridge(
    db: Database, hosts: tuple[int, int]
) -> None:
    h1, h2 = hosts
    add(db, "ext", EXTERNAL, "br-ext", h2)
    with pytest.raises(ConflictError, match="'ext' already exists on host h2 \\(external\\)"):
        add(db, "ext", alloc.MANAGED, None, None, "10.60.0.0/24")
    with pytest.raises(ConflictError, match="already has bridge br-ext"):
        add(db, "lan", alloc.MANAGED, "br-ext", None, "10.60.0.0/24")
    with pytest.raises(ConflictError, match="'ext' already exists on host h2"):
        db.transact(lambda session: cni.add_network(session, "ext", {"name": "ext"}))
    add(db, "lan", alloc.MANAGED, "br-lan", None, "10.60.0.0/24")
    with pytest.raises(ConflictError, match="'lan' already exists \\(managed\\)"):
        add(db, "lan", EXTERNAL, "br-x", h1)
    with pytest.raises(ConflictError, match="already has bridge br-lan"):
        add(db, "x", EXTERNAL, "br-lan", h1)
    with pytest.raises(ConflictError, match="overlaps network 'lan'"):
        add(db, "x", EXTERNAL, "br-x", h1, "10.60.0.0/25")


def test_a_name_resolves_to_the_hosts_own_network_then_the_clusters(
    db: Database, hosts: tuple[int, int]
) -> None:
    h1, h2 = hosts
    add(db, "ext", EXTERNAL, "br-1", h1)
    add(db, "lan", alloc.MANAGED, "br-lan", None, "10.61.0.0/24")
    assert resolved(db, "lan", h1) == ("br-lan", None)
    assert resolved(db, "ext", h1) == ("br-1", h1)
    with db.read() as session:
        assert session.scalar(alloc.named("ext", h2)) is None  # not h2's to use
        assert alloc.network_by_name(session, "lan", h2) is not None
    # placement plans with any host's before it knows where the VM goes
    assert resolved(db, "ext", h2, anywhere=True) == ("br-1", h1)
    add(db, "ext", EXTERNAL, "br-2", h2)
    assert resolved(db, "ext", h2, anywhere=True) == ("br-2", h2)


def test_a_single_host_keeps_names_bridges_and_subnets_unique(db: Database) -> None:
    add(db, "ext", EXTERNAL, "br-ext", None)
    with pytest.raises(ConflictError, match="'ext' already exists \\(external\\)"):
        add(db, "ext", alloc.MANAGED, None, None, "10.62.0.0/24")
    with pytest.raises(ConflictError, match="already has bridge br-ext"):
        add(db, "other", EXTERNAL, "br-ext", None)
    assert resolved(db, "ext", None) == ("br-ext", None)


def test_the_database_refuses_a_second_network_of_one_name_on_one_host(
    db: Database, hosts: tuple[int, int]
) -> None:
    """The unique index is the last safeguard, under the checks."""
    h1, _ = hosts
    add(db, "ext", EXTERNAL, "br-ext", h1)
    for clash in ({"name": "ext", "bridge": "br-y"}, {"name": "y", "bridge": "br-ext"}):
        with pytest.raises(IntegrityError), db.read() as session:
            session.add(Network(kind=EXTERNAL, host_id=h1, **clash))
            session.flush()


def test_two_hosts_may_forward_the_same_address_one_host_only_once(
    db: Database, hosts: tuple[int, int]
) -> None:
    h1, h2 = hosts
    for name, host in (("a", h1), ("b", h2), ("c", h1)):
        add_vm(db, name, host)
    listen = "127.0.0.1:8080"
    on_h1 = db.transact_core(lambda connection: forwards.add(connection, "a", listen, 80))
    on_h2 = db.transact_core(lambda connection: forwards.add(connection, "b", listen, 80))
    assert on_h1.id != on_h2.id
    with pytest.raises(ConflictError, match=r"already forward \d+ of VM 'a'"):
        db.transact_core(lambda connection: forwards.add(connection, "c", listen, 81))
    with db.read() as session:
        connection = session.connection()
        holder_on = forwards.holder
        assert holder_on(connection, listen, h1) == on_h1
        assert holder_on(connection, listen, h2) == on_h2
        assert [one.vm for one in forwards.every(connection, h2)] == ["b"]


def test_a_single_hosts_forwards_stay_unique(db: Database) -> None:
    add_vm(db, "a", None)
    add_vm(db, "b", None)
    db.transact_core(lambda connection: forwards.add(connection, "a", "127.0.0.1:9", 80))
    with pytest.raises(ConflictError, match="already forward"):
        db.transact_core(lambda connection: forwards.add(connection, "b", "127.0.0.1:9", 80))


def test_a_vm_with_a_forward_another_host_holds_does_not_move_there(
    db: Database, hosts: tuple[int, int]
) -> None:
    h1, h2 = hosts
    add_vm(db, "a", h1)
    add_vm(db, "b", h2)
    add_vm(db, "c", h1)
    db.transact_core(lambda connection: forwards.add(connection, "a", "127.0.0.1:80", 80))
    db.transact_core(lambda connection: forwards.add(connection, "b", "127.0.0.1:80", 80))
    db.transact_core(lambda connection: forwards.add(connection, "c", "127.0.0.1:81", 80))
    with db.read() as session:
        connection = session.connection()
        ids = dict(connection.execute(select(VM.name, VM.id)).all())
        clash = forwards.clash_on(connection, ids["a"], h2)
        assert clash is not None and clash.vm == "b"
        assert forwards.clash_on(connection, ids["c"], h2) is None
    db.transact_core(lambda connection: forwards.move(connection, ids["c"], h2))
    with db.read() as session:
        assert [one.vm for one in forwards.every(session.connection(), h1)] == ["a"]
        assert forwards.holder(session.connection(), "127.0.0.1:81", h2) is not None


def test_a_cni_attachment_is_seen_and_forgotten_by_its_host_alone(
    db: Database, hosts: tuple[int, int]
) -> None:
    """A VM of one name removed on h1 before its DEL ran, made again on h2: each host records,
    reads and forgets its own attachment of that name, and h2 never DELs h1's."""
    h1, h2 = hosts
    db.transact(lambda session: cni.record(session, "vm", 0, "c", ATTACHMENT, h1))
    db.transact(lambda session: cni.record(session, "vm", 0, "c", ATTACHMENT, h2))
    with pytest.raises(ConflictError, match="still has a CNI attachment"):
        db.transact(lambda session: cni.record(session, "vm", 0, "c", ATTACHMENT, h2))
    db.transact(lambda session: cni.set_result(session, "vm", 0, {"ok": 2}, h2))
    with db.read() as session:
        assert [(one.vm, one.result) for one in cni.every(session, h1)] == [("vm", None)]
        assert [one.result for one in cni.of_vm(session, "vm", h2)] == [{"ok": 2}]
        assert cni.every(session) == []  # a single host's (none) are not theirs
    db.transact(lambda session: cni.forget(session, "vm", 0, h2))
    with db.read() as session:
        assert cni.of_vm(session, "vm", h2) == []
        assert len(cni.of_vm(session, "vm", h1)) == 1


def test_a_single_hosts_cni_attachments_are_as_they_were(db: Database) -> None:
    db.transact(lambda session: cni.record(session, "vm", 0, "c", ATTACHMENT))
    with pytest.raises(ConflictError, match="still has a CNI attachment"):
        db.transact(lambda session: cni.record(session, "vm", 0, "c", ATTACHMENT))
    with db.read() as session:
        assert [one.vm for one in cni.every(session)] == ["vm"]
    db.transact(lambda session: cni.forget(session, "vm", 0))
    with db.read() as session:
        assert cni.every(session) == []


def test_the_first_host_to_start_adopts_the_external_networks_made_before_the_cluster(
    db: Database, hosts: tuple[int, int]
) -> None:
    h1, h2 = hosts
    add(db, "dhcp", EXTERNAL, "br-dhcp", None)
    add(db, "lan", alloc.MANAGED, "br-lan", None, "10.63.0.0/24")
    assert db.transact(lambda session: alloc.adopt_external(session, h1)) == ["dhcp"]
    assert db.transact(lambda session: alloc.adopt_external(session, h2)) == []
    assert resolved(db, "dhcp", h1) == ("br-dhcp", h1)
    assert resolved(db, "lan", h2) == ("br-lan", None)
    add(db, "dhcp", EXTERNAL, "br-dhcp", h2)  # h2's own, now that h1's is h1's


def test_a_policys_network_is_its_hosts_own_else_any_hosts(
    db: Database, hosts: tuple[int, int]
) -> None:
    h1, h2 = hosts
    add(db, "ext", EXTERNAL, "br-ext", h1, "192.168.51.0/24")
    add(db, "ext", EXTERNAL, "br-ext", h2, "192.168.52.0/24")
    add(db, "only1", EXTERNAL, "br-only", h1, "192.168.53.0/24")
    with db.read() as session:
        on_h2 = policy_lookup_in(session, h2)
        assert str(getattr(on_h2("ext"), "subnet", None)) == "192.168.52.0/24"
        assert str(getattr(on_h2("only1"), "subnet", None)) == "192.168.53.0/24"
        assert str(getattr(policy_lookup_in(session, h1)("ext"), "subnet", None)) == (
            "192.168.51.0/24"
        )
