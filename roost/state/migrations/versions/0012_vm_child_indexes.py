"""Indexes on the two columns referring to a VM that had none, `vsock_forwards.vm_id` and
`cni_attachments.vm_id`: removing a VM makes SQLite find its rows there (the cascade, and the
SET NULL of an attachment kept until DEL), which without an index read each table whole.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_vsock_forwards_vm_id", "vsock_forwards", ["vm_id"])
    op.create_index("ix_cni_attachments_vm_id", "cni_attachments", ["vm_id"])


def downgrade() -> None:
    op.drop_index("ix_cni_attachments_vm_id", table_name="cni_attachments")
    op.drop_index("ix_vsock_forwards_vm_id", table_name="vsock_forwards")
