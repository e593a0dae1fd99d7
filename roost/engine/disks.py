"""Each VM's own copy of its plugin's rootfs: guests write to their disks, and the stored
artifact is shared and must not change."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from roost.errors import HostError, NoSpaceError

FULL = (errno.ENOSPC, errno.EDQUOT)


class Disks:
    """`<state-dir>/disks/<vm>.img`, made at a VM's first boot and kept for its life."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / f"{name}.img"

    def make(self, name: str, source: Path) -> None:
        """Copy `source` to the VM's disk unless it has one (a reflink where the filesystem
        can, so a big disk costs nothing)."""
        disk = self.path(name)
        if disk.exists():
            return
        disk.parent.mkdir(mode=0o700, exist_ok=True)
        partial = disk.with_suffix(".partial")
        try:
            _copy_file(source, partial)
            partial.chmod(0o600)
            partial.rename(disk)
        except OSError as error:
            partial.unlink(missing_ok=True)
            if error.errno in FULL:
                raise NoSpaceError(
                    f"no space left for the disk of VM {name} under {self.root}; free space "
                    "there (or remove VMs) and start it again"
                ) from None
            raise HostError(f"cannot make the disk of VM {name}: {error}") from None

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
        self.path(name).with_suffix(".partial").unlink(missing_ok=True)

    def names(self) -> set[str]:
        """The VMs that have a disk (or a partial one)."""
        if not self.root.is_dir():
            return set()
        return {path.stem for path in self.root.iterdir() if path.suffix in (".img", ".partial")}


def _copy_file(source: Path, target: Path) -> None:
    with source.open("rb") as reader, target.open("wb") as writer:
        remaining = os.fstat(reader.fileno()).st_size
        while remaining > 0:
            copied = os.copy_file_range(reader.fileno(), writer.fileno(), remaining)
            if copied == 0:
                raise OSError(f"{source} ended early")
            remaining -= copied
