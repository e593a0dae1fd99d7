"""The vsock backend's connections, host side on real Unix sockets and the guest faked in
memory: Firecracker's hybrid handshake both ways, data, credit, shutdown, RST, timeouts, the
device stopping and the bound on buffered bytes."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import pytest

from roost.vmm.vsock.connections import BUF_ALLOC, CONNECT_TIMEOUT, SHUTDOWN_TIMEOUT
from roost.vmm.vsock.device import RX, TX
from roost.vmm.vsock.hybrid import FIRST_LOCAL_PORT, LAST_PORT, MAX_RESETS
from roost.vmm.vsock.packets import (
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
)
from tests.vsock_guest import GUEST_CID, Rig

GUEST_PORT = 1024


class Clock:
    """Time the tests move by hand, for the backend's deadlines."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def timed_rig(clock: Clock) -> Iterator[Rig]:
    with Rig(clock=clock) as instance:
        yield instance


def guest_data(rig: Rig, local_port: int, count: int) -> bytes:
    """Run until the guest has received `count` bytes of RW payload from `local_port`."""
    data = bytearray()

    def enough() -> bool:
        for packet in [p for p in rig.guest.received if p[0].src_port == local_port]:
            if packet[0].op == OP_RW:
                data.extend(packet[1])
                rig.guest.received.remove(packet)
        return len(data) >= count

    rig.run_until(enough)
    return bytes(data)


def test_a_host_client_connects_to_the_guest_and_data_flows_both_ways(rig: Rig) -> None:
    client = rig.unix_client()
    client.sendall(b"CONNECT 1024\n")
    request, _ = rig.expect(OP_REQUEST)
    assert (request.src_cid, request.dst_cid) == (HOST_CID, GUEST_CID)
    assert (request.src_port, request.dst_port) == (FIRST_LOCAL_PORT, GUEST_PORT)
    rig.guest.send(OP_RESPONSE, GUEST_PORT, request.src_port)
    assert rig.read(client, 14) == b"OK 1073741825\n"

    client.sendall(b"ping")
    assert guest_data(rig, request.src_port, 4) == b"ping"
    rig.guest.send(OP_RW, GUEST_PORT, request.src_port, b"pong")
    assert rig.read(client, 4) == b"pong"


def test_nothing_reaches_the_host_client_before_the_guest_accepts(rig: Rig) -> None:
    client = rig.unix_client()
    client.sendall(b"CONNECT 1024\nearly bytes")
    request, _ = rig.expect(OP_REQUEST)
    rig.settle()
    with pytest.raises(BlockingIOError):
        client.recv(1)
    rig.guest.send(OP_RESPONSE, GUEST_PORT, request.src_port)
    assert rig.read(client, 14) == b"OK 1073741825\n"
    assert guest_data(rig, request.src_port, 11) == b"early bytes"


def test_host_data_is_split_to_fit_the_older_two_descriptor_rx_buffers() -> None:
    with Rig(rx_layout="split") as rig:
        client, request = rig.connect_from_host()
        data = os.urandom(50_000)
        client.sendall(data)
        assert guest_data(rig, request.src_port, len(data)) == data
        assert rig.guest.rx.chains  # posted buffers of two descriptors each
        assert all(len(chain) == 2 for chain in rig.guest.rx.chains.values())


def test_host_data_beyond_the_guests_credit_waits_for_a_credit_update(rig: Rig) -> None:
    client = rig.unix_client()
    client.sendall(b"CONNECT 1024\n")
    request, _ = rig.expect(OP_REQUEST)
    rig.guest.send(OP_RESPONSE, GUEST_PORT, request.src_port, buf_alloc=8192)
    rig.read(client, 14)
    data = os.urandom(20_000)
    client.sendall(data)
    assert guest_data(rig, request.src_port, 8192) == data[:8192]
    rig.settle()
    assert OP_RW not in rig.ops()
    # the guest's application read 8 KiB: it tells the host through a credit update
    rig.guest.send(OP_CREDIT_UPDATE, GUEST_PORT, request.src_port, buf_alloc=8192, fwd_cnt=8192)
    assert guest_data(rig, request.src_port, 8192) == data[8192:16384]
    rig.guest.send(OP_CREDIT_UPDATE, GUEST_PORT, request.src_port, buf_alloc=8192, fwd_cnt=16384)
    assert guest_data(rig, request.src_port, 20_000 - 16384) == data[16384:]


def test_the_backend_grants_credit_and_renews_it_once_half_is_forwarded(rig: Rig) -> None:
    client, request = rig.connect_from_host()
    chunk = os.urandom(32 * 1024)
    for _ in range(BUF_ALLOC // 2 // len(chunk)):
        rig.guest.send(OP_RW, GUEST_PORT, request.src_port, chunk)
    assert rig.read(client, BUF_ALLOC // 2) == chunk * (BUF_ALLOC // 2 // len(chunk))
    update, _ = rig.expect(OP_CREDIT_UPDATE)
    assert (update.buf_alloc, update.fwd_cnt) == (BUF_ALLOC, BUF_ALLOC // 2)


def test_a_credit_request_is_answered_with_the_credit(rig: Rig) -> None:
    client, request = rig.connect_from_host()
    rig.guest.send(OP_RW, GUEST_PORT, request.src_port, b"abc")
    assert rig.read(client, 3) == b"abc"
    rig.guest.send(OP_CREDIT_REQUEST, GUEST_PORT, request.src_port)
    update, _ = rig.expect(OP_CREDIT_UPDATE)
    assert (update.buf_alloc, update.fwd_cnt) == (BUF_ALLOC, 3)


def test_the_end_of_a_host_stream_is_a_shutdown_and_the_guests_rst_closes_it(rig: Rig) -> None:
    client, request = rig.connect_from_host()
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    assert guest_data(rig, request.src_port, 10) == b"last words"
    shutdown, _ = rig.expect(OP_SHUTDOWN)
    assert shutdown.flags == SHUTDOWN_BOTH
    rig.guest.send(OP_RST, GUEST_PORT, request.src_port)
    assert rig.read(client, 1) == b""
    assert not rig.host.connections


def test_a_guest_close_is_answered_with_rst_once_its_data_reached_the_host(rig: Rig) -> None:
    client, request = rig.connect_from_host()
    rig.guest.send(OP_RW, GUEST_PORT, request.src_port, b"bye")
    rig.guest.send(OP_SHUTDOWN, GUEST_PORT, request.src_port, flags=SHUTDOWN_BOTH)
    rig.expect(OP_RST, src_port=request.src_port, dst_port=GUEST_PORT)
    assert rig.read(client, 10) == b"bye"
    assert not rig.host.connections


def test_a_guest_that_stops_sending_half_closes_the_host_socket(rig: Rig) -> None:
    client, request = rig.connect_from_host()
    rig.guest.send(OP_SHUTDOWN, GUEST_PORT, request.src_port, flags=SHUTDOWN_SEND)
    assert rig.read(client, 1) == b""
    client.sendall(b"still heard")
    assert guest_data(rig, request.src_port, 11) == b"still heard"


def test_a_guest_rst_closes_the_host_client(rig: Rig) -> None:
    client, request = rig.connect_from_host()
    rig.guest.send(OP_RST, GUEST_PORT, request.src_port)
    assert rig.read(client, 1) == b""
    rig.settle()
    assert OP_RST not in rig.ops()  # an RST is never answered


def test_a_connect_the_guest_refuses_closes_the_host_client_without_ok(rig: Rig) -> None:
    client = rig.unix_client()
    client.sendall(b"connect 1025\n")  # any case, as Firecracker
    request, _ = rig.expect(OP_REQUEST, dst_port=1025)
    rig.guest.send(OP_RST, 1025, request.src_port)
    assert rig.read(client, 100) == b""


@pytest.mark.parametrize("line", [b"HELLO 1024\n", b"CONNECT\n", b"CONNECT -1\n", b"x" * 80])
def test_a_client_that_does_not_send_a_connect_line_is_closed(rig: Rig, line: bytes) -> None:
    client = rig.unix_client()
    client.sendall(line)
    assert rig.read(client, 1) == b""
    assert OP_REQUEST not in rig.ops()


def test_a_connect_the_guest_never_answers_times_out(timed_rig: Rig, clock: Clock) -> None:
    client = timed_rig.unix_client()
    client.sendall(b"CONNECT 1024\n")
    request, _ = timed_rig.expect(OP_REQUEST)
    clock.now += CONNECT_TIMEOUT - 0.1
    timed_rig.settle()
    assert not timed_rig.closed_by_backend(client)
    clock.now += 0.2
    assert timed_rig.read(client, 1) == b""
    timed_rig.expect(OP_RST, src_port=request.src_port)


def test_a_closing_connection_the_guest_never_finishes_is_reset(
    timed_rig: Rig, clock: Clock
) -> None:
    client, request = timed_rig.connect_from_host()
    client.shutdown(socket.SHUT_WR)
    timed_rig.expect(OP_SHUTDOWN)
    clock.now += SHUTDOWN_TIMEOUT + 0.1
    timed_rig.expect(OP_RST, src_port=request.src_port)
    assert timed_rig.read(client, 1) == b""


def test_the_guest_connects_to_a_host_listener_on_uds_underscore_port(rig: Rig) -> None:
    listener = rig.unix_listener(5000)
    rig.guest.send(OP_REQUEST, 40000, 5000)
    response, _ = rig.expect(OP_RESPONSE)
    assert (response.src_port, response.dst_port) == (5000, 40000)
    server = rig.accept(listener)
    rig.guest.send(OP_RW, 40000, 5000, b"hello host")
    assert rig.read(server, 10) == b"hello host"
    server.sendall(b"hello guest")
    assert guest_data(rig, 5000, 11) == b"hello guest"


def test_a_guest_connection_to_a_port_nobody_listens_on_is_reset(rig: Rig) -> None:
    rig.guest.send(OP_REQUEST, 40001, 5001)
    reset, _ = rig.expect(OP_RST)
    assert (reset.src_port, reset.dst_port, reset.dst_cid) == (5001, 40001, GUEST_CID)
    assert not rig.host.connections


def test_packets_for_no_connection_or_another_cid_are_answered_with_rst(rig: Rig) -> None:
    rig.guest.send(OP_RW, 40002, 6000, b"stray")
    rig.expect(OP_RST, src_port=6000, dst_port=40002)
    rig.guest.send(OP_REQUEST, 40003, 6000, dst_cid=7)
    reset, _ = rig.expect(OP_RST, dst_port=40003)
    assert reset.src_cid == 7
    rig.guest.send(OP_REQUEST, 40004, 6000, kind=2)  # SEQPACKET, which Firecracker lacks too
    rig.expect(OP_RST, dst_port=40004, type=2)


def test_a_packet_claiming_another_source_cid_is_refused(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    listener = rig.unix_listener(5000)
    with caplog.at_level(logging.WARNING, logger="roost.vmm.vsock"):
        rig.guest.send(OP_REQUEST, 40000, 5000, src_cid=9)
        rig.settle()
    assert "a packet from CID 9" in caplog.text
    assert not rig.host.connections
    with pytest.raises(BlockingIOError):
        listener.accept()


def restart(rig: Rig, bases: tuple[int, int]) -> None:
    """What QEMU sends to start a stopped device: each queue's position, then its kick."""
    for index, base in zip((RX, TX), bases, strict=True):
        rig.device.queue(index).last_avail = base
        rig.device.set_kick(index, os.dup(rig.guest.kicks[index]))


def test_a_device_reset_closes_every_host_connection(rig: Rig) -> None:
    first, _ = rig.connect_from_host()
    second, _ = rig.connect_from_host(1025)
    listener = rig.unix_listener(5000)
    rig.guest.send(OP_REQUEST, 40000, 5000)
    rig.expect(OP_RESPONSE)
    third = rig.accept(listener)
    waiting = rig.unix_client()  # has not sent its CONNECT line yet
    rig.settle()
    rig.device.stop_queue(RX)
    rig.device.stop_queue(TX)
    rig.settle()
    assert len(rig.host.connections) == 3  # stopped: maybe paused, maybe reset
    restart(rig, (0, 0))  # the queues start over: the guest's driver was reset
    for sock in (first, second, third, waiting):
        assert rig.read(sock, 1) == b""
    assert not rig.host.connections


def test_a_device_paused_and_resumed_keeps_its_connections(rig: Rig) -> None:
    client, request = rig.connect_from_host()
    bases = (rig.device.stop_queue(RX), rig.device.stop_queue(TX))
    client.sendall(b"sent while paused")
    rig.settle()
    restart(rig, bases)  # QEMU hands back the positions it was given: a resume
    assert guest_data(rig, request.src_port, 17) == b"sent while paused"
    rig.guest.send(OP_RW, GUEST_PORT, request.src_port, b"and after")
    assert rig.read(client, 9) == b"and after"


def test_local_ports_count_up_wrap_around_and_skip_ports_in_use(rig: Rig) -> None:
    first, _ = rig.connect_from_host()
    rig.host.next_port = LAST_PORT
    client = rig.unix_client()
    client.sendall(b"CONNECT 1024\n")
    assert rig.expect(OP_REQUEST)[0].src_port == LAST_PORT
    client = rig.unix_client()
    client.sendall(b"CONNECT 1024\n")
    # FIRST_LOCAL_PORT is still in use by the first connection
    assert rig.expect(OP_REQUEST)[0].src_port == FIRST_LOCAL_PORT + 1
    assert first.fileno() >= 0


def test_the_buffered_bound_stops_reading_host_sockets() -> None:
    with Rig(max_buffered=BUF_ALLOC) as rig:
        rig.guest.refill = False
        clients = [rig.connect_from_host(port)[0] for port in (1024, 1025)]
        rig.guest.collect()
        for client in clients:  # the guest posts no rx buffer, so nothing leaves
            with pytest.raises(BlockingIOError):
                while True:
                    client.send(b"x" * 65536)
        rig.settle(50)
        assert rig.host.to_guest.bytes <= BUF_ALLOC + 65536
        assert not rig.host.reading_allowed


def test_the_buffered_bound_withholds_guest_tx_until_the_host_reads() -> None:
    bound = 64 * 1024
    with Rig(max_buffered=bound) as rig:
        ports = range(1024, 1030)
        connections = [rig.connect_from_host(port) for port in ports]
        chunk = os.urandom(60_000)
        for port, (_, request) in zip(ports, connections, strict=True):
            for _ in range(4):  # 240,000 bytes each: within the credit of 256 KiB (the host
                rig.guest.send(OP_RW, port, request.src_port, chunk)  # socket takes ~200 KiB)
        rig.settle(50)
        assert rig.host.to_host.bytes >= bound
        waiting = (rig.guest.tx.avail_idx - rig.device.queue(TX).last_avail) & 0xFFFF
        assert waiting > 0  # tx chains left on the ring, not read into the backend
        for client, _ in connections:
            assert rig.read(client, 4 * len(chunk)) == 4 * chunk
        assert rig.device.queue(TX).last_avail == rig.guest.tx.avail_idx
        assert len(rig.host.connections) == 6  # nothing was reset: the guest kept its credit


def test_rsts_the_guest_does_not_take_withhold_its_tx_instead_of_piling_up(rig: Rig) -> None:
    listener = rig.unix_listener(5000)
    rig.guest.refill = False  # the guest takes what it has, then posts no rx buffer
    for _ in range(40):  # a REQUEST connects, the same again resets: 2,400 RSTs asked for
        for _ in range(min(30, len(rig.guest.tx.free) // 2)):
            rig.guest.send(OP_REQUEST, 40000, 5000)
            rig.guest.send(OP_REQUEST, 40000, 5000)
        rig.step()
        with contextlib.suppress(BlockingIOError):
            while True:
                listener.accept()[0].close()
    assert len(rig.host.resets) <= MAX_RESETS + 1
    waiting = (rig.guest.tx.avail_idx - rig.device.queue(TX).last_avail) & 0xFFFF
    assert waiting > 0  # tx chains left on the ring, not read into the backend
    rig.guest.refill = True  # the guest takes its RSTs: its tx goes on
    rig.guest.post_rx(64)
    rig.run_until(
        lambda: not rig.host.resets and rig.device.queue(TX).last_avail == rig.guest.tx.avail_idx
    )
    assert rig.ops().count(OP_RST) > MAX_RESETS


def test_a_guest_sending_beyond_its_credit_is_reset_and_the_others_go_on(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    greedy, greedy_request = rig.connect_from_host()
    other, other_request = rig.connect_from_host(1025)
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = os.urandom(64 * 1024)
    with caplog.at_level(logging.WARNING, logger="roost.vmm.vsock"):
        for _ in range(12):  # 768 KiB, never read by the host client
            rig.guest.send(OP_RW, GUEST_PORT, greedy_request.src_port, chunk)
        rig.expect(OP_RST, src_port=greedy_request.src_port)
    assert "beyond its credit" in caplog.text
    rig.guest.send(OP_RW, 1025, other_request.src_port, b"unaffected")
    assert rig.read(other, 10) == b"unaffected"
    assert len(rig.host.connections) == 1
    assert rig.host.to_host.bytes == 0
