"""Artifact paths are an API client's way to read the daemon's filesystem: where they may
lead, judged on the file actually opened, and a 422 at `<role>.path` (or `.url`) for every
path refused, never a 500 or a hang (real SQLite, real files, no root)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roost.engine.plugins import Plugins
from roost.errors import InvalidError
from roost.spec import Manifest
from roost.state.artifacts import ArtifactStore
from roost.state.db import Database, sqlite_url


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    """The operator's --artifact-dir, with one good file in it."""
    directory = tmp_path / "allowed"
    directory.mkdir()
    (directory / "initramfs.cpio").write_bytes(b"allowed initramfs")
    return directory


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the allowed directory (stands in for /etc/shadow where it is read)."""
    path = tmp_path / "outside" / "secret"
    path.parent.mkdir()
    path.write_bytes(b"not for TCP clients")
    return path


@pytest.fixture
def plugins(tmp_path: Path, allowed: Path) -> Iterator[Plugins]:
    db = Database(sqlite_url(tmp_path))
    db.migrate()
    try:
        yield Plugins(db, ArtifactStore(tmp_path / "store"), (allowed,))
    finally:
        db.dispose()


def manifest(**initramfs: str) -> Manifest:
    return Manifest.model_validate({"name": "p", "version": "1", "initramfs": initramfs})


def refused(plugins: Plugins, *, any_path: bool, **initramfs: str) -> tuple[str, str]:
    with pytest.raises(InvalidError) as caught:
        plugins.install(manifest(**initramfs), force=True, any_path=any_path)
    [detail] = caught.value.details
    assert not list(plugins.store.root.iterdir()), "a refused install stores nothing"
    return detail.loc, detail.msg


def installed_sha256(plugins: Plugins, *, any_path: bool, **initramfs: str) -> str:
    result = plugins.install(manifest(**initramfs), force=True, any_path=any_path)
    sha256: str = result["artifacts"]["initramfs"]["sha256"]
    assert plugins.store.path(sha256).exists()
    return sha256


@contextlib.contextmanager
def unix_socket(directory: Path) -> Iterator[Path]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = Path.cwd()
    os.chdir(directory)  # a relative bind: tmp_path may be longer than a socket path may be
    try:
        listener.bind("sock")
    finally:
        os.chdir(here)
    try:
        yield directory / "sock"
    finally:
        listener.close()


def special_files(directory: Path) -> dict[str, str]:
    """Paths of every kind no one may install from (the special ones made in `directory`), by
    what the refusal says."""
    loop = directory / "loop"
    loop.symlink_to(loop)
    fifo = directory / "fifo"
    os.mkfifo(fifo)
    (directory / "to-proc").symlink_to("/proc/self/environ")
    (directory / "to-zero").symlink_to("/dev/zero")
    return {
        "/proc/self/environ": "is inside /proc",
        "/sys/kernel/uevent_seqnum": "is inside /sys",
        "/dev/zero": "is inside /dev",
        "/" + "a" * 300: "File name too long",
        "initramfs.cpio": "is a relative path",
        str(directory / "to-proc"): "(which is /proc/",
        str(directory / "to-zero"): "(which is /dev/zero) is inside /dev",
        str(directory): "is a directory",
        str(loop): "Too many levels of symbolic links",
        str(fifo): "is a FIFO, not a regular file",
        str(directory / "missing"): "does not exist",
        str(directory / "initramfs.cpio" / "x"): "Not a directory",
    }


@pytest.mark.parametrize("any_path", [True, False])
def test_pseudo_filesystems_and_files_that_are_not_regular_are_refused_for_everyone(
    plugins: Plugins, allowed: Path, any_path: bool
) -> None:
    """Made inside the allowed dir, so that a TCP client hears the same reason as a local one
    (elsewhere it hears first that the path is outside the allowed dirs)."""
    cases = special_files(allowed)
    with unix_socket(allowed) as sock:
        cases[str(sock)] = "is a socket, not a regular file"
        for path, text in cases.items():
            loc, msg = refused(plugins, any_path=any_path, path=path)
            assert loc == "initramfs.path", path
            outside = path.startswith("/") and not path.startswith(str(allowed))
            expected = "is outside the directories" if outside and not any_path else text
            assert expected in msg, (path, msg)


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("file:///srv/a%00b", "contains a NUL character"),
        ("file:///srv/%FF", "is not valid UTF-8 once %-escapes are decoded"),
        ("file://elsewhere/srv/a", "names host 'elsewhere'"),
        ("file:///proc/self/environ", "is inside /proc"),
        ("file:///dev/zero", "is inside /dev"),
    ],
)
def test_file_urls_are_paths_too(plugins: Plugins, url: str, text: str) -> None:
    loc, msg = refused(plugins, any_path=True, url=url)
    assert loc == "initramfs.url"
    assert text in msg


def test_a_client_that_may_name_any_path_installs_from_outside_the_allowed_dirs(
    plugins: Plugins, secret: Path
) -> None:
    sha256 = installed_sha256(plugins, any_path=True, path=str(secret))
    assert sha256 == hashlib.sha256(secret.read_bytes()).hexdigest()
    installed_sha256(plugins, any_path=True, url=f"file://{secret}")


def test_a_tcp_client_installs_from_an_allowed_dir_and_through_links_that_stay_inside_it(
    plugins: Plugins, allowed: Path
) -> None:
    (allowed / "link").symlink_to("initramfs.cpio")
    (allowed / "sub").mkdir()
    good = hashlib.sha256(b"allowed initramfs").hexdigest()
    for path in ("initramfs.cpio", "link", "sub/../initramfs.cpio"):
        assert installed_sha256(plugins, any_path=False, path=str(allowed / path)) == good
    assert installed_sha256(plugins, any_path=False, url=f"file://{allowed}/link") == good


@pytest.mark.parametrize(
    ("target", "text"),
    [
        ("/etc/shadow", "(which is /etc/shadow) is outside the directories"),
        ("../outside/secret", "/outside/secret) is outside the directories"),
    ],
)
def test_a_tcp_client_cannot_leave_the_allowed_dirs_through_a_link(
    plugins: Plugins, allowed: Path, secret: Path, target: str, text: str
) -> None:
    (allowed / "escape").symlink_to(target)
    loc, msg = refused(plugins, any_path=False, path=str(allowed / "escape"))
    assert loc == "initramfs.path"
    assert text in msg
    assert "start the daemon with --artifact-dir DIR" in msg


@pytest.mark.parametrize(
    "source",
    [
        {"path": "/etc/shadow"},
        {"path": "ALLOWED/../outside/secret"},
        {"url": "file:///etc/shadow"},
        {"url": "file://ALLOWED/../outside/secret"},
    ],
)
def test_a_tcp_client_cannot_name_a_file_outside_the_allowed_dirs(
    plugins: Plugins, allowed: Path, secret: Path, source: dict[str, str]
) -> None:
    [(member, value)] = source.items()
    loc, msg = refused(plugins, any_path=False, **{member: value.replace("ALLOWED", str(allowed))})
    assert loc == f"initramfs.{member}"
    assert f"is outside the directories this daemon takes artifacts from ({allowed})" in msg


def test_without_allowed_dirs_a_tcp_client_is_told_how_to_get_one(
    tmp_path: Path, allowed: Path
) -> None:
    db = Database(sqlite_url(tmp_path))
    db.migrate()
    try:
        plugins = Plugins(db, ArtifactStore(tmp_path / "store"))
        loc, msg = refused(plugins, any_path=False, path=str(allowed / "initramfs.cpio"))
    finally:
        db.dispose()
    assert loc == "initramfs.path"
    assert "start the daemon with --artifact-dir DIR" in msg


def test_a_link_swapped_while_installing_never_lets_an_outside_file_in(
    plugins: Plugins, allowed: Path, secret: Path
) -> None:
    """Each of a directory link and a file link flips between inside and outside the allowed
    dir as fast as it can while a TCP client installs through them: every install either
    stores the allowed file or is refused; the outside file is never stored."""
    (allowed / "dir-inside").mkdir()
    (allowed / "dir-inside" / "file").write_bytes(b"allowed initramfs")
    (secret.parent / "file").write_bytes(secret.read_bytes())
    flips = {
        allowed / "dir": (allowed / "dir-inside", secret.parent),
        allowed / "file": (allowed / "initramfs.cpio", secret),
    }
    stop = threading.Event()

    def flip(link: Path, targets: tuple[Path, Path]) -> None:
        temporary = link.with_name(link.name + ".new")
        while not stop.is_set():
            for target in targets:
                temporary.unlink(missing_ok=True)
                temporary.symlink_to(target)
                temporary.replace(link)

    flippers = [threading.Thread(target=flip, args=item) for item in flips.items()]
    for thread in flippers:
        thread.start()
    stored: list[Any] = []
    try:
        for _ in range(150):
            for path in (allowed / "dir" / "file", allowed / "file"):
                with contextlib.suppress(InvalidError):
                    stored.append(installed_sha256(plugins, any_path=False, path=str(path)))
    finally:
        stop.set()
        for thread in flippers:
            thread.join()
    assert set(stored) == {hashlib.sha256(b"allowed initramfs").hexdigest()}
    assert not plugins.store.path(hashlib.sha256(secret.read_bytes()).hexdigest()).exists()
