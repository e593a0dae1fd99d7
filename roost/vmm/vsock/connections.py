"""One vsock stream connection between a host Unix socket and a guest port: its state, its
buffers both ways and the credit that gates each way.

Credit (virtio 1.2, 5.10.6.3): each side tells the other how much it may buffer (`buf_alloc`) and
how much it has passed on so far (`fwd_cnt`); a sender keeps what it has sent minus the peer's
`fwd_cnt` within the peer's `buf_alloc`. Host data goes to the guest only within the guest's
credit (newer Linux drops packets beyond it). Guest data is counted as forwarded once the host
socket has taken it, so a guest that keeps to our credit never makes us buffer more than
BUF_ALLOC for it; one that does not is reset.
"""

from __future__ import annotations

import enum
import socket
from collections import deque
from collections.abc import Callable
from selectors import EVENT_READ, EVENT_WRITE

from roost.vmm.vsock.packets import (
    HEADER,
    HOST_CID,
    MAX_PAYLOAD,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Header,
)

BUF_ALLOC = 256 * 1024  # what we let the guest have in flight per connection
READ_CHUNK = 64 * 1024
CONNECT_TIMEOUT = 2.0  # for the guest to answer a request (as Firecracker)
SHUTDOWN_TIMEOUT = 2.0  # for a closing connection to finish before it is reset (as Firecracker)
U32 = 0xFFFFFFFF


class Tally:
    """Bytes buffered one way, summed over all of a VM's connections."""

    def __init__(self) -> None:
        self.bytes = 0


class ByteQueue:
    """Bytes waiting to go one way, kept in the chunks they came in (no copy on the way in)."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.chunks: deque[bytes] = deque()
        self.offset = 0  # into the first chunk
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.size += len(data)
            self.tally.bytes += len(data)

    def head(self) -> memoryview:
        return memoryview(self.chunks[0])[self.offset :]

    def drop(self, count: int) -> None:
        """Forget the first `count` bytes (at most the first chunk's)."""
        self.offset += count
        self.size -= count
        self.tally.bytes -= count
        if self.offset == len(self.chunks[0]):
            self.chunks.popleft()
            self.offset = 0

    def take(self, count: int) -> bytes:
        """The first `count` bytes (at most len(self)), removed."""
        pieces = []
        while count > 0:
            piece = self.head()[:count]
            pieces.append(piece)
            count -= len(piece)
            self.drop(len(piece))
        return b"".join(pieces)

    def clear(self) -> None:
        self.tally.bytes -= self.size
        self.chunks.clear()
        self.offset = self.size = 0


class State(enum.Enum):
    CONNECTING = "connecting"  # host-initiated: REQUEST queued or sent, no RESPONSE yet
    ESTABLISHED = "established"
    CLOSING = "closing"  # the host's side ended: SHUTDOWN sent, waiting for the guest's RST


class Connection:
    """A connection as the host side sees it. Its methods change its state and buffers and
    never raise for what the guest or the host peer did: a connection that must go sets
    `ending` (why) and `reset_guest` (whether the guest must hear an RST), and its owner
    removes it."""

    def __init__(
        self,
        sock: socket.socket,
        local_port: int,
        peer_port: int,
        guest_cid: int,
        state: State,
        tallies: tuple[Tally, Tally],
        clock: Callable[[], float],
    ) -> None:
        self.sock = sock
        self.local_port = local_port
        self.peer_port = peer_port
        self.guest_cid = guest_cid
        self.state = state
        self.clock = clock
        self.to_guest = ByteQueue(tallies[0])
        self.to_host = ByteQueue(tallies[1])
        self.fwd_cnt = 0  # guest bytes the host socket has taken
        self.advertised_fwd_cnt = 0  # fwd_cnt as the guest last heard it
        self.tx_cnt = 0  # host bytes sent to the guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.send_request = state is State.CONNECTING
        self.send_response = state is State.ESTABLISHED  # guest-initiated: answer its REQUEST
        self.send_credit_update = False
        self.send_shutdown = False
        self.host_eof = False
        self.host_write_shut = False
        self.peer_shut = 0  # SHUTDOWN flags from the guest
        self.deadline = clock() + CONNECT_TIMEOUT if state is State.CONNECTING else None
        self.ending: str | None = None
        self.reset_guest = True
        self.overflowed = False
        self.watching = 0  # the selector events registered for `sock`

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def end(self, why: str, *, reset_guest: bool = True) -> None:
        if self.ending is None:
            self.ending = why
            self.reset_guest = reset_guest

    def peer_credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32))

    # --- from the guest ---------------------------------------------------------------------

    def guest_packet(self, header: Header, payload: memoryview) -> None:
        self.peer_buf_alloc = header.buf_alloc
        self.peer_fwd_cnt = header.fwd_cnt
        op = header.op
        if op == OP_RST:
            self.end("reset by the guest", reset_guest=False)
        elif self.state is State.CONNECTING:
            if op == OP_RESPONSE:
                self._accepted()
            else:
                self.end(f"op {op} before the guest accepted")
        elif op == OP_RW:
            self._data_for_host(payload)
        elif op == OP_SHUTDOWN:
            self.peer_shut |= header.flags & SHUTDOWN_BOTH
            if self.peer_shut & SHUTDOWN_RCV:
                self.to_guest.clear()
            self._settle()
        elif op == OP_CREDIT_REQUEST:
            self.send_credit_update = True
        elif op != OP_CREDIT_UPDATE:  # its credit is taken above, like every packet's
            self.end(f"op {op} on an open connection")

    def _accepted(self) -> None:
        """The guest accepted a host client's CONNECT: tell the client, as Firecracker does.
        Nothing was written to this socket before, so its buffer takes the line whole."""
        self.state = State.ESTABLISHED
        self.deadline = None
        line = f"OK {self.local_port}\n".encode()
        try:
            sent = self.sock.send(line)
        except OSError:
            sent = 0
        if sent != len(line):
            self.end("the host client is gone")
        self._settle()

    def _data_for_host(self, payload: memoryview) -> None:
        if self.peer_shut & SHUTDOWN_SEND:
            self.end("data after the guest's shutdown")
            return
        sent = 0
        if not self.to_host:
            sent = self._send_to_host(payload)
        if sent < len(payload):
            self.to_host.push(bytes(payload[sent:]))
            if len(self.to_host) > BUF_ALLOC:
                self.overflowed = True
                self.end(f"the guest sent {len(self.to_host)} bytes, beyond its credit")

    def _send_to_host(self, data: memoryview) -> int:
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as error:
            self.end(f"host socket: {error.strerror}")
            return 0
        self.fwd_cnt = (self.fwd_cnt + sent) & U32
        if (self.fwd_cnt - self.advertised_fwd_cnt) & U32 >= BUF_ALLOC // 2:
            self.send_credit_update = True
        return sent

    # --- from the host ----------------------------------------------------------------------

    def host_readable(self) -> None:
        room = min(READ_CHUNK, BUF_ALLOC - len(self.to_guest))
        if room <= 0:  # recv(0) would read as the end of the stream
            return
        try:
            data = self.sock.recv(room)
        except BlockingIOError:
            return
        except OSError as error:
            self.end(f"host socket: {error.strerror}")
            return
        if data:
            self.to_guest.push(data)
        else:
            self.host_eof = True
            self._settle()

    def host_writable(self) -> None:
        while self.to_host and self.ending is None:
            sent = self._send_to_host(self.to_host.head())
            if sent == 0:
                break
            self.to_host.drop(sent)
        self._settle()

    def interest(self, reading_allowed: bool) -> int:
        """The selector events this connection waits for on its host socket."""
        reading = (
            reading_allowed
            and not self.host_eof
            and not self.peer_shut & SHUTDOWN_RCV
            and len(self.to_guest) < BUF_ALLOC
        )
        return (EVENT_READ if reading else 0) | (EVENT_WRITE if self.to_host else 0)

    def _settle(self) -> None:
        """Move on once buffers drain: pass the guest's shutdown on to the host socket, finish
        a connection the guest closed, tell the guest the host's side ended."""
        if self.to_host:
            if self.peer_shut == SHUTDOWN_BOTH and self.deadline is None:
                self.deadline = self.clock() + SHUTDOWN_TIMEOUT
            return
        if self.peer_shut == SHUTDOWN_BOTH:
            self.end("closed by the guest")  # the guest waits for our RST
            return
        if self.peer_shut & SHUTDOWN_SEND and not self.host_write_shut:
            self.host_write_shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as error:
                self.end(f"host socket: {error.strerror}")
        if self.host_eof and not self.to_guest and self.state is State.ESTABLISHED:
            self.send_shutdown = True

    # --- to the guest -----------------------------------------------------------------------

    def wants_rx(self) -> bool:
        return (
            self.send_request
            or self.send_response
            or self.send_credit_update
            or self.send_shutdown
            or self._data_ready()
        )

    def _data_ready(self) -> bool:
        return (
            self.state is not State.CONNECTING
            and bool(self.to_guest)
            and not self.peer_shut & SHUTDOWN_RCV
            and self.peer_credit() > 0
        )

    def next_packet(self, capacity: int) -> bytes | None:
        """The next packet for the guest, at most `capacity` bytes with its header, or None."""
        if self.send_request:
            self.send_request = False
            return self._header(OP_REQUEST)
        if self.send_response:
            self.send_response = False
            return self._header(OP_RESPONSE)
        if self._data_ready():
            count = min(capacity - HEADER.size, MAX_PAYLOAD, len(self.to_guest), self.peer_credit())
            if count > 0:
                payload = self.to_guest.take(count)
                self.tx_cnt = (self.tx_cnt + count) & U32
                self._settle()
                return self._header(OP_RW, len(payload)) + payload
        if self.send_credit_update:
            return self._header(OP_CREDIT_UPDATE)
        if self.send_shutdown:
            self.send_shutdown = False
            self.state = State.CLOSING
            self.deadline = self.clock() + SHUTDOWN_TIMEOUT
            return self._header(OP_SHUTDOWN, flags=SHUTDOWN_BOTH)
        return None

    def _header(self, op: int, length: int = 0, flags: int = 0) -> bytes:
        """Every packet tells the guest our credit, so none needs a CREDIT_UPDATE of its own."""
        self.advertised_fwd_cnt = self.fwd_cnt
        self.send_credit_update = False
        return Header(
            HOST_CID,
            self.guest_cid,
            self.local_port,
            self.peer_port,
            length,
            TYPE_STREAM,
            op,
            flags,
            BUF_ALLOC,
            self.fwd_cnt,
        ).pack()

    # --- time and the end -------------------------------------------------------------------

    def expire(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            if self.state is State.CONNECTING:
                self.end("the guest did not answer the connection request")
            else:
                self.end("the connection did not finish closing in time")

    def close(self) -> None:
        self.sock.close()
        self.to_guest.clear()
        self.to_host.clear()
