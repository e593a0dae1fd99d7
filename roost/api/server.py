"""`roost serve`: the engine behind the API, on every endpoint asked for."""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
import stat
from pathlib import Path

import uvicorn

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.engine.core import Engine
from roost.engine.settings import Settings
from roost.errors import ConflictError, InvalidError

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
    """A TCP listener, on loopback only: the API has no authentication yet, and whoever reaches
    it can make the daemon read files and start VMs as root."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise InvalidError.at(
            "listen",
            f"tcp://{host} is not a loopback address; the API has no authentication yet, so it "
            "listens on a Unix socket or on 127.0.0.1/::1 only",
        )
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


def serve(settings: Settings, endpoints: list[Endpoint]) -> None:
    """Run until SIGINT/SIGTERM; VMs keep running after the daemon stops."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_shutdown)
    engine: Engine | None = None
    listeners: list[socket.socket] = []
    bound: list[Path] = []
    try:
        engine = Engine(settings)
        for endpoint in endpoints:
            listeners.append(bind(endpoint))
            if endpoint.path is not None:
                bound.append(endpoint.path)
        config = uvicorn.Config(
            create_app(engine, endpoints),
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=30,
        )
        server = uvicorn.Server(config)
        # what start-up made lives as long as the daemon: keep it out of every later garbage
        # collection, which then scans only what requests allocate
        gc.freeze()
        log.info("roost daemon listening on %s", ", ".join(e.url for e in endpoints))
        server.run(sockets=listeners)
    except _Shutdown:
        log.info("roost daemon stopping (VMs keep running)")
    finally:
        for listener in listeners:
            listener.close()
        for path in bound:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if engine is not None:
            engine.close()
