"""The artifact store under a daemon: a full store is 507 `no_space` (a small tmpfs stands in
for a full disk), installs and removes racing over the API never leave a plugin without its
files, and a TCP client reads only what --artifact-dir allows."""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from roost.engine.plugins import Plugins
from roost.errors import NoSpaceError
from roost.spec import Manifest
from roost.state.artifacts import ArtifactStore
from roost.state.db import Database, sqlite_url
from tests.harness import Daemon

pytestmark = [pytest.mark.root]

MIB = 1 << 20


@contextlib.contextmanager
def small_filesystem(directory: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` mounted on `directory` (made if missing), always unmounted."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True
    )
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def manifest_data(name: str, initramfs: Path) -> dict[str, object]:
    return {"name": name, "version": "1", "initramfs": {"path": str(initramfs)}}


def test_a_full_store_is_no_space_with_what_to_do_and_keeps_nothing_of_the_attempt(
    tmp_path: Path,
) -> None:
    (tmp_path / "big").write_bytes(b"b" * 3 * MIB)
    (tmp_path / "small").write_bytes(b"s" * 4096)
    db = Database(sqlite_url(tmp_path))
    db.migrate()
    try:
        with small_filesystem(tmp_path / "store") as root:
            plugins = Plugins(db, ArtifactStore(root))
            with pytest.raises(NoSpaceError) as caught:
                plugins.install(
                    Manifest.model_validate(manifest_data("big", tmp_path / "big")), force=False
                )
            assert caught.value.http_status == 507
            assert caught.value.code == "no_space"
            assert f"the artifact store's filesystem ({root}/sha256) is full" in str(caught.value)
            assert "free space there, or remove plugins no VM uses" in str(caught.value)
            assert list((root / "sha256").iterdir()) == []  # not even the partial copy
            plugins.install(
                Manifest.model_validate(manifest_data("small", tmp_path / "small")), force=False
            )
            assert [p["name"] for p in plugins.list()] == ["small"]
    finally:
        db.dispose()


@pytest.mark.firecracker
def test_a_daemon_whose_store_is_full_answers_507_and_the_cli_exits_6(
    netns: str, tmp_path: Path
) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"b" * 3 * MIB)
    daemon = Daemon(netns)
    try:
        with small_filesystem(daemon.state_dir / "artifacts"):
            try:
                daemon.start()
                answer = daemon.http.post("/v1/plugins", json=manifest_data("big", big))
                assert answer.status_code == 507
                error = answer.json()["error"]
                assert error["code"] == "no_space"
                assert "is full" in error["message"]
                manifest = tmp_path / "big.json"
                manifest.write_text(answer.request.content.decode())
                result = daemon.cli("plugin", "install", manifest, "--json")
                assert result.exit_code == 6
                assert result.json()["error"]["code"] == "no_space"
            finally:
                daemon.stop()  # before the unmount: the daemon must not hold the store open
    finally:
        daemon.close()


@pytest.mark.firecracker
def test_installs_and_removes_racing_over_the_api_leave_every_plugin_its_files(
    daemon: Daemon, tmp_path: Path
) -> None:
    sources = []
    for number in range(4):
        path = tmp_path / f"artifact-{number}"
        path.write_bytes(bytes([number]) * 65536)
        sources.append(path)
    stored = daemon.state_dir / "artifacts" / "sha256"
    lost: list[str] = []
    failures: list[str] = []

    def worker(number: int) -> None:
        name = f"p{number}"
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(daemon.socket)), base_url="http://roost"
        ) as client:
            for round_ in range(12):
                source = sources[(number + round_) % len(sources)]
                answer = client.post(
                    "/v1/plugins", params={"force": "true"}, json=manifest_data(name, source)
                )
                if answer.status_code != 201:
                    failures.append(f"{name}: {answer.status_code} {answer.text}")
                    return
                sha256 = answer.json()["artifacts"]["initramfs"]["sha256"]
                if not (stored / sha256).exists():
                    lost.append(f"{name} round {round_}")
                if round_ % 3 == 2:
                    client.delete(f"/v1/plugins/{name}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert lost == []
    for plugin in daemon.ok("plugin", "list"):
        for item in plugin["artifacts"].values():
            assert (stored / item["sha256"]).exists(), plugin["name"]


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.firecracker
def test_a_tcp_client_installs_only_from_the_artifact_dirs_and_a_unix_socket_one_from_anywhere(
    netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "initramfs.cpio").write_bytes(b"allowed")
    (allowed / "escape").symlink_to("/etc/shadow")
    outside = tmp_path / "outside.cpio"
    outside.write_bytes(b"outside")
    token = secrets.token_hex(16)
    monkeypatch.setenv("ROOST_TOKEN", token)
    port = free_loopback_port()
    daemon = Daemon(netns, "--listen", f"tcp://127.0.0.1:{port}", "--artifact-dir", str(allowed))
    try:
        daemon.start()
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {token}"}
        ) as tcp:
            for path in (outside, allowed / "escape", Path("/proc/self/environ")):
                answer = tcp.post("/v1/plugins", json=manifest_data("p", path))
                assert answer.status_code == 422, path
                [detail] = answer.json()["error"]["details"]
                assert detail["loc"] == "initramfs.path"
                assert "--artifact-dir" in detail["msg"]
            answer = tcp.post("/v1/plugins", json=manifest_data("p", allowed / "initramfs.cpio"))
            assert answer.status_code == 201, answer.text
        answer = daemon.http.post(
            "/v1/plugins", params={"force": "true"}, json=manifest_data("p", outside)
        )
        assert answer.status_code == 201, answer.text
    finally:
        daemon.close()
