"""The virtio-vsock packet header (virtio 1.2, 5.10.6): 44 bytes, little endian, before every
packet on both queues."""

from __future__ import annotations

import struct
from typing import NamedTuple

from roost.vmm.vsock.memory import GuestError

HEADER = struct.Struct("<QQIIIHHIII")
HOST_CID = 2
TYPE_STREAM = 1

OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7

SHUTDOWN_RCV = 1  # the sender will receive no more
SHUTDOWN_SEND = 2  # the sender will send no more
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

MAX_PAYLOAD = 64 * 1024  # the most Linux puts in one packet


class Header(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HEADER.pack(*self)


def parse(packet: bytes) -> tuple[Header, memoryview]:
    """A packet from the guest's tx queue: its header and payload (GuestError if the header
    announces more payload than the chain holds, or more than a packet may carry)."""
    if len(packet) < HEADER.size:
        raise GuestError(f"a packet of {len(packet)} bytes has no whole header")
    header = Header._make(HEADER.unpack_from(packet))
    if header.len > MAX_PAYLOAD:
        raise GuestError(f"a packet announces {header.len} bytes, more than {MAX_PAYLOAD}")
    end = HEADER.size + header.len
    if end > len(packet):
        carried = len(packet) - HEADER.size
        raise GuestError(f"a packet announces {header.len} bytes but carries {carried}")
    return header, memoryview(packet)[HEADER.size : end]
