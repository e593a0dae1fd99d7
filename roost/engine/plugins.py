"""Installed plugins: their manifests and the artifacts kept for them in the content store."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, exists, or_, select
from sqlalchemy.orm import Session, selectinload

from roost.engine.events import EventBus
from roost.engine.views import plugin_view
from roost.errors import ConflictError, InvalidError, NotFoundError
from roost.spec import Manifest
from roost.state.artifacts import ArtifactStore, Pins, Progress, StoredArtifact
from roost.state.db import Database
from roost.state.models import VM, Plugin, PluginArtifact, VMArtifact

InstallProgress = Callable[[dict[str, Any]], None]


class Plugins:
    """Installs and removes plugins. `artifact_dirs` are the only directories clients that may
    not read the whole filesystem (`any_path=False`: TCP clients) take local artifacts from.
    Each install and removal is told on `events` once it has committed."""

    def __init__(
        self,
        db: Database,
        store: ArtifactStore,
        artifact_dirs: tuple[Path, ...] = (),
        events: EventBus | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.artifact_dirs = artifact_dirs
        self.events = events or EventBus()

    def install(
        self,
        manifest: Manifest,
        *,
        force: bool,
        progress: InstallProgress | None = None,
        any_path: bool = True,
    ) -> dict[str, Any]:
        """Store the manifest's artifacts (checking sha256s) and record the plugin. Existing
        VMs keep the manifest and artifacts they were created with. `any_path` lets the client
        name any local file (the Unix socket's, root anyway); otherwise only files inside
        `artifact_dirs`. Nobody gets files from /proc, /sys or /dev, or non-regular ones."""
        if not force:
            with self.db.read() as session:
                if find(session, manifest.name, missing_ok=True) is not None:
                    raise _exists(manifest.name)
        allowed_dirs = None if any_path else self.artifact_dirs
        try:
            # the pins are released only once the transaction has committed the references
            with self.store.pinning() as pins:
                stored = self._fetch_all(manifest, pins, allowed_dirs, progress)
                self.db.transact(lambda session: self._record(session, manifest, stored, force))
        finally:
            self.collect_garbage()  # what this install replaced, or stored before it failed
        self.events.publish("plugin.installed", plugin=manifest.name, version=manifest.version)
        return self.show(manifest.name)

    def _fetch_all(
        self,
        manifest: Manifest,
        pins: Pins,
        allowed_dirs: Sequence[Path] | None,
        progress: InstallProgress | None,
    ) -> dict[str, StoredArtifact]:
        stored = {}
        for role, artifact in manifest.artifacts().items():
            source = artifact.path or artifact.url
            assert source is not None
            if progress is not None:
                progress({"event": "artifact", "role": role, "source": source})
            stored[role] = self.store.fetch(
                role,
                artifact,
                pins=pins,
                allowed_dirs=allowed_dirs,
                progress=_artifact_progress(progress, role),
            )
        if "kernel" in stored and not self.store.is_elf(stored["kernel"].sha256):
            raise InvalidError.at(
                "kernel",
                "is not an uncompressed ELF vmlinux (Firecracker boots only those; extract it "
                "from a bzImage with the kernel's scripts/extract-vmlinux)",
            )
        return stored

    @staticmethod
    def _record(
        session: Session, manifest: Manifest, stored: dict[str, StoredArtifact], force: bool
    ) -> None:
        plugin = find(session, manifest.name, missing_ok=True, for_change=True)
        if plugin is not None and not force:
            raise _exists(manifest.name)
        if plugin is None:
            plugin = Plugin(name=manifest.name)
            session.add(plugin)
        plugin.version = manifest.version
        plugin.manifest = manifest.model_dump(mode="json", exclude_none=True)
        plugin.artifacts = [
            PluginArtifact(role=role, sha256=item.sha256, size=item.size)
            for role, item in stored.items()
        ]

    def list(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            plugins = session.scalars(
                select(Plugin).options(selectinload(Plugin.artifacts)).order_by(Plugin.name)
            )
            return [plugin_view(p, users(session, p)) for p in plugins]

    def show(self, name: str) -> dict[str, Any]:
        with self.db.read() as session:
            plugin = find(session, name)
            return plugin_view(plugin, users(session, plugin))

    def remove(self, name: str) -> None:
        def work(session: Session) -> None:
            plugin = find(session, name, for_change=True)
            names = users(session, plugin)
            if names:
                raise ConflictError(
                    f"plugin {name!r} is used by VM(s) {', '.join(names)}; remove them first",
                    code="plugin_in_use",
                )
            session.delete(plugin)

        self.db.transact(work)
        self.events.publish("plugin.removed", plugin=name)
        self.collect_garbage()

    def collect_garbage(self) -> None:
        """Drop stored artifacts no plugin and no VM's config refers to any more."""
        self.store.collect_garbage(self._referenced)

    def _referenced(self, digests: set[str]) -> set[str]:
        """Those of `digests` the database refers to (a plugin's, or a VM config version's:
        one index probe each, however many VMs share a file); the store asks under its lock
        (why that keeps concurrent installs safe: roost.state.artifacts)."""
        with self.db.read() as session:
            connection = session.connection()
            return {
                digest
                for digest in digests
                if connection.execute(_REFERENCED, {"digest": digest}).scalar()
            }


# whether a stored file is referenced: EXISTS stops at the first row (a digest every VM shares
# has as many rows as VMs)
_REFERENCED = select(
    or_(
        exists().where(PluginArtifact.sha256 == bindparam("digest")),
        exists().where(VMArtifact.sha256 == bindparam("digest")),
    )
)


def find(
    session: Session, name: str, *, missing_ok: bool = False, for_change: bool = False
) -> Plugin:
    """The installed plugin `name`; `for_change` (a forced install, a removal) locks its row FOR
    UPDATE until the transaction ends, after any create that read it has committed (their
    references to its artifacts are then seen by what follows: the users check, the
    collection of the artifacts it no longer keeps)."""
    query = select(Plugin).options(selectinload(Plugin.artifacts)).where(Plugin.name == name)
    plugin: Plugin | None = session.scalar(query.with_for_update() if for_change else query)
    if plugin is None and not missing_ok:
        raise NotFoundError(
            f"plugin {name!r} is not installed (roost plugin install FILE installs it)"
        )
    return plugin  # type: ignore[return-value]


def users(session: Session, plugin: Plugin) -> list[str]:
    return list(session.scalars(select(VM.name).where(VM.plugin_id == plugin.id).order_by(VM.name)))


def _exists(name: str) -> ConflictError:
    return ConflictError(
        f"plugin {name!r} is already installed; use --force to replace it (existing VMs keep "
        "the manifest they were created with)",
        code="exists",
    )


def _artifact_progress(progress: InstallProgress | None, role: str) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total: progress(
        {"event": "progress", "role": role, "done": done, "total": total}
    )
