"""The address pool: `ip_pool` holds each network's free addresses, so that on PostgreSQL
concurrent allocations claim one each with `FOR UPDATE SKIP LOCKED` instead of queuing on the
network's row until each commit. PostgreSQL fills it for every network with a subnet (all but
its network, broadcast and gateway addresses) and keeps it by triggers: a network made fills
it, a lease taken removes its address, a lease dropped (released, or gone with its VM) puts it
back, `released` saying when. The table exists on SQLite too (one schema) but stays empty:
SQLite's single writer allocates from the leases as before.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# a network's allocatable addresses (as integers): inside its subnet, not its gateway
_ADDRESSES = (
    "SELECT {network}.id, g.ip FROM {source} "
    "generate_series({network}.first + 1, {network}.last - 1) AS g(ip) "
    "WHERE {network}.first IS NOT NULL "
    "AND g.ip IS DISTINCT FROM ({network}.gateway::inet - '0.0.0.0'::inet)"
)
_FUNCTIONS = (
    "CREATE FUNCTION ip_pool_fill() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"INSERT INTO ip_pool (network_id, ip) {_ADDRESSES.format(network='NEW', source='')}; "
    "RETURN NULL; END $$",
    "CREATE FUNCTION ip_pool_take() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "DELETE FROM ip_pool WHERE network_id = NEW.network_id AND ip = NEW.ip; "
    "RETURN NULL; END $$",
    # only an address the pool had: never the gateway, even if a lease held it
    "CREATE FUNCTION ip_pool_give() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO ip_pool (network_id, ip, released) SELECT n.id, OLD.ip, "
    "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint FROM networks n "
    "WHERE n.id = OLD.network_id AND OLD.ip > n.first AND OLD.ip < n.last "
    "AND OLD.ip IS DISTINCT FROM (n.gateway::inet - '0.0.0.0'::inet) "
    "ON CONFLICT DO NOTHING; RETURN NULL; END $$",
)
_TRIGGERS = (
    "CREATE TRIGGER ip_pool_fill AFTER INSERT ON networks "
    "FOR EACH ROW EXECUTE FUNCTION ip_pool_fill()",
    "CREATE TRIGGER ip_pool_take AFTER INSERT ON ip_leases "
    "FOR EACH ROW EXECUTE FUNCTION ip_pool_take()",
    "CREATE TRIGGER ip_pool_give AFTER DELETE ON ip_leases "
    "FOR EACH ROW EXECUTE FUNCTION ip_pool_give()",
)


def upgrade() -> None:
    op.create_table(
        "ip_pool",
        sa.Column("network_id", sa.Integer(), nullable=False),
        sa.Column("ip", sa.BigInteger(), nullable=False),
        sa.Column("released", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["network_id"],
            ["networks.id"],
            name=op.f("fk_ip_pool_network_id_networks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("network_id", "ip", name=op.f("pk_ip_pool")),
    )
    op.create_index("ix_ip_pool_network_id", "ip_pool", ["network_id", "released", "ip"])
    if op.get_bind().dialect.name != "postgresql":
        return
    free = _ADDRESSES.format(network="n", source="networks n,")
    op.execute(
        f"INSERT INTO ip_pool (network_id, ip) {free} "
        "AND NOT EXISTS (SELECT 1 FROM ip_leases l WHERE l.network_id = n.id AND l.ip = g.ip)"
    )
    for statement in (*_FUNCTIONS, *_TRIGGERS):
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER ip_pool_give ON ip_leases")
        op.execute("DROP TRIGGER ip_pool_take ON ip_leases")
        op.execute("DROP TRIGGER ip_pool_fill ON networks")
        op.execute("DROP FUNCTION ip_pool_give(), ip_pool_take(), ip_pool_fill()")
    op.drop_index("ix_ip_pool_network_id", table_name="ip_pool")
    op.drop_table("ip_pool")
