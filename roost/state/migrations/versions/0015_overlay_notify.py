"""The overlay's notifications: on PostgreSQL, every statement that may change what a host's
VXLAN devices should hold — a lease taken or dropped, a VM moved to another host (or removed),
a NIC's MAC changed, a network made, changed or removed, a host registered or its VTEP moved —
sends NOTIFY `roost_overlay` in its transaction, so each agent's listener resyncs once the
change has committed (notifications of one transaction are delivered once, at its commit).
SQLite has no cluster: nothing to do there.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# (table, events): statement-level, so a statement touching many rows notifies once
_WATCHED = (
    ("ip_leases", "INSERT OR DELETE OR UPDATE OF network_id, vm_id, interface, purpose"),
    ("vms", "DELETE OR UPDATE OF host_id"),
    ("vm_nics", "UPDATE OF mac, user_mac"),
    ("networks", "INSERT OR DELETE OR UPDATE OF vni, mtu, bridge, gateway_host_id"),
    ("hosts", "INSERT OR DELETE OR UPDATE OF vtep_address"),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE FUNCTION roost_overlay_notify() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM pg_notify('roost_overlay', ''); RETURN NULL; END $$"
    )
    for table, events in _WATCHED:
        op.execute(
            f"CREATE TRIGGER {table}_overlay_notify AFTER {events} ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION roost_overlay_notify()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, _ in _WATCHED:
        op.execute(f"DROP TRIGGER {table}_overlay_notify ON {table}")
    op.execute("DROP FUNCTION roost_overlay_notify()")
