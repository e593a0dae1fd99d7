"""The vsock device: its rx (0) and tx (1) queues, fed from and into the host side, and one turn
of the backend's event loop. QEMU runs the event queue (2) itself.

Each tx chain and each rx packet is one unit of work: what the guest got wrong in it (a
GuestError) is logged and costs that unit only. Logging is rate-limited, so a guest cannot
flood the log either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import time
from collections.abc import Callable, Iterator

from roost.vmm.vsock import packets
from roost.vmm.vsock.hybrid import HybridHost
from roost.vmm.vsock.memory import GuestError, GuestMemory
from roost.vmm.vsock.virtqueue import Chain, RingError, Virtqueue

log = logging.getLogger("roost.vmm.vsock")

RX, TX = 0, 1
# Chain sizes: an rx chain must hold a header and a byte of data (else host data would wait
# for ever behind it), and Linux posts about 4 KiB, so 1 MiB is no driver's doing; a tx chain
# is a header and at most one packet's payload.
MIN_RX = packets.HEADER.size + 1
MAX_RX = 1024 * 1024
MIN_TX = packets.HEADER.size
MAX_TX = packets.HEADER.size + packets.MAX_PAYLOAD


class FaultLog:
    """Logs what the guest did wrong: at most `burst` lines per `window` seconds, then how many
    were left out."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, burst: int = 20, window: float = 10.0
    ) -> None:
        self.clock = clock
        self.burst = burst
        self.window = window
        self.window_end = 0.0
        self.logged = 0
        self.left_out = 0
        self.total = 0

    def report(self, message: str) -> None:
        self.total += 1
        now = self.clock()
        if now >= self.window_end:
            if self.left_out:
                log.warning("%d more guest faults were not logged", self.left_out)
            self.window_end = now + self.window
            self.logged = self.left_out = 0
        if self.logged < self.burst:
            self.logged += 1
            log.warning("guest fault: %s", message)
        else:
            self.left_out += 1


class VsockDevice:
    """The two queues QEMU hands over, and their configuration as vhost-user sets it."""

    def __init__(self, host: HybridHost, selector: selectors.BaseSelector) -> None:
        self.host = host
        self.selector = selector
        self.faults = FaultLog()
        self.queues = self._new_queues()
        self.memory: GuestMemory | None = None
        self.active = False  # both queues started, and not stopped since
        self.stopped_at: tuple[int, ...] | None = None  # queue positions when it last stopped

    def _new_queues(self) -> tuple[Virtqueue, Virtqueue]:
        refuse = self.faults.report
        rx = Virtqueue("rx", writable=True, min_bytes=MIN_RX, max_bytes=MAX_RX, refuse=refuse)
        tx = Virtqueue("tx", writable=False, min_bytes=MIN_TX, max_bytes=MAX_TX, refuse=refuse)
        return rx, tx

    def queue(self, index: int) -> Virtqueue:
        if index not in (RX, TX):
            raise ValueError(f"no queue {index} (the backend runs rx 0 and tx 1)")
        return self.queues[index]

    # --- configuration ----------------------------------------------------------------------

    def set_memory(self, memory: GuestMemory) -> None:
        """A new memory table: started queues find their rings in it; the old one goes."""
        old, self.memory = self.memory, memory
        for queue in self.queues:
            if queue.started:
                queue.stop()
                self._start(queue)
        if old is not None:
            old.close()

    def set_kick(self, index: int, fd: int | None) -> None:
        """A queue's kick eventfd; getting one starts the queue (vhost-user's rule)."""
        queue = self.queue(index)
        self._forget_kick(queue)
        queue.kick = fd
        if fd is not None:
            self.selector.register(fd, selectors.EVENT_READ, lambda _events: _drain(fd))
        self._start(queue)

    def set_call(self, index: int, fd: int | None) -> None:
        """A queue's call eventfd (QEMU swaps it as the guest masks interrupts)."""
        queue = self.queue(index)
        if queue.call is not None:
            os.close(queue.call)
        queue.call = fd

    def _start(self, queue: Virtqueue) -> None:
        if self.memory is None or queue.addresses is None or queue.size == 0:
            return
        try:
            queue.start(self.memory)
        except GuestError as fault:
            log.warning("%s cannot start: %s", queue.name, fault)
            return
        if not self.active and all(q.started for q in self.queues):
            self.active = True
            bases = tuple(q.last_avail for q in self.queues)
            if self.stopped_at is None:
                log.info("device started (queue size %d)", queue.size)
            elif bases == self.stopped_at and any(bases):
                log.info("device resumed with %d connections", len(self.host.connections))
            else:
                self.host.close_all()
                log.info("device reset; host connections closed")
            self.stopped_at = None

    def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE: the queue stops. Once both have, the device may be paused (the VM
        stopped) or reset (the guest rebooted or rebound its driver): only the next start
        tells. A resumed device goes on where it stopped, so its connections stay; a reset one
        starts its queues at 0 and its guest has forgotten every connection without an RST,
        so the host side closes all of its own then."""
        queue = self.queue(index)
        self._forget_kick(queue)
        base = queue.stop()
        if self.active and not any(q.started for q in self.queues):
            self.active = False
            self.stopped_at = (self.queues[RX].last_avail, self.queues[TX].last_avail)
            log.info("device stopped")
        return base

    def _forget_kick(self, queue: Virtqueue) -> None:
        if queue.kick is not None:
            self.selector.unregister(queue.kick)
            os.close(queue.kick)
            queue.kick = None

    def reset(self) -> None:
        """RESET_OWNER, or the end: forget queues, memory and connections."""
        for index, queue in enumerate(self.queues):
            if queue.started:
                self.stop_queue(index)
            self._forget_kick(queue)
            queue.close_fds()
        self.queues = self._new_queues()
        self.stopped_at = None
        self.host.close_all()
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # --- the data path ----------------------------------------------------------------------

    def pump(self) -> None:
        """Move what can move: guest packets to the host side, then owed packets to the guest,
        then interrupt the guest once per queue if anything came back."""
        if not self.active:
            return
        rx, tx = self.queues
        if tx.running:
            self._drain_tx(tx)
        if rx.running:
            self._fill_rx(rx)
        tx.signal()
        rx.signal()

    def _drain_tx(self, tx: Virtqueue) -> None:
        for chain in self._chains(tx, self.host.tx_allowed):
            try:
                header, payload = packets.parse(chain.read())
                self.host.guest_packet(header, payload)
            except GuestError as fault:
                self.faults.report(f"tx: refused the packet in chain {chain.head}: {fault}")
            tx.complete(chain.head, 0)

    def _fill_rx(self, rx: Virtqueue) -> None:
        for chain in self._chains(rx, self.host.has_rx_work):
            packet = self.host.next_packet(chain.size)
            if packet is None:
                return  # the chain stays available for the next packet
            rx.complete(chain.head, chain.write(packet))

    def _chains(self, queue: Virtqueue, wanted: Callable[[], bool]) -> Iterator[Chain]:
        """The queue's available chains while `wanted()` says so, at most a queue's worth (a
        busy guest must not starve the host side); each is to be completed before the next
        is asked for. A ring whose avail index jumped gives none."""
        for _ in range(queue.size):
            if not wanted():
                return
            try:
                chain = queue.next_chain()
            except RingError as fault:
                self.faults.report(str(fault))
                return
            if chain is None:
                return
            yield chain


def _drain(fd: int) -> None:
    """Read a kick eventfd empty; the kick itself only wakes the loop (every turn pumps)."""
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)


def step(selector: selectors.BaseSelector, device: VsockDevice, longest: float | None) -> None:
    """One turn of the event loop: wait for an event (at most `longest` seconds, and never past
    a connection's deadline), handle what came, end connections past their deadline, move
    packets, then start or stop reading host sockets as the buffered total says."""
    wait = device.host.wait_time()
    if longest is not None:
        wait = longest if wait is None else min(wait, longest)
    for key, events in selector.select(wait):
        key.data(events)
    device.host.expire()
    device.pump()
    device.host.rebalance()
