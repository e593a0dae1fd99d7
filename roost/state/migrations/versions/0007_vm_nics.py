"""Several interfaces per VM: a VM's NICs (roost's MAC and tap name per index, the user's MAC,
the observed address, the IPv6 address held) move from `vms` to `vm_nics`; each lease belongs
to one interface; a VM's planned network and its config versions' `effective` list interfaces

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

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
EFFECTIVE_KEYS = ("mode", "source", "subnet", "gateway", "auto_assign", "ip")


def _interface_json(network: dict[str, Any], mac: str | None) -> dict[str, Any]:
    """The interface a single `network` is, as a config version's `effective` lists it (with
    the MAC the VM keeps, as a new version has it)."""
    named = network.get("network") or ("dhcp" if network["mode"] == "dhcp" else None)
    return {
        "name": "eth0",
        "mode": network["mode"],
        "network": named,
        "subnet": network.get("subnet"),
        "gateway": network.get("gateway"),
        "auto_assign": network.get("auto_assign"),
        "ip": network.get("ip"),
        "mac": mac,
        "ipv6": None,
        "default_route": True,
    }


def _stored(old: dict[str, Any]) -> dict[str, Any]:
    """A VM's planned network ({effective, plan, bridge}) as a list of interfaces."""
    if not old:
        return {}
    effective = old["effective"]
    interfaces = []
    if effective["mode"] != "vsock":
        interfaces.append(
            {
                "index": 0,
                "name": "eth0",
                "default_route": True,
                "effective": effective,
                "plan": old["plan"],
                "bridge": old.get("bridge"),
                "ipv6": None,
            }
        )
    return {"network": effective, "interfaces": interfaces}


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def upgrade() -> None:
    op.create_table(
        "vm_nics",
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("mac", sa.String(length=17), nullable=False),
        sa.Column("user_mac", sa.String(length=17), nullable=True),
        sa.Column("tap", sa.String(length=15), nullable=False),
        sa.Column("observed_ip", sa.String(length=15), nullable=True),
        sa.Column("ipv6_network_id", sa.Integer(), nullable=True),
        sa.Column("ipv6", sa.String(length=39), nullable=True),
        sa.CheckConstraint('"index" BETWEEN 0 AND 7', name=op.f("ck_vm_nics_index")),
        sa.CheckConstraint(
            "(ipv6 IS NULL) = (ipv6_network_id IS NULL)", name=op.f("ck_vm_nics_ipv6")
        ),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_vm_nics_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["ipv6_network_id"],
            ["networks.id"],
            name=op.f("fk_vm_nics_ipv6_network_id_networks"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("vm_id", "index", name=op.f("pk_vm_nics")),
        sa.UniqueConstraint("mac", name=op.f("uq_vm_nics_mac")),
        sa.UniqueConstraint("user_mac", name=op.f("uq_vm_nics_user_mac")),
        sa.UniqueConstraint("tap", name=op.f("uq_vm_nics_tap")),
        sa.UniqueConstraint("ipv6_network_id", "ipv6", name=op.f("uq_vm_nics_ipv6_network_id")),
    )
    # a VM had a MAC and a tap name together (a NIC), once it had been planned with one
    op.execute(
        'INSERT INTO vm_nics (vm_id, "index", mac, tap, observed_ip) '
        "SELECT id, 0, mac, tap, observed_ip FROM vms WHERE mac IS NOT NULL AND tap IS NOT NULL"
    )
    connection = op.get_bind()
    for vm_id, network in connection.execute(sa.text("SELECT id, network FROM vms")).all():
        connection.execute(
            sa.text("UPDATE vms SET network = :network WHERE id = :id"),
            {"id": vm_id, "network": json.dumps(_stored(_loads(network)))},
        )
    first_nics = sa.text('SELECT vm_id, mac FROM vm_nics WHERE "index" = 0')
    macs: dict[int, str] = {vm_id: mac for vm_id, mac in connection.execute(first_nics)}
    versions = connection.execute(sa.text("SELECT vm_id, version, effective FROM vm_configs"))
    for vm_id, number, stored in versions.all():
        effective = _loads(stored)
        network = effective["network"]
        effective["interfaces"] = (
            [] if network["mode"] == "vsock" else [_interface_json(network, macs.get(vm_id))]
        )
        connection.execute(
            sa.text(
                "UPDATE vm_configs SET effective = :effective "
                "WHERE vm_id = :vm_id AND version = :version"
            ),
            {"vm_id": vm_id, "version": number, "effective": json.dumps(effective)},
        )
    with op.batch_alter_table("vms") as batch:
        batch.drop_constraint("uq_vms_mac", type_="unique")
        batch.drop_constraint("uq_vms_tap", type_="unique")
        batch.drop_column("mac")
        batch.drop_column("tap")
        batch.drop_column("observed_ip")
    with op.batch_alter_table("ip_leases") as batch:
        batch.add_column(sa.Column("interface", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_constraint("uq_ip_leases_vm_id", type_="unique")
        batch.create_unique_constraint("uq_ip_leases_vm_id", ["vm_id", "interface", "purpose"])
        batch.create_check_constraint("interface", "interface BETWEEN 0 AND 7")


def _first_network(stored: dict[str, Any]) -> dict[str, Any]:
    """A VM's planned network as the old schema had it: its only (or first) interface's."""
    if not stored:
        return {}
    interfaces = stored["interfaces"]
    if not interfaces:
        return {"effective": stored["network"], "plan": VSOCK_PLAN, "bridge": None}
    first = interfaces[0]
    return {"effective": first["effective"], "plan": first["plan"], "bridge": first["bridge"]}


def _version_network(effective: dict[str, Any]) -> dict[str, Any]:
    if effective.get("network") is not None:
        return dict(effective["network"])
    first = effective["interfaces"][0]
    network = {key: first.get(key) for key in EFFECTIVE_KEYS if first.get(key) is not None}
    network["source"] = "vm"
    return network


def downgrade() -> None:
    # the old schema knows one interface per VM: each keeps its first one, and its leases
    op.execute("DELETE FROM ip_leases WHERE interface > 0")
    with op.batch_alter_table("ip_leases") as batch:
        batch.drop_constraint("interface", type_="check")
        batch.drop_constraint("uq_ip_leases_vm_id", type_="unique")
        batch.create_unique_constraint("uq_ip_leases_vm_id", ["vm_id", "purpose"])
        batch.drop_column("interface")
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("mac", sa.String(length=17), nullable=True))
        batch.add_column(sa.Column("tap", sa.String(length=15), nullable=True))
        batch.add_column(sa.Column("observed_ip", sa.String(length=15), nullable=True))
        batch.create_unique_constraint("uq_vms_mac", ["mac"])
        batch.create_unique_constraint("uq_vms_tap", ["tap"])
    op.execute(
        "UPDATE vms SET (mac, tap, observed_ip) = (SELECT coalesce(n.user_mac, n.mac), n.tap, "
        'n.observed_ip FROM vm_nics n WHERE n.vm_id = vms.id AND n."index" = 0)'
    )
    connection = op.get_bind()
    for vm_id, network in connection.execute(sa.text("SELECT id, network FROM vms")).all():
        connection.execute(
            sa.text("UPDATE vms SET network = :network WHERE id = :id"),
            {"id": vm_id, "network": json.dumps(_first_network(_loads(network)))},
        )
    versions = connection.execute(sa.text("SELECT vm_id, version, effective FROM vm_configs"))
    for vm_id, number, stored in versions.all():
        effective = _loads(stored)
        effective["network"] = _version_network(effective)
        effective.pop("interfaces", None)
        connection.execute(
            sa.text(
                "UPDATE vm_configs SET effective = :effective "
                "WHERE vm_id = :vm_id AND version = :version"
            ),
            {"vm_id": vm_id, "version": number, "effective": json.dumps(effective)},
        )
    op.drop_table("vm_nics")
