"""Which stored artifacts VMs' config versions refer to, one row each, indexed by digest: kept by a
trigger on `vm_configs` (and gone with its row), so garbage collection after a VM's removal asks
about the few stored files instead of reading every config version's `artifacts` JSON.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# one row per artifact of a config version (`artifacts` is {role: {"sha256", "size"}})
_ARTIFACTS_OF = (
    "INSERT INTO vm_artifacts (vm_id, version, role, sha256) "
    "SELECT {config}.vm_id, {config}.version, a.key, json_extract(a.value, '$.sha256') "
    "FROM {source} json_each({config}.artifacts) a"
)
_PG_ARTIFACTS_OF = (
    "INSERT INTO vm_artifacts (vm_id, version, role, sha256) "
    "SELECT {config}.vm_id, {config}.version, a.key, a.value ->> 'sha256' "
    "FROM {source} json_each({config}.artifacts) a"
)


def upgrade() -> None:
    op.create_table(
        "vm_artifacts",
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["vm_id", "version"],
            ["vm_configs.vm_id", "vm_configs.version"],
            name=op.f("fk_vm_artifacts_vm_id_vm_configs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("vm_id", "version", "role", name=op.f("pk_vm_artifacts")),
    )
    op.create_index("ix_vm_artifacts_sha256", "vm_artifacts", ["sha256"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_ARTIFACTS_OF.format(config="c", source="vm_configs c,"))
        op.execute(
            "CREATE FUNCTION vm_artifacts_on_config() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN {_PG_ARTIFACTS_OF.format(config='NEW', source='')}; RETURN NULL; END $$"
        )
        op.execute(
            "CREATE TRIGGER vm_artifacts_on_config AFTER INSERT ON vm_configs "
            "FOR EACH ROW EXECUTE FUNCTION vm_artifacts_on_config()"
        )
        return
    op.execute(_ARTIFACTS_OF.format(config="c", source="vm_configs c,"))
    op.execute(
        "CREATE TRIGGER vm_artifacts_on_config AFTER INSERT ON vm_configs BEGIN "
        f"{_ARTIFACTS_OF.format(config='NEW', source='')}; END"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER vm_artifacts_on_config ON vm_configs")
        op.execute("DROP FUNCTION vm_artifacts_on_config()")
    else:
        op.execute("DROP TRIGGER vm_artifacts_on_config")
    op.drop_index("ix_vm_artifacts_sha256", table_name="vm_artifacts")
    op.drop_table("vm_artifacts")
