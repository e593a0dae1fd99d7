"""vsock: the backend each VM's VMM was started with, and forwards the daemon holds

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

LIVE = "('starting', 'running', 'paused', 'stopping')"


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("vsock_backend", sa.String(length=16), nullable=True))
        batch.create_check_constraint(
            "vsock_backend", "vsock_backend IN ('firecracker', 'user', 'kernel')"
        )
    # VMMs running across the upgrade were started with the only backends there were then
    op.execute(
        f"UPDATE vms SET vsock_backend = 'firecracker' "
        f"WHERE status IN {LIVE} AND vmm_kind = 'firecracker' AND vsock_unavailable IS NULL"
    )
    op.execute(
        f"UPDATE vms SET vsock_backend = 'kernel' "
        f"WHERE status IN {LIVE} AND vmm_kind = 'qemu' AND vsock_unavailable IS NULL"
    )
    op.create_table(
        "vsock_forwards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("listen", sa.String(length=64), nullable=False),
        sa.Column("guest_port", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "guest_port BETWEEN 1 AND 4294967294", name=op.f("ck_vsock_forwards_guest_port")
        ),
        sa.ForeignKeyConstraint(
            ["vm_id"],
            ["vms.id"],
            name=op.f("fk_vsock_forwards_vm_id_vms"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vsock_forwards")),
        sa.UniqueConstraint("listen", name=op.f("uq_vsock_forwards_listen")),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("vsock_forwards")
    with op.batch_alter_table("vms") as batch:
        batch.drop_constraint("vsock_backend", type_="check")
        batch.drop_column("vsock_backend")
