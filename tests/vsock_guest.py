"""A fake guest for the vsock backend's tests: guest memory in an anonymous mmap, a driver that
lays out and fills the rings as Linux's virtio-vsock does, and a rig that runs the backend's
event loop against it with real Unix sockets for the host side (no QEMU)."""

from __future__ import annotations

import mmap
import os
import selectors
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable

from roost.vmm.vsock import packets
from roost.vmm.vsock.device import RX, TX, VsockDevice, step
from roost.vmm.vsock.hybrid import HybridHost, listen
from roost.vmm.vsock.memory import GuestMemory, Region
from roost.vmm.vsock.packets import HEADER, HOST_CID, TYPE_STREAM, Header

GUEST_CID = 3
GPA_BASE = 0x1_0000_0000  # guest-physical and QEMU addresses differ, as in a real VMM
UVA_BASE = 0x7F00_0000_0000
MEMORY_SIZE = 24 * 1024 * 1024
SLOT = 68 * 1024  # one buffer per descriptor: a header and the largest payload
DEBIAN_RX_BUFFER = 3776  # Debian 6.1.192: header and payload in one writable descriptor
OLD_RX_PAYLOAD = 4096  # older 6.1: a 44-byte header descriptor, then 4 KiB
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class Ring:
    """One queue as the guest driver sees it: its three rings and a buffer per descriptor."""

    def __init__(
        self, mapping: mmap.mmap, offset: int, size: int, buffers: int, gpa_base: int = GPA_BASE
    ) -> None:
        self.mapping = mapping
        self.gpa_base = gpa_base
        self.size = size
        self.desc = offset
        self.avail = offset + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.buffers = buffers
        self.free = list(range(size))
        self.avail_idx = 0
        self.used_seen = 0
        # head -> its descriptors (index, length) while the device has them
        self.chains: dict[int, list[tuple[int, int]]] = {}
        self.returned: list[tuple[int, int]] = []  # every used entry: (head, length written)

    def gpa(self, offset: int) -> int:
        return self.gpa_base + offset

    def uva(self, offset: int) -> int:
        return UVA_BASE + offset

    def slot(self, index: int) -> int:
        """The memory offset of descriptor `index`'s own buffer."""
        return self.buffers + index * SLOT

    def reserve(self, count: int) -> list[int]:
        """Descriptors a test writes itself (the driver will not use them)."""
        taken = self.free[-count:]
        del self.free[-count:]
        return taken

    def write_desc(self, index: int, address: int, length: int, flags: int, following: int) -> None:
        struct.pack_into(
            "<QIHH", self.mapping, self.desc + 16 * index, address, length, flags, following
        )

    def chain(self, pieces: list[tuple[int, int]]) -> int:
        """Take descriptors for `pieces` (length, flags) over their own buffers, linked; the
        head's index."""
        indices = [self.free.pop(0) for _ in pieces]
        for position, (index, (length, flags)) in enumerate(zip(indices, pieces, strict=True)):
            last = position == len(indices) - 1
            following = 0 if last else indices[position + 1]
            self.write_desc(
                index,
                self.gpa(self.slot(index)),
                length,
                flags | (0 if last else F_NEXT),
                following,
            )
        self.chains[indices[0]] = [(i, size) for i, (size, _) in zip(indices, pieces, strict=True)]
        return indices[0]

    def publish(self, head: int) -> None:
        struct.pack_into(
            "<H", self.mapping, self.avail + 4 + 2 * (self.avail_idx % self.size), head
        )
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        struct.pack_into("<H", self.mapping, self.avail + 2, self.avail_idx)

    def used_idx(self) -> int:
        return int(struct.unpack_from("<H", self.mapping, self.used + 2)[0])

    def take_used(self) -> list[tuple[list[tuple[int, int]], int]]:
        """The chains the device gave back since the last call (their descriptors, and the
        length it wrote), the descriptors freed."""
        entries = []
        while self.used_seen != self.used_idx():
            slot = self.used + 4 + 8 * (self.used_seen % self.size)
            head, length = struct.unpack_from("<II", self.mapping, slot)
            descriptors = self.chains.pop(head, [])
            entries.append((descriptors, length))
            self.returned.append((head, length))
            self.free.extend(index for index, _ in descriptors)
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return entries


class FakeGuest:
    """The guest: its memory and both queues, driven the way Linux's virtio-vsock drives them."""

    def __init__(self, queue_size: int = 128, rx_layout: str = "debian") -> None:
        self.mapping = mmap.mmap(-1, MEMORY_SIZE)
        self.memory = GuestMemory([Region(GPA_BASE, UVA_BASE, MEMORY_SIZE, self.mapping)])
        rings_size = 16 * queue_size + 6 + 2 * queue_size + 4 + 6 + 8 * queue_size
        buffers = 2 * rings_size + 4096
        self.rx = Ring(self.mapping, 0, queue_size, buffers)
        self.tx = Ring(self.mapping, rings_size + 64, queue_size, buffers + queue_size * SLOT)
        self.rx_layout = rx_layout
        self.refill = True  # post a new rx buffer for each one used, as Linux does
        self.received: list[tuple[Header, bytes]] = []
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]

    def attach(self, device: VsockDevice) -> None:
        """What QEMU does at DRIVER_OK, in its order (the device takes the kick fds' dups)."""
        device.set_memory(self.memory)
        for index, ring in ((RX, self.rx), (TX, self.tx)):
            queue = device.queue(index)
            queue.set_size(ring.size)
            queue.last_avail = 0
            queue.addresses = (ring.uva(ring.desc), ring.uva(ring.avail), ring.uva(ring.used))
            device.set_kick(index, os.dup(self.kicks[index]))
            queue.call = os.dup(self.calls[index])
            queue.enabled = True

    def post_rx(self, count: int = 16) -> None:
        for _ in range(count):
            if self.rx_layout == "debian":
                head = self.rx.chain([(DEBIAN_RX_BUFFER, F_WRITE)])
            else:
                head = self.rx.chain([(HEADER.size, F_WRITE), (OLD_RX_PAYLOAD, F_WRITE)])
            self.rx.publish(head)

    def send(
        self,
        op: int,
        src_port: int,
        dst_port: int,
        payload: bytes = b"",
        *,
        flags: int = 0,
        buf_alloc: int = 256 * 1024,
        fwd_cnt: int = 0,
        src_cid: int = GUEST_CID,
        dst_cid: int = HOST_CID,
        kind: int = TYPE_STREAM,
        length: int | None = None,
    ) -> int:
        """Queue one packet on tx as Linux lays it out: a header descriptor, then the payload's."""
        size = len(payload) if length is None else length
        header = Header(
            src_cid, dst_cid, src_port, dst_port, size, kind, op, flags, buf_alloc, fwd_cnt
        )
        pieces = [(HEADER.size, 0)] + ([(len(payload), 0)] if payload else [])
        head = self.tx.chain(pieces)
        descriptors = self.tx.chains[head]
        self.mapping[self.tx.slot(head) : self.tx.slot(head) + HEADER.size] = header.pack()
        if payload:
            start = self.tx.slot(descriptors[1][0])
            self.mapping[start : start + len(payload)] = payload
        self.tx.publish(head)
        return head

    def collect(self) -> list[tuple[Header, bytes]]:
        """Read what the device put on rx since last time into `received`; returns the new."""
        new = []
        used = self.rx.take_used()
        for descriptors, length in used:
            slots = [(self.rx.slot(index), size) for index, size in descriptors]
            data = b"".join(self.mapping[start : start + size] for start, size in slots)[:length]
            if len(data) >= HEADER.size:
                header = Header._make(HEADER.unpack_from(data))
                new.append((header, data[HEADER.size : HEADER.size + header.len]))
        self.received += new
        if self.refill:
            self.post_rx(len(used))
        return new

    def signalled(self, index: int) -> bool:
        """Whether the device signalled queue `index`'s call eventfd (and clear it)."""
        try:
            os.eventfd_read(self.calls[index])
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        for fd in self.kicks + self.calls:
            os.close(fd)


class Rig:
    """The backend's host side and device on a fake guest, with the event loop run by hand."""

    def __init__(
        self,
        *,
        max_buffered: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
        rx_layout: str = "debian",
        queue_size: int = 128,
    ) -> None:
        self.dir = tempfile.mkdtemp(prefix="vsk-", dir="/tmp")
        self.uds = f"{self.dir}/v.sock"
        self.sockets: list[socket.socket] = []
        self.selector = selectors.DefaultSelector()
        self.host = HybridHost(
            listen(self.uds),
            self.uds,
            GUEST_CID,
            self.selector,
            max_buffered=max_buffered,
            clock=clock,
        )
        self.device = VsockDevice(self.host, self.selector)
        self.guest = FakeGuest(queue_size, rx_layout)
        try:
            self.guest.attach(self.device)
            self.guest.post_rx(min(16, queue_size // 2))
        except BaseException:
            self.close()
            raise

    def step(self, wait: float = 0.0) -> None:
        step(self.selector, self.device, wait)
        self.guest.collect()
        self.guest.tx.take_used()

    def run_until(self, done: Callable[[], object], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError("the backend did not get there in time")
            self.step(0.01)

    def settle(self, turns: int = 20) -> None:
        """Run the loop a while, for a test that checks that something does not happen."""
        for _ in range(turns):
            self.step(0.002)

    def expect(self, op: int, **fields: int) -> tuple[Header, bytes]:
        """Run until the guest receives a packet with `op` (and `fields`); the first such."""

        def matching() -> tuple[Header, bytes] | None:
            for packet in self.guest.received:
                header = packet[0]
                if header.op == op and all(getattr(header, k) == v for k, v in fields.items()):
                    self.guest.received.remove(packet)
                    return packet
            return None

        found: list[tuple[Header, bytes]] = []

        def arrived() -> bool:
            packet = matching()
            if packet is not None:
                found.append(packet)
            return packet is not None

        self.run_until(arrived)
        return found[0]

    def ops(self) -> list[int]:
        return [header.op for header, _ in self.guest.received]

    # --- the host side ----------------------------------------------------------------------

    def unix_client(self, path: str | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.append(sock)
        sock.connect(path or self.uds)
        sock.setblocking(False)
        return sock

    def unix_listener(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.append(sock)
        sock.bind(f"{self.uds}_{port}")
        sock.listen(16)
        sock.setblocking(False)
        return sock

    def accept(self, listener: socket.socket) -> socket.socket:
        accepted: list[socket.socket] = []

        def ready() -> bool:
            try:
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                return False
            return True

        self.run_until(ready)
        sock = accepted[0]
        self.sockets.append(sock)
        sock.setblocking(False)
        return sock

    def read(self, sock: socket.socket, count: int, timeout: float = 5.0) -> bytes:
        """`count` bytes from a host socket (fewer if it ends first), running the loop meanwhile."""
        data = bytearray()
        ended = False

        def enough() -> bool:
            nonlocal ended
            try:
                chunk = sock.recv(count - len(data))
            except BlockingIOError:
                return False
            except ConnectionResetError:  # closed with our bytes unread: an end too
                chunk = b""
            ended = not chunk
            data.extend(chunk)
            return ended or len(data) >= count

        self.run_until(enough, timeout)
        return bytes(data)

    def closed_by_backend(self, sock: socket.socket) -> bool:
        """Whether a host socket reads EOF (or a reset) now, having nothing else to read."""
        try:
            return sock.recv(1) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

    def connect_from_host(self, port: int = 1024) -> tuple[socket.socket, Header]:
        """A host client through CONNECT, accepted by the guest: the client and the REQUEST."""
        client = self.unix_client()
        client.sendall(f"CONNECT {port}\n".encode())
        request, _ = self.expect(packets.OP_REQUEST, dst_port=port)
        self.guest.send(packets.OP_RESPONSE, port, request.src_port)
        assert (
            self.read(client, len(f"OK {request.src_port}\n"))
            == f"OK {request.src_port}\n".encode()
        )
        return client, request

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.device.reset()
        self.host.close()
        self.selector.close()
        self.guest.close()
        shutil.rmtree(self.dir, ignore_errors=True)
