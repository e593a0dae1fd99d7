"""A database made before config versions recorded what they resolved to is brought forward:
each version gets its `effective`, a running VM its `running_version`, each lease `current`. One
made before Cloud Hypervisor keeps its VMs and takes its vsock backend; one made before named
networks keeps its networks, as on-demand ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from roost.state.db import MIGRATIONS, Database, sqlite_url


def test_version_two_databases_get_effective_configs_and_running_versions(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
        network = {
            "effective": {
                "mode": "bridged",
                "source": "plugin",
                "subnet": "10.9.0.0/24",
                "gateway": "10.9.0.1",
                "auto_assign": True,
                "ip": "10.9.0.2",
            },
            "plan": {},
            "bridge": "rbr2",
        }
        statements = [
            "INSERT INTO plugins (id, name, version, manifest, installed_at) VALUES "
            "(1, 'p', '1', '{\"resources\": {\"memory_mib\": 64}}', '2026-01-01')",
            "INSERT INTO networks (id, name, bridge, subnet, gateway, first, last, next_hint, "
            "created_at) VALUES (2, 'n', 'rbr2', '10.9.0.0/24', '10.9.0.1', 168361984, "
            "168362239, 168361987, '2026-01-01')",
        ]
        for status, vm_id in (("running", 1), ("stopped", 2)):
            statements += [
                "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, network, "
                f"config_version, created_at, updated_at) VALUES ({vm_id}, 'vm{vm_id}', 1, "
                f"'{status}', 'qemu', '{json.dumps(network)}', 1, '2026-01-01', '2026-01-01')",
                "INSERT INTO vm_configs (vm_id, version, config, manifest, artifacts, "
                f'created_at) VALUES ({vm_id}, 1, \'{{"plugin": "p", "resources": '
                f'{{"vcpus": 2}}}}\', \'{{"resources": {{"memory_mib": 64}}}}\', \'{{}}\', '
                "'2026-01-01')",
                "INSERT INTO ip_leases (network_id, ip, vm_id, created_at) VALUES "
                f"(2, {168361985 + vm_id}, {vm_id}, '2026-01-01')",
                f"INSERT INTO cid_leases (cid, vm_id) VALUES ({2 + vm_id}, {vm_id})",
            ]
        statements.append("INSERT INTO pending_creates (name, started_at) VALUES ('x', '2026')")
        for statement in statements:
            connection.execute(text(statement))
    engine.dispose()

    database = Database(url)
    database.migrate()
    with database.read() as session:
        rows = (
            session.connection()
            .execute(
                text(
                    "SELECT v.name, v.running_version, v.restart_required, c.effective "
                    "FROM vms v JOIN vm_configs c ON c.vm_id = v.id ORDER BY v.name"
                )
            )
            .all()
        )
        kept = (
            session.connection()
            .execute(text("SELECT vm_id, ip, purpose FROM ip_leases ORDER BY vm_id"))
            .all()
        )
        assert [tuple(row) for row in kept] == [
            (1, 168361986, "current"),
            (2, 168361987, "current"),
        ]
        cids = session.connection().execute(text("SELECT cid FROM cid_leases")).scalars()
        assert sorted(cids) == [3, 4]
        pending = session.connection().execute(text("SELECT name FROM pending_creates"))
        assert pending.scalars().all() == ["x"]
    database.dispose()
    expected = {
        "network": network["effective"],
        "resources": {"vcpus": 2, "memory_mib": 64},
        "vmm": "qemu",
    }
    assert [(r.name, r.running_version, bool(r.restart_required)) for r in rows] == [
        ("vm1", 1, False),
        ("vm2", None, False),
    ]
    assert [json.loads(r.effective) for r in rows] == [expected, expected]


def test_version_four_databases_accept_cloud_hypervisors_vsock_and_keep_their_vms(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
        for statement in (
            "INSERT INTO plugins (id, name, version, manifest, installed_at) VALUES "
            "(1, 'p', '1', '{}', '2026-01-01')",
            "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, network, config_version, "
            "vsock_backend, created_at, updated_at) VALUES (1, 'fc', 1, 'running', "
            "'firecracker', '{}', 1, 'firecracker', '2026-01-01', '2026-01-01')",
        ):
            connection.execute(text(statement))
    engine.dispose()

    database = Database(url)
    database.migrate()
    with database.read() as session:
        kept = session.connection().execute(text("SELECT name, vsock_backend FROM vms"))
        assert [tuple(row) for row in kept] == [("fc", "firecracker")]
    database.dispose()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE vms SET vsock_backend = 'cloud-hypervisor'"))
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text("UPDATE vms SET vsock_backend = 'hypervisor'"))
    engine.dispose()


def test_version_five_databases_keep_their_networks_as_on_demand_ones_and_take_named_ones(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0005")
        connection.execute(
            text(
                "INSERT INTO networks (id, name, bridge, subnet, gateway, first, last, next_hint, "
                "created_at) VALUES (1, 'default', 'roost0', '10.57.0.0/24', '10.57.0.1', "
                "171507712, 171507967, 171507713, '2026-01-01')"
            )
        )
    engine.dispose()

    database = Database(url)
    database.migrate()
    with database.read() as session:
        rows = session.connection().execute(text("SELECT name, kind, ipv6_prefix FROM networks"))
        assert [tuple(row) for row in rows] == [("default", "on-demand", None)]
    database.dispose()
    engine = create_engine(url)
    with engine.begin() as connection:  # an external network needs no subnet
        connection.execute(
            text(
                "INSERT INTO networks (name, kind, bridge, created_at) "
                "VALUES ('ext', 'external', 'br-ext', '2026-01-01')"
            )
        )
    for kind in ("managed", "bridge"):  # a managed one does; and there are three kinds
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO networks (name, kind, bridge, created_at) "
                    f"VALUES ('n', '{kind}', 'br-n', '2026-01-01')"
                )
            )
    engine.dispose()
