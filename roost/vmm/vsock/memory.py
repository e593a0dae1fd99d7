"""Guest memory as QEMU shares it: the regions of SET_MEM_TABLE, each a mapping of its memfd.

Descriptors name guest-physical addresses (GPAs); SET_VRING_ADDR names the rings by QEMU's own
virtual addresses (UVAs). Both translate here to a mapping and an offset, and every access is
checked against its region first: whatever the guest writes into a descriptor, the backend
never touches memory outside the guest's RAM.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass


class GuestError(Exception):
    """Something the guest controls is malformed. It costs the unit of work that met it (a
    descriptor chain, a packet, a connection), never the backend or another connection."""


class OutOfRangeError(GuestError):
    """An access outside guest memory, or one crossing the end of a region."""


@dataclass(frozen=True)
class Region:
    """A stretch of guest RAM: `size` bytes at `gpa` in the guest and `uva` in QEMU, found at
    `offset` in `mapping`."""

    gpa: int
    uva: int
    size: int
    mapping: mmap.mmap
    offset: int = 0


@dataclass(frozen=True)
class MemoryRegionMessage:
    """One region of SET_MEM_TABLE, with the file descriptor that came along with it."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    fd: int


class GuestMemory:
    """The guest's RAM, closed as a whole when QEMU sends a new table or the backend ends."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = regions

    @classmethod
    def from_message(cls, entries: list[MemoryRegionMessage]) -> GuestMemory:
        """Map every region of a SET_MEM_TABLE. The fds are closed whatever happens (a mapping
        keeps its own). microvm sends two regions of the same memfd; each gets its own map."""
        regions: list[Region] = []
        try:
            for entry in entries:
                if entry.size <= 0:
                    raise ValueError(f"memory region at {entry.gpa:#x} has no size")
                if os.fstat(entry.fd).st_size < entry.mmap_offset + entry.size:
                    # an access past a file's end is SIGBUS, which would end the backend
                    raise ValueError(f"memory region at {entry.gpa:#x} is beyond its file's end")
                start = entry.mmap_offset - entry.mmap_offset % mmap.ALLOCATIONGRANULARITY
                skip = entry.mmap_offset - start
                mapping = mmap.mmap(entry.fd, skip + entry.size, offset=start)
                regions.append(Region(entry.gpa, entry.uva, entry.size, mapping, skip))
        except BaseException:
            for region in regions:
                region.mapping.close()
            raise
        finally:
            for entry in entries:
                os.close(entry.fd)
        return cls(regions)

    def gpa(self, address: int, length: int) -> tuple[mmap.mmap, int]:
        """Where `length` bytes at guest-physical `address` are: (mapping, offset)."""
        for region in self.regions:
            if region.gpa <= address < region.gpa + region.size:
                return _inside(region, address - region.gpa, length, "guest", address)
        raise OutOfRangeError(f"guest address {address:#x} is outside guest memory")

    def uva(self, address: int, length: int) -> tuple[mmap.mmap, int]:
        """Where `length` bytes at QEMU's virtual `address` are: (mapping, offset)."""
        for region in self.regions:
            if region.uva <= address < region.uva + region.size:
                return _inside(region, address - region.uva, length, "QEMU", address)
        raise OutOfRangeError(f"QEMU address {address:#x} is outside guest memory")

    def close(self) -> None:
        for region in self.regions:
            region.mapping.close()
        self.regions = []


def _inside(
    region: Region, start: int, length: int, kind: str, address: int
) -> tuple[mmap.mmap, int]:
    if length < 0 or start + length > region.size:
        raise OutOfRangeError(
            f"{kind} address {address:#x}+{length:#x} crosses the end of its memory region"
        )
    return region.mapping, region.offset + start
