"""The daemon's vsock relays: what it listens on so that bytes reach a guest's vsock, or come
from it, without a client holding a connection to the API.

- `vsock_services`: while a VM's VMM runs, the guest's connections to the host (CID 2) on port
  P are relayed to the service the VM's config names for P. A hybrid vsock VMM dials
  `<uds_path>_<P>` for them; with the kernel's vhost-vsock one AF_VSOCK listener per port
  serves every VM, each connection routed by its peer's CID.
- Forwards (`vm forward --persist`): a loopback TCP listener whose connections are relayed to
  a guest's vsock port; recorded in the database, so they outlive the daemon and its restarts,
  and removed with their VM.

Everything runs as coroutines on one event loop in one thread of its own (not a thread per
connection), so 50 busy relays cost the API nothing; the engine and the API call in from their
threads and wait for what they asked (a listener bound, or the reason it could not be).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from roost.errors import ConflictError, HostError, InvalidError, RoostError
from roost.spec.vmconfig import (
    MAX_VSOCK_PORT,
    MIN_VSOCK_PORT,
    ServiceTarget,
    UnixService,
    service_target,
)
from roost.state import forwards
from roost.state.db import Database
from roost.state.forwards import Forward
from roost.vmm.base import HybridVsock, KernelVsock, VsockTarget
from roost.vmm.vsock_client import dial, splice

log = logging.getLogger("roost.relays")
T = TypeVar("T")
BACKLOG = 128
SERVICE_CONNECT_TIMEOUT = 10.0  # seconds to reach a `vsock_services` target
# guest-initiated connections one VM may hold open at once: each costs the daemon two file
# descriptors, so a guest must not be able to take all of them (the API's too)
MAX_GUEST_CONNECTIONS = 256
LISTEN_FORMS = "ADDR:PORT on a loopback address, e.g. 127.0.0.1:8080 or [::1]:8080"
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class ListenAddress:
    """Where a forward listens: a loopback address and a TCP port, `text` canonical."""

    host: str
    port: int

    @property
    def text(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """A forward's `listen`: an address on loopback only (the daemon runs as root, and what it
    relays to is a guest's service: nothing another host should reach through it)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        colon, port = rest[:1], rest[1:]
        ok = bool(bracket) and colon == ":"
    else:
        host, colon, port = text.rpartition(":")
        ok = bool(colon) and ":" not in host
    try:
        address = ipaddress.ip_address(host) if ok else None
    except ValueError:
        address = None
    if address is None or not (port.isascii() and port.isdigit()):
        raise InvalidError.at("listen", f"{text!r} is not {LISTEN_FORMS}")
    if not address.is_loopback:
        raise InvalidError.at(
            "listen",
            f"{address} is not a loopback address: the daemon's forwards listen on 127.0.0.0/8 "
            "or ::1 only (roost vm forward without --persist listens where the CLI runs)",
        )
    if not 1 <= int(port) <= 65535:
        raise InvalidError.at("listen", f"port {port} is not a TCP port from 1 to 65535")
    return ListenAddress(str(address), int(port))


def check_guest_port(port: int) -> None:
    if not MIN_VSOCK_PORT <= port <= MAX_VSOCK_PORT:
        raise InvalidError.at(
            "guest_port", f"{port} is not a vsock port: use {MIN_VSOCK_PORT} to {MAX_VSOCK_PORT}"
        )


def _unix_listener(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600, owned as its directory is (the run dir's
    root; a jailed VMM's chroot, its uid); a stale one from an earlier VMM or daemon is
    replaced."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        # never following a symlink: a jailed VMM owns the chroot and may have put one there
        # since the bind, to have root chmod and chown a host file
        try:
            os.chmod(path, 0o600, follow_symlinks=False)
        except NotImplementedError:  # glibc's answer for a symlink
            raise OSError(errno.ELOOP, f"{path} was replaced by a symlink") from None
        directory = path.parent.stat()
        os.chown(path, directory.st_uid, directory.st_gid, follow_symlinks=False)
        listener.listen(BACKLOG)
    except BaseException:
        listener.close()
        path.unlink(missing_ok=True)
        raise
    return listener


def _vsock_listener(port: int) -> socket.socket:
    """An AF_VSOCK listener on `port` for every guest (the kernel's vhost-vsock)."""
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        listener.bind((socket.VMADDR_CID_ANY, port))
        listener.listen(BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener


def _peer_cid(writer: asyncio.StreamWriter) -> int | None:
    """The CID an AF_VSOCK connection came from."""
    peer = writer.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) else None


def _tcp_listener(address: ListenAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        # a port a closed forward's connections still hold in TIME_WAIT is free to bind again
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address.host, address.port))
        listener.listen(BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener


@dataclass(eq=False)
class _Group:
    """Listeners and the connections accepted through them, closed together."""

    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    connections: set[asyncio.Task[Any]] = field(default_factory=set)
    closed: bool = False
    full: bool = False  # a connection was refused for MAX_GUEST_CONNECTIONS (logged once)

    async def close(self) -> None:
        self.closed = True
        for server in self.servers:
            server.close()
        for task in self.connections:
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()
        for path in self.paths:
            path.unlink(missing_ok=True)


@dataclass(eq=False)
class _KernelPort:
    """One AF_VSOCK port's listener, shared by the VMs that serve that port, each connection
    routed by its peer's CID (one bound to any CID cannot be bound once per VM)."""

    server: asyncio.AbstractServer
    routes: dict[int, tuple[str, ServiceTarget]] = field(default_factory=dict)


class VsockRelays:
    """The `VsockListeners` the engine tells about VMs, and the forwards the API adds.

    `target(name)` says how to reach VM `name`'s guest at that moment (the engine's
    `vsock_target`: `ConflictError` when no VMM runs for it); it is asked once per forwarded
    connection, on a thread, since it reads the database."""

    def __init__(
        self,
        db: Database,
        target: Callable[[str], VsockTarget],
        *,
        dial_timeout: float = 10.0,
        linger: float = 1.0,
    ) -> None:
        self.db = db
        self.target = target
        self.dial_timeout = dial_timeout
        self.linger = linger
        # the daemon's API sockets as bound (set before `start`): a service connection that
        # reaches one is refused, whatever path led there (a symlink made after the config's
        # check, a hard link)
        self.api_sockets: frozenset[str] = frozenset()
        # the host this agent is, in a cluster (set when it joins): whose forwards it restores
        self.host_id: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._submit = threading.Lock()  # a coroutine is submitted only to a running loop
        # an added forward is recorded and listening, or neither, whatever its VM's removal does
        self._forwards_lock = threading.Lock()
        self._lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="roost-relay")
        # on the loop only:
        self._services: dict[str, _Group] = {}
        self._kernel_ports: dict[int, _KernelPort] = {}
        self._forwards: dict[int, tuple[Forward, _Group]] = {}
        self._closing = False

    # ---- the loop -------------------------------------------------------------------------

    def start(self) -> None:
        """Run the relays' event loop in a thread of its own."""
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="roost-relays", daemon=True)
        self._thread.start()
        with self._submit:
            self._loop = loop

    def close(self) -> None:
        """Close every listener and connection and remove every socket file; the VMs and their
        recorded forwards stay."""
        with self._submit:
            loop, self._loop = self._loop, None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._close_all(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            assert self._thread is not None
            self._thread.join()
            loop.close()
        self._lookups.shutdown(wait=True, cancel_futures=True)

    async def _close_all(self) -> None:
        self._closing = True
        groups = [*self._services.values(), *(group for _, group in self._forwards.values())]
        self._services.clear()
        self._forwards.clear()
        await asyncio.gather(*(group.close() for group in groups))
        for port in self._kernel_ports.values():
            port.server.close()
        self._kernel_ports.clear()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` on the loop and wait for its result (from any thread but the loop's)."""
        with self._submit:
            if self._loop is None:
                work.close()
                raise _not_running()
            future = asyncio.run_coroutine_threadsafe(work, self._loop)
        return future.result()

    @property
    def running(self) -> bool:
        return self._loop is not None

    # ---- vsock_services (the engine's VsockListeners) -------------------------------------

    def vm_started(self, name: str, target: VsockTarget, services: Mapping[int, str]) -> None:
        """Listen for the guest's connections to each of `services`; raises (listening on
        none of them) if one cannot be bound."""
        parsed = {port: service_target(text) for port, text in services.items()}
        self._run(self._listen_services(name, target, parsed))

    def vm_stopped(self, name: str) -> None:
        """Close the VM's service listeners and the connections through them."""
        if self.running:
            self._run(self._stop_services(name))

    def vm_removed(self, name: str) -> None:
        """Close the VM's service listeners and its forwards (their records go with the VM's).
        Called once the VM's record is deleted, so that no forward added meanwhile outlives
        it (an add waits for this, or finds no VM to record it for)."""
        if not self.running:
            return
        with self._forwards_lock:
            self._run(self._remove_vm(name))

    async def _listen_services(
        self, name: str, target: VsockTarget, services: Mapping[int, ServiceTarget]
    ) -> None:
        await self._stop_services(name)
        group = _Group()
        try:
            for port, service in services.items():
                if isinstance(target, HybridVsock):
                    await self._listen_hybrid(group, name, target, port, service)
                else:
                    await self._listen_kernel(group, name, target, port, service)
            if self._closing:
                raise _not_running()
        except BaseException as error:
            await group.close()
            self._forget_routes(name)
            if isinstance(error, OSError):
                raise HostError(
                    f"VM {name!r}: cannot listen for its vsock service on port {port}: "
                    f"{error.strerror or error}"
                ) from None
            raise
        self._services[name] = group

    async def _listen_hybrid(
        self, group: _Group, name: str, target: HybridVsock, port: int, service: ServiceTarget
    ) -> None:
        path = Path(f"{target.uds_path}_{port}")
        listener = _unix_listener(path)
        group.paths.append(path)

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._relay_service(group, name, port, service, (reader, writer))

        group.servers.append(await asyncio.start_unix_server(accepted, sock=listener))

    async def _listen_kernel(
        self, group: _Group, name: str, target: KernelVsock, port: int, service: ServiceTarget
    ) -> None:
        shared = self._kernel_ports.get(port)
        if shared is None:
            listener = _vsock_listener(port)

            async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await self._route_kernel(port, (reader, writer))

            shared = _KernelPort(await asyncio.start_server(accepted, sock=listener))
            self._kernel_ports[port] = shared
        holder = shared.routes.get(target.cid)
        if holder is not None and holder[0] != name:  # CIDs are unique: a stale route
            log.warning("vsock port %d: CID %d was routed to VM %s", port, target.cid, holder[0])
        shared.routes[target.cid] = (name, service)

    async def _route_kernel(self, port: int, guest: Streams) -> None:
        shared = self._kernel_ports.get(port)
        cid = _peer_cid(guest[1])
        route = shared.routes.get(cid) if shared is not None and cid is not None else None
        group = self._services.get(route[0]) if route is not None else None
        if route is None or group is None:
            log.warning(
                "vsock port %d: refused a connection from CID %s (no VM's service)", port, cid
            )
            guest[1].close()
            return
        await self._relay_service(group, route[0], port, route[1], guest)

    def _forget_routes(self, name: str) -> None:
        """Take VM `name` off the shared AF_VSOCK listeners; close those nobody uses."""
        for port, shared in list(self._kernel_ports.items()):
            for cid, (holder, _) in list(shared.routes.items()):
                if holder == name:
                    del shared.routes[cid]
            if not shared.routes:
                shared.server.close()
                del self._kernel_ports[port]

    async def _stop_services(self, name: str) -> None:
        self._forget_routes(name)
        group = self._services.pop(name, None)
        if group is not None:
            await group.close()

    async def _relay_service(
        self, group: _Group, name: str, port: int, service: ServiceTarget, guest: Streams
    ) -> None:
        """One guest-initiated connection, relayed to its service; one whose service cannot be
        reached is closed (and logged), the listener stays. Beyond MAX_GUEST_CONNECTIONS of
        the VM's at once, one is closed at once."""
        if len(group.connections) >= MAX_GUEST_CONNECTIONS:
            if not group.full:
                log.warning(
                    "VM %s: %d connections to its vsock services are open, the most a VM may "
                    "hold; closing new ones until some end",
                    name,
                    MAX_GUEST_CONNECTIONS,
                )
            group.full = True
            guest[1].close()
            return
        group.full = False

        async def relay() -> None:
            try:
                async with asyncio.timeout(SERVICE_CONNECT_TIMEOUT):
                    if isinstance(service, UnixService):
                        client = await asyncio.open_unix_connection(service.path)
                    else:
                        client = await asyncio.open_connection(service.host, service.port)
            except (OSError, TimeoutError) as error:
                log.warning(
                    "VM %s: a connection to its vsock port %d could not reach its service "
                    "%s: %s; check the service runs (the VM's vsock_services)",
                    name,
                    port,
                    service,
                    error if isinstance(error, OSError) else "no answer in time",
                )
                return
            if client[1].get_extra_info("peername") in self.api_sockets:
                log.warning(
                    "VM %s: its vsock service %s for port %d leads to this daemon's API socket; "
                    "connection refused (a guest must not drive the daemon)",
                    name,
                    service,
                    port,
                )
                client[1].close()
                guest[1].close()
                return
            await splice(client, guest, linger=self.linger)  # closes both

        await _tracked(group, guest[1], relay(), f"VM {name}: vsock service port {port}")

    # ---- forwards -------------------------------------------------------------------------

    def add_forward(self, name: str, listen: str, guest_port: int) -> Forward:
        """Listen on `listen` (loopback only) and record the forward of VM `name`; 409 when
        the address is in use or already a forward, 404 without the VM."""
        address = parse_listen(listen)
        check_guest_port(guest_port)
        if not self.running:
            raise _not_running()
        with self._forwards_lock:
            try:
                listener = _tcp_listener(address)
            except OSError as error:
                raise self._bind_error(address, error) from None
            try:
                forward = self.db.transact(
                    lambda session: forwards.add(
                        session.connection(), name, address.text, guest_port
                    )
                )
                self._run(self._serve_forward(forward, listener))
            except BaseException:
                listener.close()
                raise
        log.info(
            "VM %s: forward %d listens on %s for vsock port %d",
            name,
            forward.id,
            address.text,
            guest_port,
        )
        return forward

    def _bind_error(self, address: ListenAddress, error: OSError) -> RoostError:
        if error.errno == errno.EADDRINUSE:
            with self.db.read() as session:
                holder = forwards.holder(session.connection(), address.text, self.host_id)
            if holder is not None:
                return forwards.taken(holder, address.text)
            return ConflictError(
                f"{address.text} is in use by another program on the daemon's host; choose "
                "another port"
            )
        if error.errno == errno.EADDRNOTAVAIL:
            return InvalidError.at(
                "listen", f"{address.host} is not an address of the daemon's host (loopback)"
            )
        return HostError(f"cannot listen on {address.text}: {error.strerror or error}")

    def list_forwards(self, name: str) -> list[Forward]:
        with self.db.read() as session:
            return forwards.of_vm(session.connection(), name)

    def remove_forward(self, name: str, forward_id: int) -> None:
        """Remove the record and close the listener and its connections."""
        with self._forwards_lock:
            self.db.transact(
                lambda session: forwards.remove(session.connection(), name, forward_id)
            )
            if self.running:
                self._run(self._close_forward(forward_id))
        log.info("VM %s: removed forward %d", name, forward_id)

    def restore(self) -> None:
        """Listen on every recorded forward again (a daemon's start), in a cluster those of
        this host's VMs (`host_id`; another host's VM's forwards listen on its host). One that
        cannot listen is logged and kept: the next start tries again, and it can be removed."""
        with self.db.read() as session:
            recorded = forwards.every(session.connection(), self.host_id)
        listening = 0
        for forward in recorded:
            try:
                listener = _tcp_listener(parse_listen(forward.listen))
            except (OSError, RoostError) as error:
                why = error.message if isinstance(error, RoostError) else error.strerror or error
                log.error(
                    "VM %s: forward %d cannot listen on %s again: %s. It stays recorded but "
                    "relays nothing: free the address and restart the daemon, or remove it "
                    "(roost vm unforward %s %d)",
                    forward.vm,
                    forward.id,
                    forward.listen,
                    why,
                    forward.vm,
                    forward.id,
                )
                continue
            try:
                self._run(self._serve_forward(forward, listener))
            except BaseException:
                listener.close()
                raise
            listening += 1
        log.info("listening on %d of %d recorded forwards", listening, len(recorded))

    async def _serve_forward(self, forward: Forward, listener: socket.socket) -> None:
        group = _Group()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _tracked(
                group,
                writer,
                self._relay_forward(forward, (reader, writer)),
                f"VM {forward.vm}: forward {forward.id}",
            )

        group.servers.append(await asyncio.start_server(accepted, sock=listener))
        if self._closing:
            await group.close()
            raise HostError("the daemon is stopping; try again once it runs")
        self._forwards[forward.id] = (forward, group)

    async def _relay_forward(self, forward: Forward, client: Streams) -> None:
        """One forwarded connection: closed at once while the VM has no VMM, else relayed to
        the guest's port (closed when the guest does not answer in time)."""
        loop = asyncio.get_running_loop()
        try:
            target = await loop.run_in_executor(self._lookups, self.target, forward.vm)
        except RoostError as error:  # no VMM runs for it (or it is gone): nothing to reach
            log.info("VM %s: forward %d closed a connection: %s", forward.vm, forward.id, error)
            return
        try:
            guest = await dial(
                target,
                forward.guest_port,
                timeout=self.dial_timeout,
                what=f"VM {forward.vm!r}'s vsock port {forward.guest_port}",
            )
        except (RoostError, OSError) as error:
            log.warning("VM %s: forward %d closed a connection: %s", forward.vm, forward.id, error)
            return
        await splice(client, guest, linger=self.linger)  # closes both

    async def _close_forward(self, forward_id: int) -> None:
        entry = self._forwards.pop(forward_id, None)
        if entry is not None:
            await entry[1].close()

    async def _remove_vm(self, name: str) -> None:
        await self._stop_services(name)
        for forward_id, (forward, _) in list(self._forwards.items()):
            if forward.vm == name:
                await self._close_forward(forward_id)


def _not_running() -> HostError:
    return HostError(
        "the daemon's vsock relays are not running (it is starting or stopping); try again "
        "once it answers"
    )


async def _tracked(
    group: _Group, writer: asyncio.StreamWriter, relay: Coroutine[Any, Any, None], what: str
) -> None:
    """Run one accepted connection's relay as a connection of `group` (closed with it); its
    socket is closed however the relay ends, and a failure is logged, never raised into the
    server."""
    task = asyncio.current_task()
    assert task is not None
    if group.closed:
        relay.close()
        writer.close()
        return
    group.connections.add(task)
    try:
        await relay
    except asyncio.CancelledError:
        pass  # closed with its listener: the end asked for (the server would log it otherwise)
    except Exception:
        log.exception("%s: a relayed connection failed", what)
    finally:
        group.connections.discard(task)
        writer.close()
