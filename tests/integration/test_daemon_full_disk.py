"""A full state filesystem is the operator's to fix, and roost says so: 507 `no_space` (exit
6) with a clear message, never a 500, and everything works again once there is room."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

import pytest

from tests.harness import Daemon, run, write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker]


def fill(directory: Path) -> Path:
    """A file that takes every free byte of `directory`'s filesystem (unbuffered: a buffered
    writer would keep what the full filesystem refused and fail again when closed)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as writer:
        chunk = b"\0" * (1 << 16)
        try:
            while True:
                writer.write(chunk)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_a_full_state_filesystem_is_507_no_space_until_there_is_room(
    netns: str, tmp_path: Path
) -> None:
    daemon = Daemon(netns)
    daemon.state_dir.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(daemon.state_dir))
    try:
        daemon.start()
        kernel = tmp_path / "vmlinux"
        kernel.write_bytes(b"\x7fELF" + bytes(1 << 16))
        daemon.ok("plugin", "install", write_plugin(tmp_path, "p", kernel={"path": str(kernel)}))
        filler = fill(daemon.state_dir)

        created = daemon.cli("vm", "create", "x", "--plugin", "p", "--no-start", "--json")
        assert created.exit_code == 6, created.stdout
        error = created.json()["error"]
        assert error["code"] == "no_space"
        assert "full" in error["message"]
        stored = daemon.cli("plugin", "install", write_plugin(tmp_path, "q"), "--json")
        assert (stored.exit_code, stored.json()["error"]["code"]) == (6, "no_space")

        filler.unlink()
        assert daemon.ok("vm", "create", "x", "--plugin", "p", "--no-start")["name"] == "x"
    finally:
        daemon.stop()
        with contextlib.suppress(Exception):
            run("umount", str(daemon.state_dir))
        daemon.close()
