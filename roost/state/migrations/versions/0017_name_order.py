"""Names in byte order on PostgreSQL: the `name` columns that listings order by and pages
compare (`after=`) — VMs, plugins, networks, policies and hosts — take the collation "C", so a
database created with another collation (en_US.UTF-8 ignores '-' at first, for one) orders and
pages them as SQLite does, by their indexes as before (an ORDER BY ... COLLATE "C" on a column
of another collation would sort instead). SQLite compares bytes already: nothing to do there.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

NAMED = ("vms", "plugins", "networks", "policies", "hosts")


def _collate(collation: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in NAMED:
        op.execute(f'ALTER TABLE {table} ALTER COLUMN name TYPE varchar(63) COLLATE "{collation}"')


def upgrade() -> None:
    _collate("C")


def downgrade() -> None:
    _collate("default")
