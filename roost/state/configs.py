"""A VM's config versions: create is version 1, each patch that changes something adds one.

A version keeps the config as given (normalised), the manifest and artifacts of the plugin it
was made against (a patch copies them on: it never upgrades the plugin), and what it resolved
to (`effective`: network with the address this version was given, resources, VMM).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select

from roost.state.models import VM, VMConfigVersion, timestamp

_ADD = insert(VMConfigVersion)
_COLUMNS = (
    VMConfigVersion.version,
    VMConfigVersion.config,
    VMConfigVersion.manifest,
    VMConfigVersion.artifacts,
    VMConfigVersion.effective,
    VMConfigVersion.created_at,
)
_ONE = (
    select(*_COLUMNS)
    .join(VM, VM.id == VMConfigVersion.vm_id)
    .where(VM.name == bindparam("name"), VMConfigVersion.version == bindparam("version"))
)
_LATEST = (
    select(*_COLUMNS)
    .join(VM, (VM.id == VMConfigVersion.vm_id) & (VM.config_version == VMConfigVersion.version))
    .where(VM.name == bindparam("name"))
)
_HISTORY = (
    select(*_COLUMNS)
    .join(VM, VM.id == VMConfigVersion.vm_id)
    .where(VM.name == bindparam("name"))
    .order_by(VMConfigVersion.version.desc())
)


@dataclass(frozen=True)
class ConfigVersion:
    version: int
    config: dict[str, Any]
    manifest: dict[str, Any]
    artifacts: dict[str, Any]
    effective: dict[str, Any]
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        """The API's object for a version: `{"version", "config", "effective", "created_at"}`."""
        return {
            "version": self.version,
            "config": self.config,
            "effective": self.effective,
            "created_at": timestamp(self.created_at),
        }


def add(
    connection: Connection,
    vm_id: int,
    version: int,
    *,
    config: dict[str, Any],
    manifest: dict[str, Any],
    artifacts: dict[str, Any],
    effective: dict[str, Any],
) -> None:
    connection.execute(
        _ADD,
        {
            "vm_id": vm_id,
            "version": version,
            "config": config,
            "manifest": manifest,
            "artifacts": artifacts,
            "effective": effective,
        },
    )


def latest(connection: Connection, name: str) -> ConfigVersion | None:
    row = connection.execute(_LATEST, {"name": name}).first()
    return None if row is None else ConfigVersion(*row)


def version(connection: Connection, name: str, number: int) -> ConfigVersion | None:
    row = connection.execute(_ONE, {"name": name, "version": number}).first()
    return None if row is None else ConfigVersion(*row)


def history(connection: Connection, name: str) -> list[ConfigVersion]:
    """Every version of the VM, newest first."""
    return [ConfigVersion(*row) for row in connection.execute(_HISTORY, {"name": name})]
