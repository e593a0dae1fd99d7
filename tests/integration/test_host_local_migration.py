"""Migration 0018 (host-local names) on SQLite and PostgreSQL: a forward and a CNI attachment
take their VM's host; two hosts may then hold an external network of one name and bridge and
listen on one address, one host still not twice; a downgrade keeps one host's rows and the
cluster-wide uniqueness it had."""

from __future__ import annotations

import importlib

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from tests.integration.test_migrations import alembic_config, upgraded

BEFORE = importlib.import_module("roost.state.migrations.versions.0018_host_local").down_revision

ROWS = (
    "INSERT INTO plugins (id, name, version, manifest, installed_at) VALUES "
    "(1, 'p', '1', '{}', '2026-01-01')",
    "INSERT INTO hosts (id, name, vtep_address, api, labels, capacity_vcpus, "
    "capacity_memory_mib, facts) VALUES (1, 'h1', '192.0.2.1', 'unix:///a', '{}', 4, 1024, '{}'),"
    " (2, 'h2', '192.0.2.2', 'unix:///b', '{}', 4, 1024, '{}')",
    "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, network, config_version, host_id, "
    "created_at, updated_at) VALUES (1, 'a', 1, 'created', 'qemu', '{}', 1, 1, '2026-01-01', "
    "'2026-01-01'), (2, 'b', 1, 'created', 'qemu', '{}', 1, 2, '2026-01-01', '2026-01-01'), "
    "(3, 'c', 1, 'created', 'qemu', '{}', 1, NULL, '2026-01-01', '2026-01-01')",
    "INSERT INTO vsock_forwards (id, vm_id, listen, guest_port, created_at) VALUES "
    "(1, 1, '127.0.0.1:80', 80, '2026-01-01'), (2, 3, '127.0.0.1:81', 80, '2026-01-01')",
    'INSERT INTO cni_attachments (id, vm, vm_id, "index", network, container_id, netns, '
    "ifname, conflist, args, capability_args, created_at) VALUES (1, 'b', 2, 0, 'c', 'x', "
    "'/run/netns/b', 'eth0', '{}', '{}', '{}', '2026-01-01')",
)
EXTERNAL = (
    "INSERT INTO networks (id, name, kind, bridge, host_id, created_at) VALUES "
    "(10 + :host, 'ext', 'external', 'br-ext', :host, '2026-01-01')"
)


def test_forwards_attachments_and_networks_become_unique_per_host_and_back(
    database_url: str,
) -> None:
    config = alembic_config()
    engine = create_engine(database_url)
    with upgraded(engine, config, BEFORE) as connection:
        for statement in ROWS:
            connection.execute(text(statement))
    with upgraded(engine, config, "0018") as connection:
        hosts = connection.execute(text("SELECT id, host_id FROM vsock_forwards ORDER BY id"))
        assert [tuple(row) for row in hosts] == [(1, 1), (2, None)]
        assert connection.execute(text("SELECT host_id FROM cni_attachments")).scalar() == 2
        for host in (1, 2):
            connection.execute(text(EXTERNAL), {"host": host})
        connection.execute(
            text(
                "INSERT INTO vsock_forwards (id, vm_id, listen, guest_port, host_id, created_at) "
                "VALUES (3, 2, '127.0.0.1:80', 80, 2, '2026-01-01')"
            )
        )
    refused = (
        EXTERNAL.replace("10 + :host", "13").replace(":host", "1"),  # one name on a host
        "INSERT INTO vsock_forwards (id, vm_id, listen, guest_port, host_id, created_at) "
        "VALUES (10, 1, '127.0.0.1:80', 81, 1, '2026-01-01')",
        "INSERT INTO vsock_forwards (id, vm_id, listen, guest_port, created_at) "
        "VALUES (11, 3, '127.0.0.1:81', 81, '2026-01-01')",  # a single host's, as before
        'INSERT INTO cni_attachments (id, vm, vm_id, "index", network, container_id, netns, '
        "ifname, conflist, args, capability_args, host_id, created_at) VALUES (10, 'b', 2, 0, "
        "'c', 'x', '/run/netns/b', 'eth0', '{}', '{}', '{}', 2, '2026-01-01')",
    )
    for statement in refused:
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(text(statement))
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM networks WHERE host_id = 2"))
        config.attributes["connection"] = connection
        command.downgrade(config, BEFORE)
    with engine.begin() as connection:
        kept = connection.execute(text("SELECT id FROM vsock_forwards ORDER BY id"))
        assert list(kept.scalars()) == [2]  # a single host's: the hosts' went
        assert connection.execute(text("SELECT count(*) FROM cni_attachments")).scalar() == 0
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO networks (id, name, kind, bridge, created_at) VALUES "
                "(20, 'ext', 'external', 'br-other', '2026-01-01')"
            )
        )
    engine.dispose()
