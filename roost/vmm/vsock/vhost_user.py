"""The vhost-user protocol, backend side: QEMU connects and configures the device with it.

Every message is a 12-byte header (request, flags, payload size; u32 little endian) and its
payload; file descriptors travel as SCM_RIGHTS with the header. Only replies carry the reply
flag. This serves what QEMU 7.2's vhost-user-vsock sends (the sequence is in
/work/shared/notes/vhost-user-vsock.md): we offer VIRTIO_F_VERSION_1 and the protocol-features
bit, and of the protocol features only CONFIG, through which QEMU learns the guest's CID (7.2
has no guest-cid property for this device). Anything else is logged and, if it wants an
answer, answered with zero (or, for a reply-ack request, failure).
"""

from __future__ import annotations

import array
import enum
import logging
import os
import socket
import struct
from collections.abc import Callable

from roost.vmm.vsock.device import VsockDevice
from roost.vmm.vsock.memory import GuestMemory, MemoryRegionMessage
from roost.vmm.vsock.virtqueue import Virtqueue

log = logging.getLogger("roost.vmm.vsock")

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDRESS = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
MEMORY_TABLE = struct.Struct("<II")  # regions, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest address, size, QEMU address, mmap offset
CONFIG = struct.Struct("<III")  # offset, size, flags; then the bytes

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_PAYLOAD = 4096  # the largest message QEMU 7.2 sends is a memory table of 8 regions
MAX_FDS = 8
VRING_NOFD = 0x100
VRING_INDEX = 0xFF

VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
FEATURES = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
PROTOCOL_F_CONFIG = 1 << 9
PROTOCOL_FEATURES = PROTOCOL_F_CONFIG


class Request(enum.IntEnum):
    """The requests this backend knows (of the protocol's 40-odd)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_MAX_MEM_SLOTS = 36
    GET_STATUS = 40


# never sent unless their feature is offered (none is), but a u64 answer is due all the same
ANSWERED_WITH_ZERO = {Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS}
# QEMU waits for these answers even when the request was refused: it gets its request back
ALWAYS_ANSWERED = {Request.GET_VRING_BASE, Request.GET_CONFIG}


Handler = Callable[[bytes, list[int]], bytes | None]


class ProtocolError(Exception):
    """QEMU's side of the socket broke the framing: the connection cannot go on."""


class MessageError(Exception):
    """One message's payload is unusable; the message is refused, the connection goes on."""


class VhostUserServer:
    """The backend's end of QEMU's vhost-user socket (blocking: QEMU writes each message whole,
    and waits for the reply before its next one)."""

    def __init__(self, sock: socket.socket, device: VsockDevice, guest_cid: int) -> None:
        self.sock = sock
        self.device = device
        self.config = U64.pack(guest_cid)  # struct virtio_vsock_config
        self.ended: str | None = None  # why the connection is over, once it is
        self.handlers: dict[int, Handler] = {
            Request.GET_FEATURES: lambda _payload, _fds: U64.pack(FEATURES),
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._nothing,
            Request.RESET_OWNER: lambda _payload, _fds: self.device.reset(),
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_PROTOCOL_FEATURES: lambda _payload, _fds: U64.pack(PROTOCOL_FEATURES),
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._nothing,  # the CID is not the guest's to change
        }

    def readable(self, _events: int) -> None:
        """Serve one message; EOF (QEMU has gone) or broken framing ends the connection."""
        try:
            self._serve_one()
        except ProtocolError as error:
            self.ended = f"vhost-user protocol error: {error}"
        except ConnectionError:
            self.ended = "QEMU disconnected"

    def _serve_one(self) -> None:
        fds: list[int] = []
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4)
            )
            for level, kind, fd_bytes in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(fd_bytes[: len(fd_bytes) - len(fd_bytes) % 4])
                    fds.extend(received)
            if not data:
                self.ended = "QEMU disconnected"
                return
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("a message came with more file descriptors than allowed")
            data += self._receive(HEADER.size - len(data))
            request, message_flags, size = HEADER.unpack(data)
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"a message of {size} bytes (request {request})")
            self._dispatch(request, message_flags, self._receive(size), fds)
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def _receive(self, size: int) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        done = 0
        while done < size:
            count = self.sock.recv_into(view[done:])
            if count == 0:
                raise ConnectionResetError("QEMU closed the socket mid-message")
            done += count
        return bytes(buffer)

    def _dispatch(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        name = _name(request)
        handler = self.handlers.get(request)
        reply: bytes | None = None
        failed = False
        if handler is None:
            if request in ANSWERED_WITH_ZERO:
                reply = U64.pack(0)
            log.warning("vhost-user: %s is not supported; ignored", name)
            failed = True
        else:
            try:
                reply = handler(payload, fds)
            except (MessageError, ValueError, struct.error, OSError) as error:
                log.warning("vhost-user: refused %s: %s", name, error)
                failed = True
                if request in ALWAYS_ANSWERED:
                    reply = payload
        if reply is None and flags & FLAG_NEED_REPLY:
            reply = U64.pack(1 if failed else 0)
        if reply is not None:
            self.sock.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, len(reply)) + reply)

    # --- features and ownership -------------------------------------------------------------

    def _nothing(self, _payload: bytes, _fds: list[int]) -> None:
        pass

    def _set_features(self, payload: bytes, _fds: list[int]) -> None:
        (features,) = U64.unpack_from(payload)
        if features & ~FEATURES:
            log.warning("vhost-user: QEMU set features %#x beyond those offered", features)

    def _set_protocol_features(self, payload: bytes, _fds: list[int]) -> None:
        (features,) = U64.unpack_from(payload)
        if features & ~PROTOCOL_FEATURES:
            log.warning("vhost-user: QEMU set protocol features %#x beyond those offered", features)

    def _get_config(self, payload: bytes, _fds: list[int]) -> bytes:
        offset, size, flags = CONFIG.unpack_from(payload)
        if size > MAX_PAYLOAD:
            raise MessageError(f"a config read of {size} bytes")
        data = self.config[offset : offset + size].ljust(size, b"\0")
        return CONFIG.pack(offset, size, flags) + data

    # --- memory and queues ------------------------------------------------------------------

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        count, _padding = MEMORY_TABLE.unpack_from(payload)
        if not 0 < count <= MAX_FDS or len(fds) != count:
            raise MessageError(f"{count} memory regions came with {len(fds)} file descriptors")
        entries = []
        for number in range(count):
            offset = MEMORY_TABLE.size + number * MEMORY_REGION.size
            gpa, size, uva, mmap_offset = MEMORY_REGION.unpack_from(payload, offset)
            entries.append(MemoryRegionMessage(gpa, size, uva, mmap_offset, fds[number]))
        fds.clear()  # GuestMemory closes them
        try:
            memory = GuestMemory.from_message(entries)
        except OSError as error:
            raise MessageError(f"cannot map guest memory: {error}") from None
        self.device.set_memory(memory)
        sizes = ", ".join(f"{e.size >> 10} KiB at {e.gpa:#x}" for e in entries)
        log.info("guest memory: %s", sizes)

    def _set_vring_num(self, payload: bytes, _fds: list[int]) -> None:
        index, size = VRING_STATE.unpack_from(payload)
        self._stopped_queue(index).set_size(size)

    def _set_vring_addr(self, payload: bytes, _fds: list[int]) -> None:
        index, _flags, desc, used, avail, _log = VRING_ADDRESS.unpack_from(payload)
        self._stopped_queue(index).addresses = (desc, avail, used)

    def _set_vring_base(self, payload: bytes, _fds: list[int]) -> None:
        index, base = VRING_STATE.unpack_from(payload)
        self._stopped_queue(index).last_avail = base & 0xFFFF

    def _stopped_queue(self, index: int) -> Virtqueue:
        """A queue whose layout may change: only a stopped one (its rings were checked for the
        layout it started with)."""
        queue = self.device.queue(index)
        if queue.started:
            raise MessageError(f"queue {index} is running")
        return queue

    def _get_vring_base(self, payload: bytes, _fds: list[int]) -> bytes:
        index, _ = VRING_STATE.unpack_from(payload)
        return VRING_STATE.pack(index, self.device.stop_queue(index))

    def _set_vring_enable(self, payload: bytes, _fds: list[int]) -> None:
        index, enable = VRING_STATE.unpack_from(payload)
        self.device.queue(index).enabled = bool(enable)

    def _set_vring_kick(self, payload: bytes, fds: list[int]) -> None:
        index, fd = self._vring_fd(payload, fds)
        self.device.set_kick(index, fd)

    def _set_vring_call(self, payload: bytes, fds: list[int]) -> None:
        self.device.set_call(*self._vring_fd(payload, fds))

    def _set_vring_err(self, payload: bytes, fds: list[int]) -> None:
        _index, fd = self._vring_fd(payload, fds)
        if fd is not None:  # closed unused: no ring errors are reported
            os.close(fd)

    def _vring_fd(self, payload: bytes, fds: list[int]) -> tuple[int, int | None]:
        """A queue's index and the eventfd that came with the message (taken from `fds`), or
        None when QEMU says it sends none."""
        (value,) = U64.unpack_from(payload)
        index = value & VRING_INDEX
        self.device.queue(index)  # ValueError for a queue this backend does not run
        if value & VRING_NOFD:
            return index, None
        if len(fds) != 1:
            raise MessageError(f"{len(fds)} file descriptors where one was due")
        return index, fds.pop()

    def close(self) -> None:
        self.sock.close()


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"
