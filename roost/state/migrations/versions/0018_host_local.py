"""What belongs to one host of a cluster is unique per host, not across the cluster: a network's
name, bridge and subnet (an `external` network and `dhcp` are their host's, `host_id`; the
cluster's own networks have none and count as host 0), a persisted forward's `listen` address
(two hosts may both listen on 127.0.0.1:8080) and a CNI attachment of a VM's interface, which
now records the host that ran ADD (only that host DELs it). Each becomes a unique index over
(coalesce(host_id, 0), ...); `host_id` is filled from the VM where there is one. That a host's
network does not take the name or bridge of a cluster network is checked under the networks
lock (`roost.state.alloc.add_network`). On SQLite every row has host 0: nothing changes.

SQLite recreates the three tables (batch mode) with their AUTOINCREMENT; none of them has
triggers.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

_AUTOINCREMENT = {"sqlite_autoincrement": True}
# table -> the columns unique per host (each its own index), as (index suffix, columns)
_PER_HOST = {
    "networks": [("name", ["name"]), ("bridge", ["bridge"]), ("subnet", ["subnet"])],
    "vsock_forwards": [("listen", ["listen"])],
    "cni_attachments": [("vm", ["vm", '"index"'])],
}
# the cluster-wide unique constraints they replace, as (name, columns)
_CLUSTER_WIDE = {
    "networks": [
        ("uq_networks_name", ["name"]),
        ("uq_networks_bridge", ["bridge"]),
        ("uq_networks_subnet", ["subnet"]),
    ],
    "vsock_forwards": [("uq_vsock_forwards_listen", ["listen"])],
    "cni_attachments": [("uq_cni_attachments_vm", ["vm", "index"])],
}
_FILLED_FROM_VM = ("vsock_forwards", "cni_attachments")


def _index(table: str, suffix: str) -> str:
    return f"uq_{table}_host_{suffix}"


def upgrade() -> None:
    for table in _FILLED_FROM_VM:
        with op.batch_alter_table(table, table_kwargs=_AUTOINCREMENT) as batch:
            batch.add_column(sa.Column("host_id", sa.Integer(), nullable=True))
            batch.create_foreign_key(
                op.f(f"fk_{table}_host_id_hosts"), "hosts", ["host_id"], ["id"], ondelete="RESTRICT"
            )
        op.execute(
            f"UPDATE {table} SET host_id = (SELECT host_id FROM vms WHERE vms.id = {table}.vm_id)"
        )
    for table, constraints in _CLUSTER_WIDE.items():
        with op.batch_alter_table(table, table_kwargs=_AUTOINCREMENT) as batch:
            for name, _ in constraints:
                batch.drop_constraint(name, type_="unique")
        for suffix, columns in _PER_HOST[table]:
            op.create_index(
                _index(table, suffix),
                table,
                [sa.text("coalesce(host_id, 0)"), *(sa.text(column) for column in columns)],
                unique=True,
            )


def downgrade() -> None:
    # one host's rows: another host's forwards and attachments would clash with its own, and
    # its networks are named by that host's VMs alone
    op.execute("DELETE FROM vsock_forwards WHERE host_id IS NOT NULL")
    op.execute("DELETE FROM cni_attachments WHERE host_id IS NOT NULL")
    for table, constraints in _CLUSTER_WIDE.items():
        for suffix, _ in _PER_HOST[table]:
            op.drop_index(_index(table, suffix), table_name=table)
        with op.batch_alter_table(table, table_kwargs=_AUTOINCREMENT) as batch:
            for name, columns in constraints:
                batch.create_unique_constraint(name, columns)
    for table in _FILLED_FROM_VM:
        with op.batch_alter_table(table, table_kwargs=_AUTOINCREMENT) as batch:
            batch.drop_constraint(op.f(f"fk_{table}_host_id_hosts"), type_="foreignkey")
            batch.drop_column("host_id")
