"""CNI: a fourth kind of network, `cni`, with an inline conflist and no bridge or subnet; and
each VM interface's attachment to a CNI network (what ADD ran with, and its result), kept by
the VM's name until DEL has run, so a daemon that died between the two can still DEL

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("networks") as batch:
        batch.add_column(sa.Column("conflist", sa.JSON(), nullable=True))
        batch.alter_column("bridge", existing_type=sa.String(length=15), nullable=True)
        batch.drop_constraint("subnet", type_="check")
        batch.drop_constraint("kind", type_="check")
        batch.create_check_constraint("kind", "kind IN ('on-demand', 'managed', 'external', 'cni')")
        batch.create_check_constraint("subnet", "kind IN ('external', 'cni') OR subnet IS NOT NULL")
        batch.create_check_constraint("bridge", "(kind = 'cni') = (bridge IS NULL)")
        batch.create_check_constraint("conflist", "(kind = 'cni') = (conflist IS NOT NULL)")
    op.create_table(
        "cni_attachments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vm", sa.String(length=63), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=True),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("network", sa.String(length=255), nullable=False),
        sa.Column("container_id", sa.String(length=255), nullable=False),
        sa.Column("netns", sa.Text(), nullable=False),
        sa.Column("ifname", sa.String(length=15), nullable=False),
        sa.Column("conflist", sa.JSON(), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("capability_args", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint('"index" BETWEEN 0 AND 7', name=op.f("ck_cni_attachments_index")),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_cni_attachments_vm_id_vms"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cni_attachments")),
        sa.UniqueConstraint("vm", "index", name=op.f("uq_cni_attachments_vm")),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    # the old schema knows no CNI: its networks and the attachments to them go
    op.drop_table("cni_attachments")
    op.execute("DELETE FROM networks WHERE kind = 'cni'")
    with op.batch_alter_table("networks") as batch:
        batch.drop_constraint("conflist", type_="check")
        batch.drop_constraint("bridge", type_="check")
        batch.drop_constraint("subnet", type_="check")
        batch.drop_constraint("kind", type_="check")
        batch.create_check_constraint("kind", "kind IN ('on-demand', 'managed', 'external')")
        batch.create_check_constraint("subnet", "kind = 'external' OR subnet IS NOT NULL")
        batch.alter_column("bridge", existing_type=sa.String(length=15), nullable=False)
        batch.drop_column("conflist")
