"""CNI in the database, on real SQLite: migration 0009 (networks of kind `cni`, with a conflist
and no bridge; the attachments table) and back; and the attachments a VM's cni interfaces
hold, kept by the VM's name until DEL has run, past the VM's own record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, delete, text
from sqlalchemy.exc import IntegrityError

from roost.errors import ConflictError
from roost.state import cni
from roost.state.db import Database, sqlite_url
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
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
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
        "INSERT INTO networks (name, kind, conflist, created_at) "
        f"VALUES ('cninet', 'cni', '{conflist}', '2026-01-01')",
        'INSERT INTO cni_attachments (vm, "index", network, container_id, netns, ifname, '
        "conflist, args, capability_args, created_at) VALUES ('gone', 0, 'cninet', 'roost-gone', "
        f"'/run/netns/roost-vm-gone', 'eth0', '{conflist}', '{{}}', '{{}}', '2026-01-01')",
    )
    for statement in (
        # a cni network has no bridge, and has a conflist; the other kinds the other way round
        "INSERT INTO networks (name, kind, bridge, conflist, created_at) "
        f"VALUES ('c2', 'cni', 'br-c2', '{conflist}', '2026-01-01')",
        "INSERT INTO networks (name, kind, created_at) VALUES ('c3', 'cni', '2026-01-01')",
        "INSERT INTO networks (name, kind, created_at) VALUES ('e1', 'external', '2026-01-01')",
        "INSERT INTO networks (name, kind, bridge, conflist, created_at) "
        f"VALUES ('e2', 'external', 'br-e2', '{conflist}', '2026-01-01')",
        "INSERT INTO networks (name, kind, bridge, created_at) "
        "VALUES ('m1', 'managed', 'br-m1', '2026-01-01')",
        # one attachment per interface of a VM, and at most eight interfaces
        'INSERT INTO cni_attachments (vm, "index", network, container_id, netns, ifname, '
        "conflist, args, capability_args, created_at) VALUES ('gone', 0, 'x', 'c', 'n', 'eth0', "
        "'{}', '{}', '{}', '2026-01-01')",
        'INSERT INTO cni_attachments (vm, "index", network, container_id, netns, ifname, '
        "conflist, args, capability_args, created_at) VALUES ('gone', 8, 'x', 'c', 'n', 'eth8', "
        "'{}', '{}', '{}', '2026-01-01')",
    ):
        refused(url, statement)

    engine = create_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0008")
    with engine.begin() as connection:
        rows = connection.execute(text("SELECT name, kind, bridge FROM networks"))
        assert [tuple(row) for row in rows] == [("lan", "managed", "rbr1")]
        tables = connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'"))
        assert "cni_attachments" not in {row[0] for row in tables}
    engine.dispose()
    # the old rules again: every network has a bridge, and there are three kinds
    refused(url, "INSERT INTO networks (name, kind, created_at) VALUES ('e', 'external', '2026')")
    refused(
        url,
        "INSERT INTO networks (name, kind, bridge, created_at) VALUES ('c', 'cni', 'b', '2026')",
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(sqlite_url(tmp_path))
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
