"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "networks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("bridge", sa.String(length=15), nullable=False),
        sa.Column("subnet", sa.String(length=18), nullable=False),
        sa.Column("gateway", sa.String(length=15), nullable=False),
        sa.Column("first", sa.BigInteger(), nullable=False),
        sa.Column("last", sa.BigInteger(), nullable=False),
        sa.Column("next_hint", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_networks")),
        sa.UniqueConstraint("bridge", name=op.f("uq_networks_bridge")),
        sa.UniqueConstraint("name", name=op.f("uq_networks_name")),
        sa.UniqueConstraint("subnet", name=op.f("uq_networks_subnet")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "plugins",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("installed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plugins")),
        sa.UniqueConstraint("name", name=op.f("uq_plugins_name")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "plugin_artifacts",
        sa.Column("plugin_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["plugin_id"],
            ["plugins.id"],
            name=op.f("fk_plugin_artifacts_plugin_id_plugins"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("plugin_id", "role", name=op.f("pk_plugin_artifacts")),
    )
    with op.batch_alter_table("plugin_artifacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_plugin_artifacts_sha256"), ["sha256"], unique=False)

    op.create_table(
        "vms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("plugin_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("vmm_kind", sa.String(length=32), nullable=False),
        sa.Column("mac", sa.String(length=17), nullable=True),
        sa.Column("tap", sa.String(length=15), nullable=True),
        sa.Column("network", sa.JSON(), nullable=False),
        sa.Column("observed_ip", sa.String(length=15), nullable=True),
        sa.Column("vsock_unavailable", sa.Text(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("supervisor_pid", sa.Integer(), nullable=True),
        sa.Column("config_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["plugin_id"],
            ["plugins.id"],
            name=op.f("fk_vms_plugin_id_plugins"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vms")),
        sa.UniqueConstraint("mac", name=op.f("uq_vms_mac")),
        sa.UniqueConstraint("name", name=op.f("uq_vms_name")),
        sa.UniqueConstraint("tap", name=op.f("uq_vms_tap")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "cid_leases",
        sa.Column("cid", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_cid_leases_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("cid", name=op.f("pk_cid_leases")),
        sa.UniqueConstraint("vm_id", name=op.f("uq_cid_leases_vm_id")),
    )
    op.create_table(
        "ip_leases",
        sa.Column("network_id", sa.Integer(), nullable=False),
        sa.Column("ip", sa.BigInteger(), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["network_id"],
            ["networks.id"],
            name=op.f("fk_ip_leases_network_id_networks"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_ip_leases_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("network_id", "ip", name=op.f("pk_ip_leases")),
        sa.UniqueConstraint("vm_id", name=op.f("uq_ip_leases_vm_id")),
    )
    op.create_table(
        "vm_configs",
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("artifacts", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_vm_configs_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("vm_id", "version", name=op.f("pk_vm_configs")),
    )


def downgrade() -> None:
    op.drop_table("vm_configs")
    op.drop_table("ip_leases")
    op.drop_table("cid_leases")
    op.drop_table("vms")
    with op.batch_alter_table("plugin_artifacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_plugin_artifacts_sha256"))

    op.drop_table("plugin_artifacts")
    op.drop_table("plugins")
    op.drop_table("networks")
