"""A cluster of hosts on one PostgreSQL database: `hosts` (membership, capacity never exceeded:
a constraint), the host a VM lives on and what it reserves there, vsock CIDs unique per host
(a unique index over (coalesce(host_id, 0), cid), as single-host CIDs have no host; the VM is
now the lease's key), and per network a VXLAN id, an MTU, the host carrying its gateway and
the host a host-local network belongs to, and the host a pending create began on. Network
names stay unique across the cluster.

On SQLite, adding a foreign key recreates the table (batch mode), which drops `vms`' triggers of
0010 and would trip over `vm_labels_on_config`, which names `vms`: they are dropped first and
created again after. The recreated `vms` and `networks` get back the AUTOINCREMENT their models
ask for (a batch recreate in 0007/0009 had lost it), so ids, and with them tap names, are never
reused.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_LISTING = importlib.import_module("roost.state.migrations.versions.0010_vm_listing")
_AUTOINCREMENT = {"sqlite_autoincrement": True}


def _on_sqlite() -> bool:
    return bool(op.get_bind().dialect.name == "sqlite")


@contextmanager
def _without_sqlite_triggers() -> Iterator[None]:
    """Drop 0010's SQLite triggers while `vms` is recreated, and create them again after."""
    sqlite = _on_sqlite()
    if sqlite:
        for name in _LISTING.TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
    yield
    if sqlite:
        for name, (when, body) in _LISTING.TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {when} BEGIN {body} END")


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("vtep_address", sa.String(length=45), nullable=False),
        sa.Column("api", sa.Text(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("capacity_vcpus", sa.Integer(), nullable=False),
        sa.Column("capacity_memory_mib", sa.BigInteger(), nullable=False),
        sa.Column("allocated_vcpus", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("allocated_memory_mib", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("cordoned", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column(
            "heartbeat_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("offline_noted", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column(
            "joined_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint(
            "allocated_vcpus BETWEEN 0 AND capacity_vcpus",
            name=op.f("ck_hosts_allocated_vcpus"),
        ),
        sa.CheckConstraint(
            "allocated_memory_mib BETWEEN 0 AND capacity_memory_mib",
            name=op.f("ck_hosts_allocated_memory_mib"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hosts")),
        sa.UniqueConstraint("name", name=op.f("uq_hosts_name")),
        sa.UniqueConstraint("vtep_address", name=op.f("uq_hosts_vtep_address")),
        sqlite_autoincrement=True,
    )
    with (
        _without_sqlite_triggers(),
        op.batch_alter_table("vms", table_kwargs=_AUTOINCREMENT) as batch,
    ):
        batch.add_column(sa.Column("host_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reserved_vcpus", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reserved_memory_mib", sa.BigInteger(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_vms_host_id_hosts"), "hosts", ["host_id"], ["id"], ondelete="RESTRICT"
        )
        batch.create_index("ix_vms_host_id", ["host_id", "name"])
    with op.batch_alter_table("cid_leases") as batch:
        batch.add_column(sa.Column("host_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_cid_leases_host_id_hosts"), "hosts", ["host_id"], ["id"], ondelete="RESTRICT"
        )
        batch.drop_constraint(op.f("uq_cid_leases_vm_id"), type_="unique")
        batch.drop_constraint(op.f("pk_cid_leases"), type_="primary")
        batch.create_primary_key(op.f("pk_cid_leases"), ["vm_id"])
    op.create_index(
        "uq_cid_leases_host_cid",
        "cid_leases",
        [sa.text("coalesce(host_id, 0)"), "cid"],
        unique=True,
    )
    with op.batch_alter_table("pending_creates") as batch:
        batch.add_column(sa.Column("host_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_pending_creates_host_id_hosts"),
            "hosts",
            ["host_id"],
            ["id"],
            ondelete="CASCADE",
        )
    with op.batch_alter_table("networks", table_kwargs=_AUTOINCREMENT) as batch:
        batch.add_column(sa.Column("vni", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("mtu", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("gateway_host_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("host_id", sa.Integer(), nullable=True))
        batch.create_unique_constraint(op.f("uq_networks_vni"), ["vni"])
        batch.create_foreign_key(
            op.f("fk_networks_gateway_host_id_hosts"),
            "hosts",
            ["gateway_host_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_foreign_key(
            op.f("fk_networks_host_id_hosts"), "hosts", ["host_id"], ["id"], ondelete="RESTRICT"
        )


def downgrade() -> None:
    with op.batch_alter_table("networks", table_kwargs=_AUTOINCREMENT) as batch:
        batch.drop_constraint(op.f("fk_networks_host_id_hosts"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_networks_gateway_host_id_hosts"), type_="foreignkey")
        batch.drop_constraint(op.f("uq_networks_vni"), type_="unique")
        batch.drop_column("host_id")
        batch.drop_column("gateway_host_id")
        batch.drop_column("mtu")
        batch.drop_column("vni")
    with op.batch_alter_table("pending_creates") as batch:
        batch.drop_constraint(op.f("fk_pending_creates_host_id_hosts"), type_="foreignkey")
        batch.drop_column("host_id")
    # one host's CIDs: those of other hosts' VMs could be taken twice (a VM without one is
    # given a new one when it next boots)
    op.execute("DELETE FROM cid_leases WHERE host_id IS NOT NULL")
    op.drop_index("uq_cid_leases_host_cid", table_name="cid_leases")
    with op.batch_alter_table("cid_leases") as batch:
        batch.drop_constraint(op.f("fk_cid_leases_host_id_hosts"), type_="foreignkey")
        batch.drop_constraint(op.f("pk_cid_leases"), type_="primary")
        batch.create_primary_key(op.f("pk_cid_leases"), ["cid"])
        batch.create_unique_constraint(op.f("uq_cid_leases_vm_id"), ["vm_id"])
        batch.drop_column("host_id")
    with (
        _without_sqlite_triggers(),
        op.batch_alter_table("vms", table_kwargs=_AUTOINCREMENT) as batch,
    ):
        batch.drop_index("ix_vms_host_id")
        batch.drop_constraint(op.f("fk_vms_host_id_hosts"), type_="foreignkey")
        batch.drop_column("reserved_memory_mib")
        batch.drop_column("reserved_vcpus")
        batch.drop_column("host_id")
    op.drop_table("hosts")
