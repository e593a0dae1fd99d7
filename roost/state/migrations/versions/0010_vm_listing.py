"""Listing VMs by plugin, status, label and network mode without reading every VM: indexes on
`vms.plugin_id` and `vms.status`; `vm_labels`, each VM's labels as of its latest config version;
`vms.modes`, the modes of the interfaces it has now (`,bridged,dhcp,`; empty for none, a vsock
VM). Both are kept by triggers, so no writer can leave them stale (on PostgreSQL, trigger
functions doing the same: `PG_FUNCTIONS`, `PG_TRIGGERS`). SQLite drops a table's triggers with
it: a later migration that recreates `vms` (batch mode) must create `TRIGGERS` again.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# the distinct modes of a VM's interfaces (its `network` column) between commas
_MODES = (
    "(SELECT coalesce(',' || group_concat(DISTINCT json_extract(value, '$.effective.mode')) || "
    "',', '') FROM json_each({network}, '$.interfaces'))"
)
# the labels of a VM's latest config version, replacing those it had
_RELABEL = """
    DELETE FROM vm_labels WHERE vm_id = {vm_id};
    INSERT INTO vm_labels (vm_id, key, value)
        SELECT c.vm_id, l.key, l.value
        FROM vm_configs c, json_each(c.config, '$.labels') l
        WHERE c.vm_id = {vm_id}
          AND c.version = (SELECT config_version FROM vms WHERE id = {vm_id});
"""
TRIGGERS = {
    "vms_modes_on_insert": (
        "AFTER INSERT ON vms",
        f"UPDATE vms SET modes = {_MODES.format(network='NEW.network')} WHERE id = NEW.id;",
    ),
    "vms_modes_on_update": (
        "AFTER UPDATE OF network ON vms",
        f"UPDATE vms SET modes = {_MODES.format(network='NEW.network')} WHERE id = NEW.id;",
    ),
    # a create's first version, which its VM's record already names
    "vm_labels_on_config": (
        "AFTER INSERT ON vm_configs "
        "WHEN NEW.version = (SELECT config_version FROM vms WHERE id = NEW.vm_id)",
        _RELABEL.format(vm_id="NEW.vm_id"),
    ),
    # a patch's version, once it is made the latest
    "vm_labels_on_latest": (
        "AFTER UPDATE OF config_version ON vms",
        _RELABEL.format(vm_id="NEW.id"),
    ),
}

# PostgreSQL: the same from its JSON functions (`modes`' order may differ: it is only searched)
_PG_MODES = (
    "coalesce(',' || (SELECT string_agg(DISTINCT i -> 'effective' ->> 'mode', ',') "
    "FROM json_array_elements({network} -> 'interfaces') i) || ',', '')"
)
_PG_LABELS = (
    "json_each_text(CASE WHEN json_typeof({config} -> 'labels') = 'object' "
    "THEN {config} -> 'labels' END)"
)
PG_FUNCTIONS = {
    "vm_labels_relabel(vm integer) RETURNS void LANGUAGE sql": f"""
        DELETE FROM vm_labels WHERE vm_id = vm;
        INSERT INTO vm_labels (vm_id, key, value)
            SELECT c.vm_id, l.key, l.value
            FROM vm_configs c, {_PG_LABELS.format(config="c.config")} l
            WHERE c.vm_id = vm AND c.version = (SELECT config_version FROM vms WHERE id = vm);
    """,
    "vms_modes() RETURNS trigger LANGUAGE plpgsql": f"""
        BEGIN
            NEW.modes := {_PG_MODES.format(network="NEW.network")};
            RETURN NEW;
        END
    """,
    "vm_labels_on_config() RETURNS trigger LANGUAGE plpgsql": """
        BEGIN
            IF NEW.version = (SELECT config_version FROM vms WHERE id = NEW.vm_id) THEN
                PERFORM vm_labels_relabel(NEW.vm_id);
            END IF;
            RETURN NULL;
        END
    """,
    "vm_labels_on_latest() RETURNS trigger LANGUAGE plpgsql": """
        BEGIN
            PERFORM vm_labels_relabel(NEW.id);
            RETURN NULL;
        END
    """,
}
PG_TRIGGERS = {
    "vms_modes": "BEFORE INSERT OR UPDATE OF network ON vms",
    "vm_labels_on_config": "AFTER INSERT ON vm_configs",
    "vm_labels_on_latest": "AFTER UPDATE OF config_version ON vms",
}


def _on_postgresql() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(
            sa.Column("modes", sa.String(length=64), nullable=False, server_default="")
        )
        batch.create_index("ix_vms_status", ["status", "name"])
        batch.create_index("ix_vms_plugin_id", ["plugin_id", "name"])
    op.create_table(
        "vm_labels",
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=253), nullable=False),
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.ForeignKeyConstraint(
            ["vm_id"], ["vms.id"], name=op.f("fk_vm_labels_vm_id_vms"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("vm_id", "key", name=op.f("pk_vm_labels")),
    )
    op.create_index("ix_vm_labels_key_value", "vm_labels", ["key", "value", "vm_id"])
    if _on_postgresql():
        op.execute(f"UPDATE vms SET modes = {_PG_MODES.format(network='vms.network')}")
        labels = _PG_LABELS.format(config="c.config")
    else:
        op.execute(f"UPDATE vms SET modes = {_MODES.format(network='vms.network')}")
        labels = "json_each(c.config, '$.labels')"
    op.execute(
        "INSERT INTO vm_labels (vm_id, key, value) "
        "SELECT c.vm_id, l.key, l.value FROM vms v JOIN vm_configs c "
        f"ON c.vm_id = v.id AND c.version = v.config_version, {labels} l"
    )
    if _on_postgresql():
        for signature, body in PG_FUNCTIONS.items():
            op.execute(f"CREATE FUNCTION {signature} AS $${body}$$")
        for name, when in PG_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {when} FOR EACH ROW EXECUTE FUNCTION {name}()")
        return
    for name, (when, body) in TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {when} BEGIN {body} END")


def downgrade() -> None:
    if _on_postgresql():
        for name, when in PG_TRIGGERS.items():
            op.execute(f"DROP TRIGGER {name} ON {when.split()[-1]}")
        for signature in PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION {signature.split(' RETURNS')[0]}")
    else:
        for name in TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
    op.drop_index("ix_vm_labels_key_value", table_name="vm_labels")
    op.drop_table("vm_labels")
    with op.batch_alter_table("vms") as batch:
        batch.drop_index("ix_vms_plugin_id")
        batch.drop_index("ix_vms_status")
        batch.drop_column("modes")
