"""The vsock backend's guest memory and virtqueues against a fake guest: well-formed chains
both ways, and hostile ones (each refused, given back with length 0, logged, and no harm to
other connections), plus hypothesis runs of random rings and headers."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roost.vmm.vsock.device import RX, TX
from roost.vmm.vsock.memory import GuestMemory, MemoryRegionMessage, OutOfRangeError, Region
from roost.vmm.vsock.packets import HEADER, MAX_PAYLOAD, OP_REQUEST, OP_RW, Header
from roost.vmm.vsock.virtqueue import AVAIL_F_NO_INTERRUPT
from tests.vsock_guest import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    GPA_BASE,
    GUEST_CID,
    MEMORY_SIZE,
    Rig,
)

GUEST_PORT = 1024


@pytest.fixture
def faults(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="roost.vmm.vsock")
    return caplog


# --- guest memory ---------------------------------------------------------------------------


def test_guest_and_qemu_addresses_translate_to_the_same_bytes() -> None:
    mapping = mmap.mmap(-1, 8192)
    memory = GuestMemory([Region(0x10000, 0x7F0000, 8192, mapping)])
    try:
        by_gpa, gpa_offset = memory.gpa(0x10000 + 100, 8)
        by_uva, uva_offset = memory.uva(0x7F0000 + 100, 8)
        assert (by_gpa, gpa_offset) == (by_uva, uva_offset) == (mapping, 100)
    finally:
        memory.close()


@pytest.mark.parametrize(
    ("address", "length", "why"),
    [
        (0x10000 - 1, 1, "outside guest memory"),
        (0x10000 + 8192, 0, "outside guest memory"),
        (0x10000 + 8000, 200, "crosses the end of its memory region"),
        (2**64 - 1, 1, "outside guest memory"),
    ],
)
def test_an_access_outside_a_region_is_refused(address: int, length: int, why: str) -> None:
    memory = GuestMemory([Region(0x10000, 0x7F0000, 8192, mmap.mmap(-1, 8192))])
    try:
        with pytest.raises(OutOfRangeError, match=why):
            memory.gpa(address, length)
    finally:
        memory.close()


def test_two_regions_of_one_memfd_map_their_own_parts_as_on_microvm() -> None:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, 0x300000)
    os.pwrite(fd, b"low", 0x1000)
    os.pwrite(fd, b"high", 0x200000)
    low = MemoryRegionMessage(0, 0xF0000, 0x7000_0000_0000, 0, os.dup(fd))
    high = MemoryRegionMessage(0x100000, 0x200000, 0x7000_0010_0000, 0x100000, os.dup(fd))
    memory = GuestMemory.from_message([low, high])
    try:
        mapping, offset = memory.gpa(0x1000, 3)
        assert mapping[offset : offset + 3] == b"low"
        mapping, offset = memory.gpa(0x200000, 4)
        assert mapping[offset : offset + 4] == b"high"
        mapping, offset = memory.uva(0x7000_0020_0000, 4)
        mapping[offset : offset + 4] = b"HIGH"
        assert os.pread(fd, 4, 0x200000) == b"HIGH"
        with pytest.raises(OutOfRangeError):
            memory.gpa(0xF0000, 1)  # the hole between the regions
    finally:
        memory.close()
        os.close(fd)


def test_a_memory_region_beyond_its_files_end_is_refused_rather_than_mapped() -> None:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, 0x100000)
    region = MemoryRegionMessage(0, 0x200000, 0x7000_0000_0000, 0, fd)  # closed by the call
    with pytest.raises(ValueError, match="beyond its file's end"):
        GuestMemory.from_message([region])


# --- well-formed chains ---------------------------------------------------------------------


def test_the_guest_is_signalled_when_chains_come_back_unless_it_asked_not_to_be(rig: Rig) -> None:
    rig.guest.signalled(TX)
    rig.guest.send(OP_REQUEST, 40000, 5000)
    rig.step()
    assert rig.guest.signalled(TX)
    assert rig.guest.signalled(RX)  # the RST for port 5000, where nobody listens
    struct.pack_into("<H", rig.guest.mapping, rig.guest.tx.avail, AVAIL_F_NO_INTERRUPT)
    returned = len(rig.guest.tx.returned)
    rig.guest.send(OP_REQUEST, 40001, 5000)
    rig.step()
    assert len(rig.guest.tx.returned) == returned + 1
    assert not rig.guest.signalled(TX)


def test_a_packet_is_written_across_the_descriptors_of_an_rx_chain() -> None:
    with Rig(rx_layout="split") as rig:
        client, _ = rig.connect_from_host()
        client.sendall(b"z" * 5000)
        rig.run_until(lambda: sum(len(p) for h, p in rig.guest.received if h.op == OP_RW) == 5000)
        lengths = [length for _, length in rig.guest.rx.returned]
        assert HEADER.size + 4096 in lengths  # a full chain: header, then 4 KiB of payload


def test_a_packet_in_one_descriptor_reaches_the_host_like_one_split_in_two(rig: Rig) -> None:
    client, request = rig.connect_from_host()
    header_at(rig, SCRATCH, dst_port=request.src_port, len=5)
    rig.guest.mapping[SCRATCH + HEADER.size : SCRATCH + HEADER.size + 5] = b"whole"
    post_hostile([(GPA_BASE + SCRATCH, HEADER.size + 5, 0, 0)], rig)
    assert rig.read(client, 5) == b"whole"


# --- hostile chains -------------------------------------------------------------------------


def established(rig: Rig) -> tuple[socket.socket, int]:
    """A connection that must stay unaffected: its client and its local port."""
    client, request = rig.connect_from_host()
    return client, request.src_port


def still_works(rig: Rig, connection: tuple[socket.socket, int]) -> None:
    client, local_port = connection
    rig.guest.send(OP_RW, GUEST_PORT, local_port, b"still here")
    assert rig.read(client, 10) == b"still here"


def post_hostile(ring_descs: list[tuple[int, int, int, int]], rig: Rig, *, rx: bool = False) -> int:
    """Write `ring_descs` (addr, len, flags, next: next counts within the list) over reserved
    descriptors of tx (or rx) and publish the first; its head index."""
    ring = rig.guest.rx if rx else rig.guest.tx
    indices = ring.reserve(len(ring_descs))
    for index, (address, length, flags, following) in zip(indices, ring_descs, strict=True):
        target = indices[following] if following < len(indices) else following
        ring.write_desc(index, address, length, flags, target)
    ring.publish(indices[0])
    return indices[0]


def header_at(rig: Rig, offset: int, **fields: int) -> int:
    """A valid guest header written into guest memory at `offset`; its guest address."""
    values = {
        "src_cid": GUEST_CID,
        "dst_cid": 2,
        "src_port": GUEST_PORT,
        "dst_port": 9,
        "len": 0,
        "type": 1,
        "op": OP_RW,
        "flags": 0,
        "buf_alloc": 65536,
        "fwd_cnt": 0,
    }
    values.update(fields)
    rig.guest.mapping[offset : offset + HEADER.size] = Header(**values).pack()
    return GPA_BASE + offset


SCRATCH = MEMORY_SIZE - 256 * 1024  # beyond every ring and slot of the fake guest


@pytest.mark.parametrize(
    ("descs", "why"),
    [
        ([(GPA_BASE - 4096, 44, 0, 0)], "outside guest memory"),
        ([(GPA_BASE + MEMORY_SIZE - 20, 44, 0, 0)], "crosses the end of its memory region"),
        ([(GPA_BASE + SCRATCH, 44, F_NEXT, 1), (GPA_BASE + SCRATCH, 44, F_NEXT, 0)], "loop"),
        ([(GPA_BASE + SCRATCH, 44, F_NEXT, 1), (GPA_BASE + SCRATCH, 8, F_WRITE, 0)], "writable"),
        ([(GPA_BASE + SCRATCH, 44, F_NEXT, 1), (GPA_BASE + SCRATCH, 65537, 0, 0)], "more than"),
        ([(GPA_BASE + SCRATCH, 44, F_NEXT, 1000)], "not below the queue size"),
        ([(GPA_BASE + SCRATCH, 16, F_INDIRECT, 0)], "indirect"),
        ([(GPA_BASE + SCRATCH, 20, 0, 0)], "fewer than 44"),
    ],
    ids=["outside", "crossing", "loop", "writable", "oversized", "index", "indirect", "short"],
)
def test_a_hostile_tx_chain_is_refused_and_the_other_connections_go_on(
    rig: Rig, faults: pytest.LogCaptureFixture, descs: list[tuple[int, int, int, int]], why: str
) -> None:
    connection = established(rig)
    header_at(rig, SCRATCH)
    head = post_hostile(descs, rig)
    rig.settle()
    assert (head, 0) in rig.guest.tx.returned
    assert "refused descriptor chain" in faults.text
    assert why in faults.text
    still_works(rig, connection)


def test_a_descriptor_loop_is_refused_and_the_other_connections_go_on(
    rig: Rig, faults: pytest.LogCaptureFixture
) -> None:
    connection = established(rig)
    head = post_hostile([(GPA_BASE + SCRATCH, 44, F_NEXT, 0)], rig)  # a descriptor to itself
    rig.settle()
    assert (head, 0) in rig.guest.tx.returned
    assert "a descriptor loop" in faults.text
    still_works(rig, connection)


def test_a_head_index_beyond_the_queue_is_returned_and_the_ring_goes_on(
    rig: Rig, faults: pytest.LogCaptureFixture
) -> None:
    connection = established(rig)
    rig.guest.tx.publish(4000)
    rig.settle()
    assert (4000, 0) in rig.guest.tx.returned
    assert "descriptor index 4000 is not below the queue size 128" in faults.text
    still_works(rig, connection)


@pytest.mark.parametrize(
    ("descs", "why"),
    [
        ([(GPA_BASE + SCRATCH, 3776, 0, 0)], "device-readable"),
        (
            [(GPA_BASE + SCRATCH, 44, F_WRITE | F_NEXT, 1), (GPA_BASE + SCRATCH, 64, 0, 0)],
            "readable",
        ),
    ],
    ids=["readable", "readable-after-writable"],
)
def test_a_hostile_rx_chain_is_refused_and_the_data_takes_the_next_buffer(
    rig: Rig, faults: pytest.LogCaptureFixture, descs: list[tuple[int, int, int, int]], why: str
) -> None:
    client, request = rig.connect_from_host()
    rig.guest.refill = False
    rig.guest.collect()
    while rig.device.queue(RX).last_avail != rig.guest.rx.avail_idx:
        client.sendall(b"f")  # use up the well-formed buffers first
        rig.step(0.01)
    head = post_hostile(descs, rig, rx=True)
    rig.guest.post_rx(1)
    client.sendall(b"after")
    rig.run_until(lambda: b"after" in b"".join(p for _, p in rig.guest.received))
    assert (head, 0) in rig.guest.rx.returned
    assert why in faults.text
    assert request.src_port in {c.local_port for c in rig.host.connections.values()}


def test_an_avail_index_that_jumps_stops_the_ring_until_it_is_put_right(
    rig: Rig, faults: pytest.LogCaptureFixture
) -> None:
    connection = established(rig)
    good = rig.guest.tx.avail_idx
    rig.guest.tx.set_avail_idx(good + 129)
    rig.settle()
    assert "avail index jumped" in faults.text
    assert rig.device.queue(TX).last_avail == good  # nothing taken
    rig.guest.tx.set_avail_idx(good)
    still_works(rig, connection)


def test_a_header_announcing_more_than_its_chain_holds_is_refused(
    rig: Rig, faults: pytest.LogCaptureFixture
) -> None:
    connection = established(rig)
    rig.guest.send(OP_RW, GUEST_PORT, connection[1], b"short", length=5000)
    rig.settle()
    assert "announces 5000 bytes but carries 5" in faults.text
    still_works(rig, connection)


def test_guest_faults_are_logged_a_few_at_a_time(
    rig: Rig, faults: pytest.LogCaptureFixture
) -> None:
    for _ in range(60):
        rig.guest.tx.publish(4000)
        rig.step()
    assert faults.text.count("refused descriptor chain") == rig.device.faults.burst
    assert rig.device.faults.total == 60


# --- random rings and headers ---------------------------------------------------------------


def assert_consistent(rig: Rig) -> None:
    """What must hold whatever the guest wrote: no chain kept in flight, tallies that add up,
    and every connection whole."""
    for index, ring in ((RX, rig.guest.rx), (TX, rig.guest.tx)):
        assert ring.used_idx() == rig.device.queue(index).last_avail
    connections = rig.host.connections.values()
    assert rig.host.to_guest.bytes == sum(len(c.to_guest) for c in connections)
    assert rig.host.to_host.bytes == sum(len(c.to_host) for c in connections)
    for key, connection in rig.host.connections.items():
        assert key == connection.key
        assert connection.ending is None
        assert connection.sock.fileno() >= 0


descriptor = st.tuples(
    st.one_of(
        st.sampled_from([GPA_BASE + SCRATCH, GPA_BASE + SCRATCH + 40, GPA_BASE]),
        st.integers(0, 2**64 - 1),
    ),
    st.one_of(st.sampled_from([0, 20, 44, 100, 3776, 65580]), st.integers(0, 2**32 - 1)),
    st.integers(0, 7),
    st.one_of(st.integers(0, 9), st.integers(0, 2**16 - 1)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tx_table=st.lists(descriptor, min_size=8, max_size=8),
    rx_table=st.lists(descriptor, min_size=8, max_size=8),
    heads=st.lists(st.integers(0, 12), min_size=0, max_size=12),
    avail_step=st.integers(0, 2**16 - 1),
    header=st.binary(min_size=44, max_size=44),
)
def test_random_rings_never_break_the_backend(
    tx_table: list[tuple[int, int, int, int]],
    rx_table: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_step: int,
    header: bytes,
) -> None:
    with Rig(queue_size=8) as rig:
        rig.unix_listener(9)
        client, _ = rig.connect_from_host()
        rig.guest.refill = False
        rig.guest.mapping[SCRATCH : SCRATCH + 44] = header
        for table, ring in ((tx_table, rig.guest.tx), (rx_table, rig.guest.rx)):
            for index, entry in enumerate(table):
                ring.write_desc(index, *entry)
            for head in heads:
                ring.publish(head)
        if avail_step % 3 == 0:
            rig.guest.tx.set_avail_idx(rig.guest.tx.avail_idx + avail_step)
        with contextlib.suppress(OSError):  # the guest may have reset the connection
            client.sendall(b"data for the guest")
        rig.settle(5)
        assert_consistent(rig)


port = st.sampled_from([GUEST_PORT, 9, 5000, 1073741825, 0, 2**32 - 1])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packets=st.lists(
        st.tuples(
            st.integers(0, 9),  # op
            port,
            port,
            st.binary(max_size=200),
            st.integers(0, 3),  # flags
            st.integers(0, 2**32 - 1),  # buf_alloc
            st.integers(0, 2**32 - 1),  # fwd_cnt
            st.sampled_from([1, 2, 0]),  # type
            st.sampled_from([GUEST_CID, 4]),  # src_cid
            st.one_of(st.none(), st.integers(0, MAX_PAYLOAD + 1)),  # a lying len
        ),
        max_size=12,
    )
)
def test_random_packets_never_break_the_backend(
    packets: list[tuple[int, int, int, bytes, int, int, int, int, int, int | None]],
) -> None:
    with Rig(queue_size=16) as rig:
        rig.unix_listener(5000)
        client, request = rig.connect_from_host()
        for op, src, dst, payload, flags, buf_alloc, fwd_cnt, kind, cid, length in packets:
            if not rig.guest.tx.free or len(rig.guest.tx.free) < 2:
                rig.settle(2)
            rig.guest.send(
                op,
                src,
                dst,
                payload,
                flags=flags,
                buf_alloc=buf_alloc,
                fwd_cnt=fwd_cnt,
                kind=kind,
                src_cid=cid,
                length=length,
            )
        with contextlib.suppress(OSError):  # the guest may have reset the connection
            client.sendall(b"host data")
        rig.settle(5)
        assert_consistent(rig)
        assert rig.device.queue(TX).last_avail == rig.guest.tx.avail_idx
        assert request.src_port == 1073741825
