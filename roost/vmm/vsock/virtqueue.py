"""Split virtqueues (virtio 1.x, 2.7) as the device side sees them, on guest memory.

The guest owns every byte of a ring, so every index, address, length and flag read from one is
checked before use: a chain that breaks a rule is refused (logged, and returned on the used ring
with length 0 so the guest driver does not wait for it forever), and the ring goes on with the
next one. Indirect descriptors and event indices are not offered, so both are refused.

Memory ordering: this relies on x86-64's total store order and on CPython copying guest memory
with plain loads and stores (memcpy, struct). Reading the avail index before its entries, and
writing a used entry before the used index, is then enough; pure Python has no barrier, so a
weakly ordered host (ARM64) would need real fences here.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from roost.vmm.vsock.memory import GuestError, GuestMemory

DESCRIPTOR = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEMENT = struct.Struct("<II")  # id, len
U16 = struct.Struct("<H")
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768


class RingError(GuestError):
    """The ring as a whole is unusable for now (its avail index jumped): nothing is taken from
    it until the guest puts the index right."""


class ChainError(GuestError):
    """One descriptor chain breaks a rule and is refused."""


@dataclass(frozen=True)
class _Rings:
    """Where a started queue's three rings are in guest memory (checked to lie inside it)."""

    memory: GuestMemory
    desc_map: mmap.mmap
    desc: int
    avail_map: mmap.mmap
    avail: int
    used_map: mmap.mmap
    used: int


@dataclass
class Chain:
    """An available descriptor chain: its head and its buffers (mapping, offset, length), all
    in one direction and bounds-checked, `size` bytes together."""

    head: int
    buffers: list[tuple[mmap.mmap, int, int]]
    size: int

    def read(self) -> bytes:
        return b"".join(
            mapping[offset : offset + length] for mapping, offset, length in self.buffers
        )

    def write(self, data: bytes) -> int:
        """Scatter `data` over the buffers in order; returns how much fitted."""
        view = memoryview(data)
        done = 0
        for mapping, offset, length in self.buffers:
            piece = view[done : done + length]
            if not piece:
                break
            mapping[offset : offset + len(piece)] = piece
            done += len(piece)
        return done


class Virtqueue:
    """One queue: its configuration as QEMU sends it, and, once started, its rings.

    `writable` says which way the queue's buffers go (rx: device-writable, tx: device-readable);
    chains of fewer than `min_bytes` or more than `max_bytes` are refused. `refuse` hears why
    each refused chain was refused."""

    def __init__(
        self,
        name: str,
        *,
        writable: bool,
        min_bytes: int,
        max_bytes: int,
        refuse: Callable[[str], None],
    ) -> None:
        self.name = name
        self.writable = writable
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self.refuse = refuse
        self.size = 0
        self.last_avail = 0  # also the used index: chains go back in the order they came
        self.addresses: tuple[int, int, int] | None = None  # desc, avail, used (QEMU addresses)
        self.enabled = False
        self.kick: int | None = None
        self.call: int | None = None
        self.signal_due = False
        self._rings: _Rings | None = None

    @property
    def started(self) -> bool:
        return self._rings is not None

    @property
    def running(self) -> bool:
        return self._rings is not None and self.enabled

    def set_size(self, size: int) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.size = size

    def start(self, memory: GuestMemory) -> None:
        """Find the rings in guest memory; a ring that does not lie wholly inside it cannot
        start (GuestError)."""
        if self.addresses is None or self.size == 0:
            raise ValueError(f"{self.name} has no size or ring addresses yet")
        desc, avail, used = self.addresses
        self._rings = _Rings(
            memory,
            *memory.uva(desc, DESCRIPTOR.size * self.size),
            *memory.uva(avail, 4 + 2 * self.size),
            *memory.uva(used, 4 + USED_ELEMENT.size * self.size),
        )

    def stop(self) -> int:
        """Stop using the rings (GET_VRING_BASE); returns where the guest's next chain is."""
        self._rings = None
        self.signal_due = False
        return self.last_avail

    def next_chain(self) -> Chain | None:
        """The next available chain, not yet taken (see `complete`), or None. Refused chains
        on the way are returned to the guest at once. RingError if the avail index jumped."""
        rings = self._rings
        assert rings is not None
        while True:
            avail_idx = U16.unpack_from(rings.avail_map, rings.avail + 2)[0]
            pending = (avail_idx - self.last_avail) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                raise RingError(
                    f"{self.name}: avail index jumped from {self.last_avail} to {avail_idx} "
                    f"(queue size {self.size})"
                )
            slot = rings.avail + 4 + 2 * (self.last_avail % self.size)
            head = U16.unpack_from(rings.avail_map, slot)[0]
            try:
                return self._walk(rings, head)
            except GuestError as fault:
                self.refuse(f"{self.name}: refused descriptor chain {head}: {fault}")
                self.complete(head, 0)

    def complete(self, head: int, written: int) -> None:
        """Give chain `head` back to the guest, `written` bytes filled: the used entry first,
        then the used index (see the module's note on ordering)."""
        rings = self._rings
        assert rings is not None
        slot = rings.used + 4 + USED_ELEMENT.size * (self.last_avail % self.size)
        USED_ELEMENT.pack_into(rings.used_map, slot, head, written)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        U16.pack_into(rings.used_map, rings.used + 2, self.last_avail)
        self.signal_due = True

    def signal(self) -> None:
        """Interrupt the guest if chains came back since the last time and it wants to hear."""
        rings = self._rings
        if not self.signal_due or rings is None:
            return
        self.signal_due = False
        flags = U16.unpack_from(rings.avail_map, rings.avail)[0]
        if self.call is not None and not flags & AVAIL_F_NO_INTERRUPT:
            os.eventfd_write(self.call, 1)

    def _walk(self, rings: _Rings, head: int) -> Chain:
        buffers: list[tuple[mmap.mmap, int, int]] = []
        total = 0
        index = head
        for _ in range(self.size):
            if index >= self.size:
                raise ChainError(
                    f"descriptor index {index} is not below the queue size {self.size}"
                )
            address, length, flags, following = DESCRIPTOR.unpack_from(
                rings.desc_map, rings.desc + DESCRIPTOR.size * index
            )
            if flags & DESC_F_INDIRECT:
                raise ChainError("indirect descriptors were not offered")
            if bool(flags & DESC_F_WRITE) != self.writable:
                way = "a device-readable" if self.writable else "a device-writable"
                raise ChainError(f"descriptor {index} is {way} buffer on this queue")
            total += length
            if total > self.max_bytes:
                raise ChainError(f"the chain holds more than {self.max_bytes} bytes")
            buffers.append((*rings.memory.gpa(address, length), length))
            if not flags & DESC_F_NEXT:
                if total < self.min_bytes:
                    raise ChainError(f"the chain holds {total} bytes, fewer than {self.min_bytes}")
                return Chain(head, buffers, total)
            index = following
        raise ChainError(f"the chain is longer than the queue ({self.size}): a descriptor loop")

    def close_fds(self) -> None:
        for fd in (self.kick, self.call):
            if fd is not None:
                os.close(fd)
        self.kick = self.call = None
