"""Names list and page in byte order on both backends, whatever the PostgreSQL database's
collation: here one made with ICU's en-US ignoring punctuation at first (as glibc's en_US.UTF-8
does; this machine has no such locale), where 'a-c' sorts after 'ab' unless the columns say
"C" (migration 0017)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from roost.state.db import Database, sqlite_url
from roost.state.models import VM, Host, Network, Plugin, Policy
from roost.state.vms import VMQuery, VMRecords
from tests.postgres import PostgresServer

NAMES = ["b-a", "a-c", "ab", "a", "a-b", "a0", "ba", "a--z", "a-", "aa-b"]
PUNCTUATION_LAST = "en-US-u-ka-shifted"  # '-' ignored at the first level, as en_US.UTF-8


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database(sqlite_url(tmp_path))
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        name = f"icu_{secrets.token_hex(6)}"
        with psycopg.connect(server.conninfo("postgres"), autocommit=True) as connection:
            try:
                connection.execute(
                    f"CREATE DATABASE {name} TEMPLATE template0 LOCALE 'C' "
                    f"LOCALE_PROVIDER icu ICU_LOCALE '{PUNCTUATION_LAST}'"
                )
            except psycopg.Error as error:  # a server built without ICU, or before 15
                pytest.skip(f"no ICU collation to order names otherwise: {error}")
        database = Database(server.url(name))
    database.migrate()
    yield database
    database.dispose()


def add_named(session: Session, name: str) -> None:
    """A row named `name` in each table whose names are listed."""
    plugin = Plugin(name=name, version="1", manifest={})
    session.add_all([plugin, Policy(name=name, body={})])
    session.add(Network(name=name, kind="external", bridge=f"br{len(name)}{name}"[:15]))
    session.add(
        Host(
            name=name,
            vtep_address=f"vtep-{name}",
            api=f"unix:///{name}",
            labels={},
            capacity_vcpus=1,
            capacity_memory_mib=1,
            facts={},
        )
    )
    session.flush()
    session.add(VM(name=name, plugin_id=plugin.id, status="created", vmm_kind="qemu", network={}))


def test_the_postgresql_database_here_orders_names_otherwise(db: Database) -> None:
    """What makes the other test mean something: this database's own order is not bytes'."""
    if db.url.startswith("sqlite"):
        pytest.skip("SQLite compares bytes")
    with db.read() as session:
        ordered = session.execute(
            text("SELECT name FROM unnest(CAST(:names AS text[])) AS name ORDER BY name"),
            {"names": NAMES},
        ).scalars()
        assert list(ordered) != sorted(NAMES)


def test_listings_and_pages_order_names_by_bytes(db: Database) -> None:
    with db.write() as session:
        for name in NAMES:
            add_named(session, name)
    expected = sorted(NAMES)  # ASCII: code points are bytes
    records = VMRecords(db)
    assert records.names_of() == expected
    for index, name in enumerate(expected):
        assert records.names_of(VMQuery(after=name)) == expected[index + 1 :]
        assert records.names_of(VMQuery(after=name, limit=2)) == expected[index + 1 : index + 3]
    with db.read() as session:
        for model in (Plugin, Policy, Network, Host, VM):
            assert list(session.scalars(select(model.name).order_by(model.name))) == expected
