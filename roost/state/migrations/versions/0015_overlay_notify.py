"""The overlay's notifications: on PostgreSQL, every statement that changes what a host's VXLAN
devices should hold apart from leases — a network made, changed or removed, a host registered
or its VTEP moved, a VM moved to another host — sends NOTIFY `roost_overlay` in its
transaction, so each agent's listener resyncs once the change has committed. Leases are left
out on purpose: a transaction that notifies holds PostgreSQL's one notification lock from its
commit's start to its end (its WAL flush included), so notifying from every create's
allocation would make all creates commit one at a time; the agent whose taps change notifies
after the fact instead (roost.engine.clusternet), and every agent resyncs every second anyway.
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
    ("vms", "UPDATE OF host_id"),
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
