"""A throwaway PostgreSQL server for tests: Debian's binaries, a cluster made with initdb in a
temporary directory of its own, listening only on a Unix socket there (so two test runs never
share or clash over a server, a port or a socket), with fsync on as in production.

The server is this process's child, ended by its PID and reaped, its directory removed, on any
exit through `close` (a failure, Ctrl-C); a run killed outright takes it along (setpriv), and
leaves only a directory in /tmp that no later run uses. initdb and postgres refuse to run as
root, so as root they run as the `postgres` user, who owns the directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import psycopg

from roost.state.db import Database

DEBIAN_VERSIONS = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"
READY_WITHIN_S = 60.0
MIGRATED_TEMPLATE = "roost_migrated"
# util-linux's setpriv sets the parent-death signal and execs the server (same PID): a test run
# killed outright takes its server with it (SIGQUIT: an immediate shutdown)
ENDED_WITH_PARENT = ("setpriv", "--pdeathsig", "QUIT", "--")


def server_binaries() -> Path | None:
    """The bin directory of the newest PostgreSQL installed the Debian way (None without)."""
    found = [
        path / "bin"
        for path in DEBIAN_VERSIONS.glob("*")
        if (path / "bin" / "initdb").exists() and path.name.isdigit()
    ]
    return max(found, key=lambda path: int(path.parent.name), default=None)


def missing_reason() -> str | None:
    """Why this machine cannot run a throwaway server (None: it can)."""
    if server_binaries() is None:
        return f"needs PostgreSQL's server ({DEBIAN_VERSIONS}/*/bin/initdb); run make setup"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"initdb refuses root and there is no {SERVER_USER!r} user; run make setup"
    return None


def _free_port() -> int:
    """A port no one listens on: the server's socket file is named after it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One server; `database()` makes an empty database of its own for each caller."""

    def __init__(self) -> None:
        binaries = server_binaries()
        assert binaries is not None, missing_reason()
        self.binaries = binaries
        self.directory = Path(tempfile.mkdtemp(prefix="roost-pg-", dir="/tmp"))
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._migrated = False
        self._as_server: dict[str, object] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            self._as_server = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def start(self) -> PostgresServer:
        """initdb (its files are not flushed: they are thrown away; the server runs with fsync
        on), then the server, until it answers."""
        try:
            subprocess.run(
                [
                    str(self.binaries / "initdb"),
                    "--pgdata",
                    str(self.data),
                    "--username",
                    "postgres",
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                cwd=self.directory,
                **self._as_server,  # type: ignore[arg-type]
            )
            with open(self.directory / "server.log", "wb") as log:
                self.process = self._spawn_server(log)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _spawn_server(self, log: BinaryIO) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                *ENDED_WITH_PARENT,
                str(self.binaries / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=",
                "-c",
                f"unix_socket_directories={self.directory}",
                "-c",
                "fsync=on",
                "-c",
                "max_connections=200",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=self.directory,
            process_group=0,  # a Ctrl-C reaches pytest, which ends the server itself
            **self._as_server,  # type: ignore[arg-type]
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_WITHIN_S
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                log = (self.directory / "server.log").read_text(errors="replace")
                raise RuntimeError(f"PostgreSQL exited at start:\n{log}")
            try:
                with psycopg.connect(self.conninfo("postgres"), connect_timeout=5):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def conninfo(self, database: str) -> str:
        return f"host={self.directory} port={self.port} user=postgres dbname={database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of `database` on this server (psycopg 3, over the socket)."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.directory}&port={self.port}"

    def database(self, *, migrated: bool = False) -> str:
        """A new database's URL: empty, or `migrated` (roost's schema at head, copied from a
        database migrated once per server: a copy costs a fraction of the migrations)."""
        if migrated and not self._migrated:
            self._create(MIGRATED_TEMPLATE, "template0")
            database = Database(self.url(MIGRATED_TEMPLATE))
            database.migrate()
            database.dispose()  # a template is copied only while no one is connected to it
            self._migrated = True
        return self.url(self._create(None, MIGRATED_TEMPLATE if migrated else "template0"))

    def _create(self, name: str | None, template: str) -> str:
        name = name or f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        return name

    def close(self) -> None:
        """End the server by its PID (an immediate shutdown: nothing of it is kept; killed if
        it lingers), reap it and remove its directory."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
