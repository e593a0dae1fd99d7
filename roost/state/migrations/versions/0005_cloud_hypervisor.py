"""Cloud Hypervisor: its hybrid vsock is a VM's vsock backend too

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_constraint("vsock_backend", type_="check")
        batch.create_check_constraint(
            "vsock_backend",
            "vsock_backend IN ('firecracker', 'cloud-hypervisor', 'user', 'kernel')",
        )


def downgrade() -> None:
    # VMs whose VMM was Cloud Hypervisor's keep their record, without a backend the old
    # schema knows: a started VM records its backend anew
    op.execute("UPDATE vms SET vsock_backend = NULL WHERE vsock_backend = 'cloud-hypervisor'")
    with op.batch_alter_table("vms") as batch:
        batch.drop_constraint("vsock_backend", type_="check")
        batch.create_check_constraint(
            "vsock_backend", "vsock_backend IN ('firecracker', 'user', 'kernel')"
        )
