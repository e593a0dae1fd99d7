"""`roost serve`: the engine behind the API, on every endpoint asked for."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.api.placing import ClusterRouter
from roost.engine.core import Engine
from roost.engine.daemon import Daemon
from roost.engine.events import EventBus
from roost.engine.settings import Settings
from roost.errors import ConflictError, InvalidError, RoostError
from roost.state.hosts import Hosts

log = logging.getLogger("roost.serve")


def _unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path` (mode 0600); a stale socket file is replaced, a live
    one (another daemon) is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
        raise InvalidError.at(
            "listen", f"{path} exists and is not a socket; choose another path for --listen"
        )
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise ConflictError(f"another daemon is listening on {path}; stop it first")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return listener


def _tcp_socket(host: str, port: int) -> socket.socket:
    """A TCP listener (`roost serve` allows it with a token, and off loopback with TLS)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    return listener


def bind(endpoint: Endpoint) -> socket.socket:
    if endpoint.path is not None:
        listener = _unix_socket(endpoint.path)
    else:
        assert endpoint.host is not None and endpoint.port is not None
        listener = _tcp_socket(endpoint.host, endpoint.port)
    listener.listen(128)
    listener.set_inheritable(True)
    return listener


class _Shutdown(Exception):  # noqa: N818 - a signal, not an error
    """Raised by the SIGINT/SIGTERM handler once uvicorn has finished its graceful shutdown
    (uvicorn re-raises the signal it caught; without a handler SIGTERM would kill the process
    before the engine is closed and the sockets removed)."""


def _raise_shutdown(_signum: int, _frame: object) -> None:
    raise _Shutdown


class _Server(uvicorn.Server):
    """A uvicorn server that ends the event streams as it begins to stop: its graceful
    shutdown waits for every response to end, and an event stream never ends on its own."""

    def __init__(self, config: uvicorn.Config, events: EventBus) -> None:
        super().__init__(config)
        self.events = events

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.events.close()
        await super().shutdown(sockets)


def _servers(
    app: ASGIApp,
    endpoints: list[Endpoint],
    listeners: list[socket.socket],
    settings: Settings,
    events: EventBus,
) -> list[tuple[uvicorn.Server, list[socket.socket]]]:
    """The uvicorn servers for `listeners`, each with the listeners it serves: one for all, or
    with --tls-cert one for the TCP listeners (uvicorn's TLS is per server) and one for the
    Unix sockets (plain HTTP, as their clients speak it). Only the first runs the app's
    lifespan: it is the last to stop (see `_run`)."""
    tls = settings.tls_cert is not None
    plain = [sock for e, sock in zip(endpoints, listeners, strict=True) if not (tls and e.is_tcp)]
    secure = [sock for e, sock in zip(endpoints, listeners, strict=True) if tls and e.is_tcp]
    servers: list[tuple[uvicorn.Server, list[socket.socket]]] = []
    for group, https in ((plain, False), (secure, True)):
        if not group:
            continue
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=30,
            lifespan="off" if servers else "auto",
            ssl_certfile=settings.tls_cert if https else None,
            ssl_keyfile=settings.tls_key if https else None,
        )
        servers.append((_Server(config, events), group))
    return servers


async def _run(servers: list[tuple[uvicorn.Server, list[socket.socket]]]) -> None:
    """Every server until SIGINT/SIGTERM. Each takes the signals over as it starts and hands
    the signal it caught on to the one before it once it has stopped, so they stop last to
    first, and the first hands it on to `serve`'s handler."""
    await asyncio.gather(*(server.serve(sockets=group) for server, group in servers))


def _stop_vms(engine: Engine) -> None:
    """--stop-vms-on-exit: stop every VM whose VMM runs, gracefully, all at once."""
    names = list(engine.live)

    def stop(name: str) -> None:
        try:
            engine.stop_vm(name)
            log.info("stopped VM %s (--stop-vms-on-exit)", name)
        except RoostError as error:
            log.error("VM %s: could not stop it: %s", name, error)

    with ThreadPoolExecutor(max_workers=max(1, min(len(names), 32))) as pool:
        list(pool.map(stop, names))


def _cluster_router(daemon: Daemon) -> ClusterRouter | None:
    """In a cluster, what sends each request for a VM to its host (None on a single host)."""
    cluster, engine = daemon.settings.cluster, daemon.engine
    if cluster is None or daemon.cluster is None or engine is None:
        return None
    joined = daemon.cluster.member.membership
    assert joined is not None, "Cluster.open registers this host"
    return ClusterRouter(Hosts(engine.db), cluster, joined.host_id)


def serve(settings: Settings, endpoints: list[Endpoint]) -> None:
    """Run until SIGINT/SIGTERM; VMs keep running after the daemon stops.

    Start-up order: the locks (a refused daemon touches nothing), the database and the check of
    what runs against it (orphans refuse the start), the listeners, the vsock relays and the
    persisted forwards, then recovery in the background while the API answers (`/healthz`
    says `recovering` until it is done)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_shutdown)
    daemon: Daemon | None = None
    stopping = False
    listeners: list[socket.socket] = []
    bound: list[Path] = []
    try:
        daemon = Daemon.open(settings)
        assert daemon.engine is not None and daemon.recovery is not None
        assert daemon.relays is not None
        for endpoint in endpoints:
            listeners.append(bind(endpoint))
            if endpoint.path is not None:
                bound.append(endpoint.path)
        # before recovery, which listens again for the vsock services of the VMs it adopts;
        # closed with the daemon (every listener and socket file gone)
        daemon.relays.api_sockets = frozenset(map(str, bound))
        daemon.relays.start()
        daemon.relays.restore()
        refusal = daemon.cluster.refusal if daemon.cluster is not None else None
        router = _cluster_router(daemon)
        app = create_app(daemon.engine, endpoints, router=router, refusal=refusal)
        servers = _servers(app, endpoints, listeners, settings, daemon.engine.events)
        daemon.recovery.start()
        # what start-up made lives as long as the daemon: keep it out of every later garbage
        # collection, which then scans only what requests allocate
        gc.freeze()
        https = " (HTTPS)" if settings.tls_cert is not None else ""
        log.info(
            "roost daemon listening on %s",
            ", ".join(e.url + (https if e.is_tcp else "") for e in endpoints),
        )
        loop_factory = servers[0][0].config.get_loop_factory()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_run(servers))
    except _Shutdown:
        stopping = True
        kept = "" if settings.stop_vms_on_exit else " (VMs keep running)"
        log.info("roost daemon stopping%s", kept)
    finally:
        for listener in listeners:
            listener.close()
        for path in bound:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if daemon is not None:
            if daemon.recovery is not None:
                daemon.recovery.finished.wait(30)
            if stopping and settings.stop_vms_on_exit and daemon.engine is not None:
                _stop_vms(daemon.engine)
            daemon.close()
