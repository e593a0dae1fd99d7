"""config versions: what each resolved to, the version a VMM runs, reserved addresses

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

LIVE = ("starting", "running", "paused", "stopping")


def _effective(network: dict[str, Any], config: Any, manifest: Any, vmm: str) -> dict[str, Any]:
    """What a version recorded before this migration resolved to (its VM's recorded network,
    its resources, its VMM): every VM had only its first version then."""

    def loaded(value: Any) -> dict[str, Any]:
        return dict(json.loads(value) if isinstance(value, str) else value or {})

    resources = {"vcpus": 1, "memory_mib": 128}
    resources.update(loaded(manifest).get("resources") or {})
    resources.update(loaded(config).get("resources") or {})
    return {"network": loaded(network).get("effective"), "resources": resources, "vmm": vmm}


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("running_version", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("restart_required", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.create_check_constraint(
            "running_version", "running_version IS NULL OR running_version <= config_version"
        )
        batch.create_check_constraint(
            "restart_required", "NOT restart_required OR running_version IS NOT NULL"
        )
    with op.batch_alter_table("vm_configs") as batch:
        batch.add_column(sa.Column("effective", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("ip_leases") as batch:
        batch.add_column(
            sa.Column("purpose", sa.String(length=8), nullable=False, server_default="current")
        )
        batch.drop_constraint("uq_ip_leases_vm_id", type_="unique")
        batch.create_unique_constraint("uq_ip_leases_vm_id", ["vm_id", "purpose"])
        batch.create_check_constraint("purpose", "purpose IN ('current', 'reserved')")

    connection = op.get_bind()
    rows = connection.execute(
        sa.text(
            "SELECT c.vm_id, c.version, c.config, c.manifest, v.network, v.vmm_kind, v.status, "
            "v.config_version FROM vm_configs c JOIN vms v ON v.id = c.vm_id"
        )
    ).all()
    for row in rows:
        effective = _effective(row.network, row.config, row.manifest, row.vmm_kind)
        connection.execute(
            sa.text("UPDATE vm_configs SET effective = :e WHERE vm_id = :v AND version = :n"),
            {"e": json.dumps(effective), "v": row.vm_id, "n": row.version},
        )
        if row.status in LIVE and row.version == row.config_version:
            connection.execute(
                sa.text("UPDATE vms SET running_version = :n WHERE id = :v"),
                {"n": row.version, "v": row.vm_id},
            )


def downgrade() -> None:
    with op.batch_alter_table("ip_leases") as batch:
        batch.drop_constraint(op.f("ck_ip_leases_purpose"), type_="check")
        batch.drop_constraint("uq_ip_leases_vm_id", type_="unique")
        batch.create_unique_constraint("uq_ip_leases_vm_id", ["vm_id"])
        batch.drop_column("purpose")
    with op.batch_alter_table("vm_configs") as batch:
        batch.drop_column("effective")
    with op.batch_alter_table("vms") as batch:
        batch.drop_constraint(op.f("ck_vms_restart_required"), type_="check")
        batch.drop_constraint(op.f("ck_vms_running_version"), type_="check")
        batch.drop_column("restart_required")
        batch.drop_column("running_version")
