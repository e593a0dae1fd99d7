"""Fixtures shared by the integration and end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.state.db import Database, sqlite_url
from tests.cluster import cluster, fabric, make_cluster  # noqa: F401 (fixtures, see tests/cluster.py)
from tests.harness import (
    FIRECRACKER,
    INITRAMFS,
    KERNEL,
    Daemon,
    missing,
    network_namespace,
    short_tmp,
)
from tests.postgres import PostgresServer, missing_reason

# A test run started in the background by a shell without job control inherits SIGINT ignored,
# and so would every CLI it starts (Python keeps an inherited ignore): the tests that end a CLI
# with Ctrl-C need SIGINT's default back, which exec hands on to the children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip, with the reason, what this machine cannot run."""
    gaps = missing([FIRECRACKER, KERNEL, INITRAMFS])
    reasons = {
        "root": None if os.geteuid() == 0 else "needs root (network namespaces)",
        "firecracker": (
            f"needs the test Firecracker binary and guest ({', '.join(gaps)}); run make setup"
            if gaps
            else None
        ),
        "kvm": None if Path("/dev/kvm").exists() else "Firecracker guests need /dev/kvm",
        "e2e": "needs build/demo; run make setup" if missing([KERNEL, INITRAMFS]) else None,
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def netns() -> Iterator[str]:
    with network_namespace() as name:
        yield name


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (tests/postgres.py), made when a test
    first asks for it; skipped, saying why, only where PostgreSQL is not installed."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database's URL, on each backend in turn: what the state layer promises holds
    on both."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.database()


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """As `database_url`, with roost's schema at head (on PostgreSQL a copy of a database
    migrated once per session)."""
    if request.param == "sqlite":
        database = Database(sqlite_url(tmp_path))
        database.migrate()
        database.dispose()
        return database.url
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.database(migrated=True)


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    path = short_tmp()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(netns: str) -> Iterator[Daemon]:
    """A daemon with a dhcp bridge (`brdhcp`, made by the test's "operator") in its netns."""
    from tests.harness import run

    run("ip", "link", "add", "brdhcp", "type", "bridge", netns=netns)
    run("ip", "link", "set", "brdhcp", "up", netns=netns)
    instance = Daemon(netns, "--dhcp-bridge", "brdhcp")
    try:
        yield instance.start()
    finally:
        instance.close()
