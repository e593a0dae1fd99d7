"""Named networks: a network's kind (on-demand, managed, external), an external network's
optional subnet, and a managed network's IPv6 prefix

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OPTIONAL_WITHOUT_SUBNET = ("subnet", "gateway", "first", "last", "next_hint")
TYPES: dict[str, sa.types.TypeEngine[Any]] = {
    "subnet": sa.String(length=18),
    "gateway": sa.String(length=15),
    "first": sa.BigInteger(),
    "last": sa.BigInteger(),
    "next_hint": sa.BigInteger(),
}


def upgrade() -> None:
    # every network so far was made by a subnet in a config (or is the default network)
    with op.batch_alter_table("networks") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="on-demand")
        )
        batch.add_column(sa.Column("ipv6_prefix", sa.String(length=43), nullable=True))
        for column in OPTIONAL_WITHOUT_SUBNET:
            batch.alter_column(column, existing_type=TYPES[column], nullable=True)
        batch.create_check_constraint("kind", "kind IN ('on-demand', 'managed', 'external')")
        batch.create_check_constraint("subnet", "kind = 'external' OR subnet IS NOT NULL")


def downgrade() -> None:
    # the old schema knows only networks with a subnet, each removed with its last lease
    op.execute("DELETE FROM networks WHERE subnet IS NULL")
    with op.batch_alter_table("networks") as batch:
        batch.drop_constraint("subnet", type_="check")
        batch.drop_constraint("kind", type_="check")
        for column in OPTIONAL_WITHOUT_SUBNET:
            batch.alter_column(column, existing_type=TYPES[column], nullable=False)
        batch.drop_column("ipv6_prefix")
        batch.drop_column("kind")
