"""A database made before config versions recorded what they resolved to is brought forward:
each version gets its `effective`, a running VM its `running_version`, each lease `current`. One
made before Cloud Hypervisor keeps its VMs and takes its vsock backend; one made before named
networks keeps its networks, as on-demand ones. One made before several NICs per VM keeps each
VM's NIC as its first interface (and gets it back on a downgrade). Each on SQLite and on
PostgreSQL: one history for both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from roost.state.db import MIGRATIONS, Database


def alembic_config() -> Config:
    """Alembic's configuration for roost's migrations (its connection is given per use)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def decoded(value: Any) -> Any:
    """A JSON column as a query returns it: text from SQLite, decoded already by psycopg."""
    return json.loads(value) if isinstance(value, str) else value


def trigger_names(connection: Connection) -> set[str]:
    """The triggers the database has (PostgreSQL's: on roost's tables, not its own)."""
    if connection.dialect.name == "postgresql":
        query = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
    else:
        query = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    return set(connection.execute(text(query)).scalars())


@contextmanager
def upgraded(engine: Engine, config: Config, revision: str) -> Iterator[Connection]:
    """A transaction on a database just upgraded to `revision` (committed on leaving)."""
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        yield connection


def test_version_two_databases_get_effective_configs_and_running_versions(
    database_url: str,
) -> None:
    url = database_url
    config = alembic_config()
    engine = create_engine(url)
    with upgraded(engine, config, "0002") as connection:
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
        statements.append(
            "INSERT INTO pending_creates (name, started_at) VALUES ('x', '2026-01-01')"
        )
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
        # since 0007, as a list of interfaces too
        "interfaces": [
            {
                "name": "eth0",
                "mode": "bridged",
                "network": None,
                "subnet": "10.9.0.0/24",
                "gateway": "10.9.0.1",
                "auto_assign": True,
                "ip": "10.9.0.2",
                "mac": None,
                "ipv6": None,
                "default_route": True,
            }
        ],
    }
    assert [(r.name, r.running_version, bool(r.restart_required)) for r in rows] == [
        ("vm1", 1, False),
        ("vm2", None, False),
    ]
    assert [decoded(r.effective) for r in rows] == [expected, expected]


def test_version_four_databases_accept_cloud_hypervisors_vsock_and_keep_their_vms(
    database_url: str,
) -> None:
    url = database_url
    config = alembic_config()
    engine = create_engine(url)
    with upgraded(engine, config, "0004") as connection:
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
    database_url: str,
) -> None:
    url = database_url
    config = alembic_config()
    engine = create_engine(url)
    with upgraded(engine, config, "0005") as connection:
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
                "INSERT INTO networks (id, name, kind, bridge, created_at) "
                "VALUES (2, 'ext', 'external', 'br-ext', '2026-01-01')"
            )
        )
    for kind in ("managed", "bridge"):  # a managed one does; and there are three kinds
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO networks (id, name, kind, bridge, created_at) "
                    f"VALUES (3, 'n', '{kind}', 'br-n', '2026-01-01')"
                )
            )
    engine.dispose()


BRIDGED_PLAN = {
    "tap": True,
    "ipam": "auto",
    "nic": True,
    "vsock": True,
    "kernel_ip_arg": "ip=10.57.0.2::10.57.0.1:255.255.255.0:web:eth0:off",
    "attach": "managed",
    "observe_ip": False,
    "antispoof": "ip_and_mac",
}
BRIDGED = {
    "mode": "bridged",
    "source": "default",
    "subnet": "10.57.0.0/24",
    "gateway": "10.57.0.1",
    "auto_assign": True,
    "ip": "10.57.0.2",
}
VSOCK_PLAN = {
    "tap": False,
    "ipam": "none",
    "nic": False,
    "vsock": True,
    "kernel_ip_arg": None,
    "attach": "none",
    "observe_ip": False,
    "antispoof": "none",
}
VSOCK = {"mode": "vsock", "source": "vm"}


def _version_six_with_vms(url: str, config: Config) -> None:
    """A database at 0006 with a bridged VM (its MAC, tap, observed address and lease) and a
    vsock-only one, each with its first config version."""
    engine = create_engine(url)
    with upgraded(engine, config, "0006") as connection:
        for statement, values in (
            (
                "INSERT INTO plugins (id, name, version, manifest, installed_at) VALUES "
                "(1, 'p', '1', '{}', '2026-01-01')",
                {},
            ),
            (
                "INSERT INTO networks (id, name, kind, bridge, subnet, gateway, first, last, "
                "next_hint, created_at) VALUES (1, 'default', 'on-demand', 'roost0', "
                "'10.57.0.0/24', '10.57.0.1', 171507712, 171507967, 171507715, '2026-01-01')",
                {},
            ),
            (
                "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, mac, tap, network, "
                "observed_ip, config_version, created_at, updated_at) VALUES (1, 'web', 1, "
                "'stopped', 'firecracker', '02:00:00:00:00:01', 'rtap1', :network, '10.9.0.9', "
                "1, '2026-01-01', '2026-01-01')",
                {
                    "network": json.dumps(
                        {"effective": BRIDGED, "plan": BRIDGED_PLAN, "bridge": "roost0"}
                    )
                },
            ),
            (
                "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, network, config_version, "
                "created_at, updated_at) VALUES (2, 'quiet', 1, 'created', 'firecracker', "
                ":network, 1, '2026-01-01', '2026-01-01')",
                {"network": json.dumps({"effective": VSOCK, "plan": VSOCK_PLAN, "bridge": None})},
            ),
            (
                "INSERT INTO ip_leases (network_id, ip, vm_id, purpose, created_at) VALUES "
                "(1, 171507714, 1, 'current', '2026-01-01')",
                {},
            ),
        ):
            connection.execute(text(statement), values)
        for vm_id, network in ((1, BRIDGED), (2, VSOCK)):
            effective = {"network": network, "resources": {}, "vmm": "firecracker"}
            connection.execute(
                text(
                    "INSERT INTO vm_configs (vm_id, version, config, manifest, artifacts, "
                    "effective, created_at) VALUES (:vm_id, 1, '{}', '{}', '{}', :effective, "
                    "'2026-01-01')"
                ),
                {"vm_id": vm_id, "effective": json.dumps(effective)},
            )
    engine.dispose()


def test_version_six_databases_move_each_vms_nic_into_its_own_row_and_back(
    database_url: str,
) -> None:
    url = database_url
    config = alembic_config()
    _version_six_with_vms(url, config)

    database = Database(url)
    database.migrate()
    with database.read() as session:
        connection = session.connection()
        nics = connection.execute(
            text('SELECT vm_id, "index", mac, user_mac, tap, observed_ip, ipv6 FROM vm_nics')
        )
        assert [tuple(row) for row in nics] == [
            (1, 0, "02:00:00:00:00:01", None, "rtap1", "10.9.0.9", None)
        ]
        leases = connection.execute(text("SELECT vm_id, interface, purpose FROM ip_leases"))
        assert [tuple(row) for row in leases] == [(1, 0, "current")]
        networks = dict(connection.execute(text("SELECT name, network FROM vms")).all())
        web, quiet = decoded(networks["web"]), decoded(networks["quiet"])
        assert web == {
            "network": BRIDGED,
            "interfaces": [
                {
                    "index": 0,
                    "name": "eth0",
                    "default_route": True,
                    "effective": BRIDGED,
                    "plan": BRIDGED_PLAN,
                    "bridge": "roost0",
                    "ipv6": None,
                }
            ],
        }
        assert (quiet["network"], quiet["interfaces"]) == (VSOCK, [])
        effective = dict(connection.execute(text("SELECT vm_id, effective FROM vm_configs")).all())
        assert decoded(effective[2])["interfaces"] == []
        [interface] = decoded(effective[1])["interfaces"]
        assert interface == {
            "name": "eth0",
            "mode": "bridged",
            "network": None,
            "subnet": "10.57.0.0/24",
            "gateway": "10.57.0.1",
            "auto_assign": True,
            "ip": "10.57.0.2",
            "mac": "02:00:00:00:00:01",  # as a new version has it: else a patch needs a restart
            "ipv6": None,
            "default_route": True,
        }
    database.dispose()

    engine = create_engine(url)
    with engine.begin() as connection:  # a second interface: its own lease, MAC and tap
        connection.execute(
            text(
                'INSERT INTO vm_nics (vm_id, "index", mac, user_mac, tap, ipv6_network_id, ipv6) '
                "VALUES (1, 1, '02:00:00:00:00:02', '02:aa:00:00:00:01', 'rtap1n1', 1, 'fd00::1')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO ip_leases (network_id, ip, vm_id, interface, purpose, created_at) "
                "VALUES (1, 171507715, 1, 1, 'current', '2026-01-01')"
            )
        )
    refused = (
        # one current lease per interface
        "INSERT INTO ip_leases (network_id, ip, vm_id, interface, purpose, created_at) "
        "VALUES (1, 171507716, 1, 1, 'current', '2026-01-01')",
        # roost's MAC, the user's MAC, the tap name and the IPv6 address each have one holder
        "INSERT INTO vm_nics (vm_id, \"index\", mac, tap) VALUES (2, 0, '02:00:00:00:00:02', "
        "'rtap2')",
        'INSERT INTO vm_nics (vm_id, "index", mac, user_mac, tap) VALUES (2, 0, '
        "'02:00:00:00:00:03', '02:aa:00:00:00:01', 'rtap2')",
        "INSERT INTO vm_nics (vm_id, \"index\", mac, tap) VALUES (2, 0, '02:00:00:00:00:03', "
        "'rtap1n1')",
        'INSERT INTO vm_nics (vm_id, "index", mac, tap, ipv6_network_id, ipv6) VALUES (2, 0, '
        "'02:00:00:00:00:03', 'rtap2', 1, 'fd00::1')",
        # at most eight interfaces, and an IPv6 address is on a network
        "INSERT INTO vm_nics (vm_id, \"index\", mac, tap) VALUES (2, 8, '02:00:00:00:00:03', "
        "'rtap2n8')",
        'INSERT INTO vm_nics (vm_id, "index", mac, tap, ipv6) VALUES (2, 0, '
        "'02:00:00:00:00:03', 'rtap2', 'fd00::2')",
    )
    for statement in refused:
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(text(statement))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0006")
    with engine.begin() as connection:
        vms = connection.execute(text("SELECT name, mac, tap, observed_ip, network FROM vms"))
        assert [(*row[:4], decoded(row[4])) for row in vms] == [
            (
                "web",
                "02:00:00:00:00:01",
                "rtap1",
                "10.9.0.9",
                {"effective": BRIDGED, "plan": BRIDGED_PLAN, "bridge": "roost0"},
            ),
            ("quiet", None, None, None, {"effective": VSOCK, "plan": VSOCK_PLAN, "bridge": None}),
        ]
        leases = connection.execute(text("SELECT vm_id, ip, purpose FROM ip_leases"))
        assert [tuple(row) for row in leases] == [(1, 171507714, "current")]
        effective = connection.execute(text("SELECT effective FROM vm_configs ORDER BY vm_id"))
        assert [decoded(row[0])["network"] for row in effective] == [BRIDGED, VSOCK]
    engine.dispose()


def test_version_seven_databases_take_policies_with_unique_names_and_drop_them_back(
    database_url: str,
) -> None:
    config = alembic_config()
    engine = create_engine(database_url)
    with upgraded(engine, config, "0007"):
        pass
    insert = (
        "INSERT INTO policies (name, body, created_at, updated_at) VALUES "
        "('web-in', '{\"name\": \"web-in\", \"ingress\": []}', '2026-01-01', '2026-01-01')"
    )
    with upgraded(engine, config, "0008") as connection:
        connection.execute(text(insert))
        body = connection.execute(text("SELECT body FROM policies")).scalar()
        assert decoded(body) == {"name": "web-in", "ingress": []}
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text(insert))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0007")
    with engine.begin() as connection:
        assert "policies" not in inspect(connection).get_table_names()
    engine.dispose()


def test_version_nine_databases_take_vm_labels_and_modes_kept_by_triggers_and_drop_them_back(
    database_url: str,
) -> None:
    config = alembic_config()
    engine = create_engine(database_url)
    bridged = {"effective": {"mode": "bridged"}}
    dhcp = {"effective": {"mode": "dhcp"}}
    networks = {1: {"interfaces": [bridged, dhcp, bridged]}, 2: {"interfaces": []}}
    with upgraded(engine, config, "0009") as connection:
        connection.execute(
            text(
                "INSERT INTO plugins (id, name, version, manifest, installed_at) VALUES "
                "(1, 'p', '1', '{}', '2026-01-01')"
            )
        )
        for vm_id, network in networks.items():
            connection.execute(
                text(
                    "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, network, "
                    "config_version, created_at, updated_at) VALUES (:id, :name, 1, 'created', "
                    "'qemu', :network, 2, '2026-01-01', '2026-01-01')"
                ),
                {"id": vm_id, "name": f"vm{vm_id}", "network": json.dumps(network)},
            )
            for version, tier in ((1, "old"), (2, "web")):
                connection.execute(
                    text(
                        "INSERT INTO vm_configs (vm_id, version, config, manifest, artifacts, "
                        "effective, created_at) VALUES (:id, :version, :config, '{}', '{}', "
                        "'{}', '2026-01-01')"
                    ),
                    {
                        "id": vm_id,
                        "version": version,
                        "config": json.dumps({"plugin": "p", "labels": {"tier": tier}}),
                    },
                )

    def modes_and_labels(connection: Connection) -> tuple[list[Any], list[Any]]:
        modes = connection.execute(text("SELECT name, modes FROM vms ORDER BY name")).all()
        labels = connection.execute(text("SELECT * FROM vm_labels ORDER BY vm_id, key")).all()
        return [tuple(row) for row in modes], [tuple(row) for row in labels]

    with upgraded(engine, config, "0010") as connection:
        # each VM's modes and the labels of its latest version, from the rows it had
        assert modes_and_labels(connection) == (
            [("vm1", ",bridged,dhcp,"), ("vm2", "")],
            [(1, "tier", "web"), (2, "tier", "web")],
        )
        # the triggers: a new network, a new latest version, a new VM
        connection.execute(
            text("UPDATE vms SET network = :network WHERE id = 2"),
            {"network": json.dumps({"interfaces": [dhcp]})},
        )
        connection.execute(
            text(
                "INSERT INTO vm_configs (vm_id, version, config, manifest, artifacts, effective, "
                'created_at) VALUES (1, 3, \'{"plugin": "p", "labels": {"a": "b"}}\', '
                "'{}', '{}', '{}', '2026-01-01')"
            )
        )
        assert modes_and_labels(connection)[1][0] == (1, "tier", "web")  # not the latest yet
        connection.execute(text("UPDATE vms SET config_version = 3 WHERE id = 1"))
        connection.execute(
            text(
                "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, network, "
                "config_version, created_at, updated_at) VALUES (3, 'vm3', 1, 'created', "
                "'qemu', '{}', 1, '2026-01-01', '2026-01-01')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO vm_configs (vm_id, version, config, manifest, artifacts, effective, "
                'created_at) VALUES (3, 1, \'{"plugin": "p", "labels": {"x": ""}}\', '
                "'{}', '{}', '{}', '2026-01-01')"
            )
        )
        assert modes_and_labels(connection) == (
            [("vm1", ",bridged,dhcp,"), ("vm2", ",dhcp,"), ("vm3", "")],
            [(1, "a", "b"), (2, "tier", "web"), (3, "x", "")],
        )
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0009")
    with engine.begin() as connection:
        assert "vm_labels" not in inspect(connection).get_table_names()
        assert trigger_names(connection) == set()
        columns = inspect(connection).get_columns("vms")
        assert "modes" not in {column["name"] for column in columns}
        names = connection.execute(text("SELECT name FROM vms ORDER BY name")).scalars().all()
        assert names == ["vm1", "vm2", "vm3"]
    engine.dispose()


def test_version_ten_databases_take_the_artifacts_of_each_config_version_kept_by_a_trigger(
    database_url: str,
) -> None:
    config = alembic_config()
    engine = create_engine(database_url)
    insert_version = text(
        "INSERT INTO vm_configs (vm_id, version, config, manifest, artifacts, effective, "
        "created_at) VALUES (1, :version, '{}', '{}', :artifacts, '{}', '2026-01-01')"
    )
    kernel, old, new = ({"sha256": digit * 64, "size": 1} for digit in "abc")
    with upgraded(engine, config, "0010") as connection:
        connection.execute(
            text(
                "INSERT INTO plugins (id, name, version, manifest, installed_at) VALUES "
                "(1, 'p', '1', '{}', '2026-01-01')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, network, "
                "config_version, created_at, updated_at) VALUES (1, 'vm1', 1, 'created', "
                "'qemu', '{}', 1, '2026-01-01', '2026-01-01')"
            )
        )
        artifacts = {"kernel": kernel, "initramfs": old}
        connection.execute(insert_version, {"version": 1, "artifacts": json.dumps(artifacts)})

    def rows(connection: Connection) -> list[Any]:
        found = connection.execute(text("SELECT * FROM vm_artifacts ORDER BY version, role"))
        return [tuple(row) for row in found]

    with upgraded(engine, config, "0011") as connection:
        assert rows(connection) == [(1, 1, "initramfs", "b" * 64), (1, 1, "kernel", "a" * 64)]
        artifacts = {"kernel": kernel, "initramfs": new}
        connection.execute(insert_version, {"version": 2, "artifacts": json.dumps(artifacts)})
        assert rows(connection)[2:] == [(1, 2, "initramfs", "c" * 64), (1, 2, "kernel", "a" * 64)]
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0010")
    with engine.begin() as connection:
        assert "vm_artifacts" not in inspect(connection).get_table_names()
        assert "vm_artifacts_on_config" not in trigger_names(connection)


def test_version_twelve_databases_take_hosts_and_per_host_cids_and_drop_them_back(
    database_url: str,
) -> None:
    config = alembic_config()
    engine = create_engine(database_url)
    with upgraded(engine, config, "0012") as connection:
        for statement in (
            "INSERT INTO plugins (id, name, version, manifest, installed_at) VALUES "
            "(1, 'p', '1', '{}', '2026-01-01')",
            "INSERT INTO networks (id, name, kind, bridge, subnet, gateway, first, last, "
            "next_hint, created_at) VALUES (1, 'default', 'on-demand', 'roost0', "
            "'10.57.0.0/24', '10.57.0.1', 171507712, 171507967, 171507715, '2026-01-01')",
            "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, network, config_version, "
            "created_at, updated_at) VALUES (1, 'vm1', 1, 'created', 'qemu', '{}', 1, "
            "'2026-01-01', '2026-01-01')",
            "INSERT INTO cid_leases (cid, vm_id) VALUES (3, 1)",
        ):
            connection.execute(text(statement))
    add_vm = text(
        "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, network, config_version, "
        "host_id, created_at, updated_at) VALUES (:id, :name, 1, 'created', 'qemu', :network, "
        "1, :host, '2026-01-01', '2026-01-01')"
    )
    add_cid = text("INSERT INTO cid_leases (cid, vm_id, host_id) VALUES (:cid, :vm, :host)")
    network = json.dumps({"interfaces": [{"effective": {"mode": "bridged"}}]})
    with upgraded(engine, config, "0013") as connection:
        assert [tuple(row) for row in connection.execute(text("SELECT * FROM cid_leases"))] == [
            (3, 1, None)
        ]
        for host_id in (1, 2):
            connection.execute(
                text(
                    "INSERT INTO hosts (id, name, vtep_address, api, labels, capacity_vcpus, "
                    "capacity_memory_mib, facts) VALUES (:id, :name, :vtep, 'unix:///x', '{}', "
                    "4, 1024, '{}')"
                ),
                {"id": host_id, "name": f"h{host_id}", "vtep": f"192.0.2.{host_id}"},
            )
        for vm_id, host in ((2, 1), (3, 2), (4, 1)):
            connection.execute(
                add_vm, {"id": vm_id, "name": f"vm{vm_id}", "network": network, "host": host}
            )
        # the same CID on two hosts and on the single host (no host)
        connection.execute(add_cid, {"cid": 3, "vm": 2, "host": 1})
        connection.execute(add_cid, {"cid": 3, "vm": 3, "host": 2})
        modes = connection.execute(text("SELECT modes FROM vms WHERE id = 2")).scalar()
        assert modes == ",bridged,"  # 0010's triggers still keep it
        heartbeat = connection.execute(text("SELECT heartbeat_at FROM hosts WHERE id = 1"))
        assert heartbeat.scalar() is not None
    refused = (
        "INSERT INTO cid_leases (cid, vm_id, host_id) VALUES (3, 4, 1)",  # taken on host 1
        "INSERT INTO cid_leases (cid, vm_id, host_id) VALUES (4, 1, 1)",  # one CID per VM
        "UPDATE hosts SET allocated_vcpus = 5 WHERE id = 1",  # more than its capacity
        "UPDATE hosts SET allocated_memory_mib = -1 WHERE id = 1",
        "UPDATE hosts SET vtep_address = '192.0.2.2' WHERE id = 1",
        "INSERT INTO networks (id, name, kind, bridge, subnet, gateway, first, last, next_hint, "
        "vni, created_at) VALUES (2, 'n2', 'managed', 'rbr2', '10.58.0.0/24', '10.58.0.1', "
        "171573248, 171573503, 171573249, 7, '2026-01-01'), (3, 'n3', 'managed', 'rbr3', "
        "'10.59.0.0/24', '10.59.0.1', 171638784, 171639039, 171638785, 7, '2026-01-01')",
    )
    for statement in refused:
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(text(statement))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0012")
    with engine.begin() as connection:
        assert "hosts" not in inspect(connection).get_table_names()
        kept = connection.execute(text("SELECT cid, vm_id FROM cid_leases"))
        assert [tuple(row) for row in kept] == [(3, 1)]  # other hosts' CIDs are gone
        assert "modes" in {column["name"] for column in inspect(connection).get_columns("vms")}
        assert "vm_labels_on_latest" in trigger_names(connection)
        connection.execute(
            text(
                "INSERT INTO vms (id, name, plugin_id, status, vmm_kind, network, "
                "config_version, created_at, updated_at) VALUES (5, 'vm5', 1, 'created', "
                "'qemu', :network, 1, '2026-01-01', '2026-01-01')"
            ),
            {"network": network},
        )
        modes = connection.execute(text("SELECT modes FROM vms WHERE id = 5")).scalar()
        assert modes == ",bridged,"
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text("INSERT INTO cid_leases (cid, vm_id) VALUES (3, 2)"))
    engine.dispose()


def test_version_fourteen_databases_notify_the_overlay_on_postgresql_and_drop_it_back(
    database_url: str,
) -> None:
    config = alembic_config()
    engine = create_engine(database_url)
    overlay = {f"{table}_overlay_notify" for table in ("vms", "networks", "hosts")}
    with upgraded(engine, config, "0014") as connection:
        before = trigger_names(connection)
    with upgraded(engine, config, "0015") as connection:
        added = trigger_names(connection) - before
    assert added == (overlay if engine.dialect.name == "postgresql" else set())
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0014")
    with engine.begin() as connection:
        assert trigger_names(connection) == before
    engine.dispose()
