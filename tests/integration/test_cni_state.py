"""CNI in the database, on real SQLite and PostgreSQL: migration 0009 (networks of kind `cni`,
with a conflist and no bridge; the attachments table) and back; and the attachments a VM's cni
interfaces hold, kept by the VM's name until DEL has run, past the VM's own record."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from alembic import command
from sqlalchemy import create_engine, delete, inspect, text
from sqlalchemy.exc import IntegrityError

from roost.errors import ConflictError
from roost.state import cni
from roost.state.db import Database
from roost.state.models import VM
from tests.integration.test_migrations import alembic_config, upgraded
from tests.integration.test_state import make_vms

CONFLIST = {"cniVersion": "1.0.0", "name": "cninet", "plugins": [{"type": "bridge"}]}
ATTACHMENT = {
    "conflist": CONFLIST,
    "container_id": "roost-vm-0",
    "netns": "/run/netns/roost-vm-vm-0",
    "ifname": "eth0",
    "args": {"K8S_POD_NAME": "web"},
    "capability_args": {"portMappings": []},
}
RESULT = {"cniVersion": "1.0.0", "ips": [{"address": "10.88.0.2/24"}]}


def insert(connection_url: str, *statements: str) -> None:
    engine = create_engine(connection_url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def refused(url: str, statement: str) -> None:
    with pytest.raises(IntegrityError):
        insert(url, statement)


def test_version_eight_databases_keep_their_networks_and_take_cni_ones_and_back(
    database_url: str,
) -> None:
    url = database_url
    config = alembic_config()
    engine = create_engine(url)
    with upgraded(engine, config, "0008") as connection:
        connection.execute(
            text(
                "INSERT INTO networks (id, name, kind, bridge, subnet, gateway, first, last, "
                "next_hint, created_at) VALUES (1, 'lan', 'managed', 'rbr1', '10.9.0.0/24', "
                "'10.9.0.1', 168361984, 168362239, 168361985, '2026-01-01')"
            )
        )
    with upgraded(engine, config, "0009") as connection:
        rows = connection.execute(text("SELECT name, kind, bridge, conflist FROM networks"))
        assert [tuple(row) for row in rows] == [("lan", "managed", "rbr1", None)]
    engine.dispose()

    conflist = json.dumps(CONFLIST)
    insert(
        url,
        "INSERT INTO networks (id, name, kind, conflist, created_at) "
        f"VALUES (2, 'cninet', 'cni', '{conflist}', '2026-01-01')",
        'INSERT INTO cni_attachments (vm, "index", network, container_id, netns, ifname, '
        "conflist, args, capability_args, created_at) VALUES ('gone', 0, 'cninet', 'roost-gone', "
        f"'/run/netns/roost-vm-gone', 'eth0', '{conflist}', '{{}}', '{{}}', '2026-01-01')",
    )
    for statement in (
        # a cni network has no bridge, and has a conflist; the other kinds the other way round
        "INSERT INTO networks (id, name, kind, bridge, conflist, created_at) "
        f"VALUES (3, 'c2', 'cni', 'br-c2', '{conflist}', '2026-01-01')",
        "INSERT INTO networks (id, name, kind, created_at) VALUES (4, 'c3', 'cni', '2026-01-01')",
        "INSERT INTO networks (id, name, kind, created_at) "
        "VALUES (5, 'e1', 'external', '2026-01-01')",
        "INSERT INTO networks (id, name, kind, bridge, conflist, created_at) "
        f"VALUES (6, 'e2', 'external', 'br-e2', '{conflist}', '2026-01-01')",
        "INSERT INTO networks (id, name, kind, bridge, created_at) "
        "VALUES (7, 'm1', 'managed', 'br-m1', '2026-01-01')",
        # one attachment per interface of a VM, and at most eight interfaces
        'INSERT INTO cni_attachments (id, vm, "index", network, container_id, netns, ifname, '
        "conflist, args, capability_args, created_at) VALUES (2, 'gone', 0, 'x', 'c', 'n', "
        "'eth0', '{}', '{}', '{}', '2026-01-01')",
        'INSERT INTO cni_attachments (id, vm, "index", network, container_id, netns, ifname, '
        "conflist, args, capability_args, created_at) VALUES (3, 'gone', 8, 'x', 'c', 'n', "
        "'eth8', '{}', '{}', '{}', '2026-01-01')",
    ):
        refused(url, statement)

    engine = create_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0008")
    with engine.begin() as connection:
        rows = connection.execute(text("SELECT name, kind, bridge FROM networks"))
        assert [tuple(row) for row in rows] == [("lan", "managed", "rbr1")]
        assert "cni_attachments" not in inspect(connection).get_table_names()
    engine.dispose()
    # the old rules again: every network has a bridge, and there are three kinds
    refused(
        url,
        "INSERT INTO networks (id, name, kind, created_at) "
        "VALUES (2, 'e', 'external', '2026-01-01')",
    )
    refused(
        url,
        "INSERT INTO networks (id, name, kind, bridge, created_at) "
        "VALUES (2, 'c', 'cni', 'b', '2026-01-01')",
    )


@pytest.fixture
def db(migrated_database_url: str) -> Iterator[Database]:
    database = Database(migrated_database_url)
    database.migrate()
    yield database
    database.dispose()


def test_a_cni_network_is_its_conflist_with_no_bridge_under_a_name_of_its_own(
    db: Database,
) -> None:
    network = db.transact(lambda session: cni.add_network(session, "cninet", CONFLIST))
    assert (network.kind, network.bridge, network.subnet, network.conflist) == (
        "cni",
        None,
        None,
        CONFLIST,
    )
    with pytest.raises(ConflictError, match="already exists"):
        db.transact(lambda session: cni.add_network(session, "cninet", CONFLIST))


def test_an_attachment_is_recorded_before_add_gets_its_result_and_is_forgotten_after_del(
    db: Database,
) -> None:
    (vm_id,) = make_vms(db, 1)
    db.transact(lambda session: cni.record(session, "vm-0", 0, "cninet", ATTACHMENT))
    with db.read() as session:
        (stored,) = cni.of_vm(session, "vm-0")
    assert stored == cni.StoredAttachment("vm-0", 0, "cninet", ATTACHMENT, None, vm_id)

    db.transact(lambda session: cni.set_result(session, "vm-0", 0, RESULT))
    with db.read() as session:
        assert [s.result for s in cni.of_vm(session, "vm-0")] == [RESULT]
        assert cni.of_vm(session, "vm-1") == []

    db.transact(lambda session: cni.forget(session, "vm-0", 0))
    db.transact(lambda session: cni.forget(session, "vm-0", 0))  # nothing left: nothing done
    with db.read() as session:
        assert cni.every(session) == []


def test_an_interface_has_one_attachment_until_it_is_forgotten(db: Database) -> None:
    make_vms(db, 1)
    db.transact(lambda session: cni.record(session, "vm-0", 0, "cninet", ATTACHMENT))
    with pytest.raises(ConflictError, match="CNI DEL"):
        db.transact(lambda session: cni.record(session, "vm-0", 0, "other", ATTACHMENT))
    db.transact(lambda session: cni.record(session, "vm-0", 1, "other", ATTACHMENT))
    with db.read() as session:
        assert [(s.index, s.network) for s in cni.of_vm(session, "vm-0")] == [
            (0, "cninet"),
            (1, "other"),
        ]
    with pytest.raises(ConflictError, match="no CNI attachment"):
        db.transact(lambda session: cni.set_result(session, "vm-0", 2, RESULT))


def test_an_attachment_outlives_its_vms_record_until_del_has_run(db: Database) -> None:
    make_vms(db, 2)
    for vm in ("vm-0", "vm-1"):
        db.transact(lambda session, vm=vm: cni.record(session, vm, 0, "cninet", ATTACHMENT))
    db.transact(lambda session: session.execute(delete(VM).where(VM.name == "vm-0")))
    with db.read() as session:
        kept = cni.every(session)
    assert [(s.vm, s.vm_id is None, s.attachment) for s in kept] == [
        ("vm-0", True, ATTACHMENT),
        ("vm-1", False, ATTACHMENT),
    ]
    # a VM made again under the name finds what its namesake left, to DEL it first
    make_vms(db, 1)
    with db.read() as session:
        assert [s.vm for s in cni.of_vm(session, "vm-0")] == ["vm-0"]
