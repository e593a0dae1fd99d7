"""The host side of the device, with Firecracker's hybrid vsock semantics on Unix sockets.

Host to guest: a client connects to the `--uds` socket and writes `CONNECT <port>\\n`; the guest
gets a REQUEST from a fresh local port and, once it answers RESPONSE, the client reads
`OK <local port>\\n` and the connection relays bytes both ways. Guest to host: a REQUEST to
CID 2 port P is a connection to the Unix socket `<uds>_<P>`: RESPONSE if one listens there,
RST if not. The end of a host stream becomes SHUTDOWN (both ways) to the guest, as Firecracker
does, and the guest's RST closes the host socket.

All of a VM's connections share one bound (`max_buffered`) on the bytes waiting in the backend:
above it no host socket is read and the guest's tx queue waits, so memory stays bounded
whatever the guest and the host clients do.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import selectors
import socket
import stat
import time
from collections import deque
from collections.abc import Callable

from roost.vmm.vsock.connections import Connection, State, Tally
from roost.vmm.vsock.memory import GuestError
from roost.vmm.vsock.packets import HOST_CID, OP_REQUEST, OP_RST, TYPE_STREAM, Header

log = logging.getLogger("roost.vmm.vsock")

FIRST_LOCAL_PORT = 2**30 + 1  # Firecracker's first port for host-initiated connections
LAST_PORT = 2**32 - 2  # 2**32 - 1 is VMADDR_PORT_ANY
MAX_CONNECTIONS = 1024
# RSTs waiting for rx buffers: beyond it none is made for an unknown connection, and tx waits
MAX_RESETS = 1024
MAX_CONNECT_LINE = 64
ACCEPTS_PER_EVENT = 64


def listen(path: str) -> socket.socket:
    """A non-blocking Unix listener at `path` whose socket file appears only once it listens
    (its file is what tells QEMU and the daemon the backend is ready, and a client connecting
    between bind() and listen() is refused): bound at a temporary name in the same directory,
    then renamed onto `path`, replacing a stale socket there. A path that is not a socket is an
    error: it is not ours to replace."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EADDRINUSE, "a file that is not a socket is there", path)
    directory, name = os.path.split(path)
    temporary = f".listening-{os.getpid()}"
    folder = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):  # left by a killed backend of this PID
            os.unlink(temporary, dir_fd=folder)
        sock.bind(f"/proc/self/fd/{folder}/{temporary}")  # short whatever the directory's path
        sock.listen(128)
        os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=folder)
        raise
    finally:
        os.close(folder)
    sock.setblocking(False)
    return sock


class HybridHost:
    """The connection table between guest ports and host Unix sockets, and the packets the
    guest is owed (fed into the rx queue as buffers come)."""

    def __init__(
        self,
        listener: socket.socket,
        uds_path: str,
        guest_cid: int,
        selector: selectors.BaseSelector,
        *,
        max_buffered: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.listener = listener
        self.uds_path = uds_path
        self.guest_cid = guest_cid
        self.selector = selector
        self.max_buffered = max_buffered
        self.clock = clock
        self.connections: dict[tuple[int, int], Connection] = {}
        self.handshakes: dict[socket.socket, bytes] = {}  # clients before their CONNECT line
        self.rx_order: dict[tuple[int, int], None] = {}  # connections owed a packet, in turn
        self.timed: dict[tuple[int, int], Connection] = {}  # connections with a deadline
        self.resets: deque[bytes] = deque()
        self.to_guest = Tally()
        self.to_host = Tally()
        self.next_port = FIRST_LOCAL_PORT
        self.reading_allowed = True
        self.accepting = True  # False while out of file descriptors
        selector.register(listener, selectors.EVENT_READ, self._accept)

    # --- budget -----------------------------------------------------------------------------

    def tx_allowed(self) -> bool:
        """Whether the guest's tx queue may be read: guest data waiting for host sockets is
        within the bound (it drains as host clients read, whatever the guest does), and so are
        the RSTs waiting for the guest's rx buffers (a packet may end a connection, and a guest
        that takes no RST must not make them pile up)."""
        return self.to_host.bytes < self.max_buffered and len(self.resets) < MAX_RESETS

    def _reading_allowed(self) -> bool:
        return self.to_guest.bytes + self.to_host.bytes < self.max_buffered

    # --- packets from the guest -------------------------------------------------------------

    def guest_packet(self, header: Header, payload: memoryview) -> None:
        if header.src_cid != self.guest_cid:
            raise GuestError(
                f"a packet from CID {header.src_cid}, not the guest's {self.guest_cid}"
            )
        if header.dst_cid != HOST_CID or header.type != TYPE_STREAM:
            self._refuse(header)  # nobody there, or a socket type Firecracker has neither
            return
        key = (header.dst_port, header.src_port)
        connection = self.connections.get(key)
        if header.op == OP_REQUEST:
            if connection is not None:
                connection.end("the guest asked for it again")
                self._after(connection)
            else:
                self._dial(header)
        elif connection is None:
            self._refuse(header)
        else:
            connection.guest_packet(header, payload)
            self._after(connection)

    def _refuse(self, header: Header) -> None:
        """Answer RST, from where the packet went to where it came from (never to an RST)."""
        if header.op != OP_RST and len(self.resets) < MAX_RESETS:
            reset = (header.dst_cid, header.src_cid, header.dst_port, header.src_port, 0)
            self.resets.append(Header(*reset, header.type, OP_RST, 0, 0, 0).pack())

    def _dial(self, header: Header) -> None:
        """The guest connects to the host: to the Unix socket `<uds>_<port>`. A Unix connect
        succeeds or fails at once (EAGAIN for a full backlog counts as a refusal)."""
        if len(self.connections) >= MAX_CONNECTIONS:
            self._refuse(header)
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:  # out of file descriptors
            self._refuse(header)
            return
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{header.dst_port}")
        except OSError:
            sock.close()
            self._refuse(header)
            return
        connection = self._connection(sock, header.dst_port, header.src_port, State.ESTABLISHED)
        connection.peer_buf_alloc = header.buf_alloc
        connection.peer_fwd_cnt = header.fwd_cnt
        self._after(connection)

    # --- host clients -----------------------------------------------------------------------

    def _accept(self, _events: int) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, _address = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as error:  # out of fds: clients wait in the backlog until one closes
                log.warning("cannot accept host clients for now: %s", error)
                self.selector.unregister(self.listener)
                self.accepting = False
                return
            sock.setblocking(False)
            self.handshakes[sock] = b""
            handler = functools.partial(self._read_line, sock)
            self.selector.register(sock, selectors.EVENT_READ, handler)

    def _resume_accepting(self) -> None:
        """A host socket was closed: if accepting had stopped for want of fds, go on."""
        if not self.accepting:
            self.accepting = True
            self.selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def _read_line(self, sock: socket.socket, _events: int) -> None:
        """Read the client's `CONNECT <port>\\n`; anything else closes it (as Firecracker)."""
        if sock not in self.handshakes:
            return
        received = self.handshakes[sock]
        try:
            data = sock.recv(MAX_CONNECT_LINE - len(received))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        received += data
        self.handshakes[sock] = received
        line, newline, rest = received.partition(b"\n")
        if not newline and data and len(received) < MAX_CONNECT_LINE:
            return
        self._drop_handshake(sock)
        port = _connect_port(line) if newline else None
        if port is None or len(self.connections) >= MAX_CONNECTIONS:
            sock.close()
            self._resume_accepting()
            return
        connection = self._connection(sock, self._free_port(port), port, State.CONNECTING)
        connection.to_guest.push(rest)  # sent once the guest accepts
        self._after(connection)

    def _drop_handshake(self, sock: socket.socket) -> None:
        del self.handshakes[sock]
        self.selector.unregister(sock)

    def _free_port(self, peer_port: int) -> int:
        """The next local port (counting up from 2**30 + 1 and around) no connection uses."""
        in_use = {connection.local_port for connection in self.connections.values()}
        while True:
            port = self.next_port
            self.next_port = port + 1 if port < LAST_PORT else FIRST_LOCAL_PORT
            if port not in in_use and (port, peer_port) not in self.connections:
                return port

    # --- connections ------------------------------------------------------------------------

    def _connection(self, sock: socket.socket, local: int, peer: int, state: State) -> Connection:
        tallies = (self.to_guest, self.to_host)
        connection = Connection(sock, local, peer, self.guest_cid, state, tallies, self.clock)
        self.connections[connection.key] = connection
        return connection

    def _host_event(self, connection: Connection, events: int) -> None:
        if connection.ending is not None or self.connections.get(connection.key) is not connection:
            return
        if events & selectors.EVENT_WRITE:
            connection.host_writable()
        reading = events & selectors.EVENT_READ and connection.ending is None
        if reading and self._reading_allowed():  # a read may pass the bound by one chunk
            connection.host_readable()
        self._after(connection)

    def _after(self, connection: Connection) -> None:
        """Bookkeeping after anything happened to a connection: remove it if it ended, else
        queue it for the rx queue if it owes the guest a packet, and watch its socket."""
        if connection.ending is not None:
            self._remove(connection)
            return
        if connection.wants_rx():
            self.rx_order[connection.key] = None
        if connection.deadline is not None:
            self.timed[connection.key] = connection
        else:
            self.timed.pop(connection.key, None)
        self._watch(connection)

    def _watch(self, connection: Connection) -> None:
        events = connection.interest(self.reading_allowed)
        if events == connection.watching:
            return
        handler = functools.partial(self._host_event, connection)
        if not events:
            self.selector.unregister(connection.sock)
        elif connection.watching:
            self.selector.modify(connection.sock, events, handler)
        else:
            self.selector.register(connection.sock, events, handler)
        connection.watching = events

    def _remove(self, connection: Connection) -> None:
        del self.connections[connection.key]
        self.rx_order.pop(connection.key, None)
        self.timed.pop(connection.key, None)
        if connection.watching:
            self.selector.unregister(connection.sock)
        connection.close()
        if connection.overflowed:
            log.warning(
                "connection %d:%d reset: %s",
                connection.local_port,
                connection.peer_port,
                connection.ending,
            )
        self._resume_accepting()
        if connection.reset_guest:
            header = Header(
                HOST_CID, self.guest_cid, *connection.key, 0, TYPE_STREAM, OP_RST, 0, 0, 0
            )
            self.resets.append(header.pack())

    # --- packets to the guest ---------------------------------------------------------------

    def has_rx_work(self) -> bool:
        return bool(self.resets or self.rx_order)

    def next_packet(self, capacity: int) -> bytes | None:
        """The next packet owed to the guest that fits `capacity` bytes (at least a header):
        RSTs first, then one packet per connection in turn."""
        if self.resets:
            return self.resets.popleft()
        for _ in range(len(self.rx_order)):
            key = next(iter(self.rx_order))
            del self.rx_order[key]
            connection = self.connections.get(key)
            if connection is None:
                continue
            packet = connection.next_packet(capacity)
            self._after(connection)
            if packet is not None:
                return packet
        return None

    # --- time and the end -------------------------------------------------------------------

    def wait_time(self) -> float | None:
        """How long the event loop may sleep before a connection's deadline passes."""
        deadlines = [c.deadline for c in self.timed.values() if c.deadline is not None]
        return max(0.0, min(deadlines) - self.clock()) if deadlines else None

    def expire(self) -> None:
        """End the connections past their deadline."""
        now = self.clock()
        for connection in list(self.timed.values()):
            connection.expire(now)
            self._after(connection)

    def rebalance(self) -> None:
        """When the buffered total crossed the bound, start or stop reading host sockets."""
        allowed = self._reading_allowed()
        if allowed != self.reading_allowed:
            self.reading_allowed = allowed
            for connection in self.connections.values():
                self._watch(connection)

    def close_all(self) -> None:
        """The device stopped: the guest has forgotten every connection without an RST, so close
        every host socket (else its client would wait forever)."""
        for connection in list(self.connections.values()):
            connection.end("the device stopped", reset_guest=False)
            self._remove(connection)
        for sock in list(self.handshakes):
            self._drop_handshake(sock)
            sock.close()
        self.resets.clear()

    def close(self) -> None:
        self.close_all()
        if self.accepting:
            self.selector.unregister(self.listener)
        self.listener.close()


def _connect_port(line: bytes) -> int | None:
    """The port of a `CONNECT <port>` line (any case, as Firecracker), or None."""
    words = line.split()
    if len(words) != 2 or words[0].upper() != b"CONNECT" or not words[1].isdigit():
        return None
    port = int(words[1])
    return port if port <= LAST_PORT else None
