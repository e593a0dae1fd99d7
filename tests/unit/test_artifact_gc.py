"""Garbage collection never takes a file an installed plugin refers to, however installs,
removes and collections interleave (real SQLite and PostgreSQL, real files, no root)."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from roost.engine.plugins import Plugins
from roost.errors import NotFoundError
from roost.spec import Manifest
from roost.state.artifacts import ArtifactStore
from roost.state.db import Database
from roost.state.models import VM, Plugin, VMConfigVersion

WORKERS = 6
ROUNDS = 15


@pytest.fixture
def plugins(tmp_path: Path, migrated_database_url: str) -> Iterator[Plugins]:
    db = Database(migrated_database_url)
    db.migrate()
    try:
        yield Plugins(db, ArtifactStore(tmp_path / "artifacts"))
    finally:
        db.dispose()


def artifact_pool(directory: Path, count: int) -> list[Path]:
    """Files with distinct contents, which plugins share in varying combinations."""
    directory.mkdir()
    pool = []
    for number in range(count):
        path = directory / f"artifact-{number}"
        path.write_bytes(bytes([number]) * 4096)
        pool.append(path)
    return pool


def manifest(name: str, initramfs: Path, rootfs: Path | None) -> Manifest:
    data: dict[str, object] = {"name": name, "version": "1", "initramfs": {"path": str(initramfs)}}
    if rootfs is not None:
        data["rootfs"] = {"path": str(rootfs)}
    return Manifest.model_validate(data)


def missing_files(plugins: Plugins, name: str) -> list[str]:
    installed = plugins.show(name)
    return [
        f"{name}.{role}"
        for role, item in installed["artifacts"].items()
        if not plugins.store.path(item["sha256"]).exists()
    ]


def test_parallel_installs_removes_and_collections_never_lose_an_installed_plugins_files(
    plugins: Plugins, tmp_path: Path
) -> None:
    pool = artifact_pool(tmp_path / "sources", 5)
    lost: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def worker(number: int) -> None:
        """Installs (force) and removes its own plugin: once an install returns, nobody else
        may take that plugin's files until this worker removes it."""
        name = f"p{number}"
        chance = random.Random(number)
        try:
            for _ in range(ROUNDS):
                rootfs = chance.choice([None, *pool])
                plugins.install(manifest(name, chance.choice(pool), rootfs), force=True)
                lost.extend(missing_files(plugins, name))
                if chance.random() < 0.3:
                    plugins.remove(name)
        except BaseException as error:
            failures.append(error)

    def collector() -> None:
        while not stop.is_set():
            plugins.collect_garbage()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
    sweeper = threading.Thread(target=collector)
    sweeper.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    sweeper.join()

    assert failures == []
    assert lost == []
    for installed in plugins.list():
        assert missing_files(plugins, installed["name"]) == []


def test_a_collection_keeps_what_is_referenced_and_removes_the_rest(
    plugins: Plugins, tmp_path: Path
) -> None:
    first, second = artifact_pool(tmp_path / "sources", 2)
    plugins.install(manifest("a", first, None), force=False)
    plugins.install(manifest("b", second, None), force=False)
    kept = plugins.show("a")["artifacts"]["initramfs"]["sha256"]
    dropped = plugins.show("b")["artifacts"]["initramfs"]["sha256"]
    plugins.remove("b")
    assert plugins.store.path(kept).exists()
    assert not plugins.store.path(dropped).exists()
    with pytest.raises(NotFoundError):
        plugins.show("b")


def test_a_file_only_a_vms_config_version_refers_to_is_kept_until_that_vm_is_removed(
    plugins: Plugins, tmp_path: Path
) -> None:
    first, second = artifact_pool(tmp_path / "sources", 2)
    plugins.install(manifest("a", first, None), force=False)
    artifacts = plugins.show("a")["artifacts"]
    with plugins.db.write() as session:
        plugin_id = session.scalars(select(Plugin.id).where(Plugin.name == "a")).one()
        vm = VM(name="vm-0", plugin_id=plugin_id, status="created", vmm_kind="qemu", network={})
        session.add(vm)
        session.flush()
        session.add(
            VMConfigVersion(
                vm_id=vm.id, version=1, config={}, manifest={}, artifacts=artifacts, effective={}
            )
        )
    plugins.install(manifest("a", second, None), force=True)  # the VM keeps what it was made with
    old = plugins.store.path(artifacts["initramfs"]["sha256"])
    plugins.collect_garbage()
    assert old.exists()
    with plugins.db.write() as session:
        session.execute(delete(VM).where(VM.name == "vm-0"))  # its versions go with it
    plugins.collect_garbage()
    assert not old.exists()
    assert missing_files(plugins, "a") == []
