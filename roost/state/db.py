"""The database connection: SQLite (WAL) by default, PostgreSQL when asked.

Writers on SQLite take the write lock when their transaction begins (`BEGIN IMMEDIATE`) and
wait for it (busy timeout), so concurrent requests queue instead of failing with "database is
locked"; readers use plain transactions and never block writers under WAL. Within the daemon,
writers first queue on a lock of their own: SQLite's busy handler polls with sleeps that grow
to 100 ms, so a writer that found the lock taken could sleep long after it was free (with a
burst of creates most of their time went there), while a thread waiting on a lock wakes as soon
as it is released. Everything SQLite-specific is in this module.

On PostgreSQL (psycopg 3), writers run side by side under READ COMMITTED: the schema's unique
keys and row locks keep them apart, and a transaction that lost a race (a unique value taken, a
deadlock) runs again; migrations run in one transaction under a lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from roost.errors import NoSpaceError, UnavailableError

MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_MS = 30_000
# PostgreSQL's codes for a transaction that lost to a concurrent one and may simply run again
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
DISK_FULL_SQLSTATE = "53100"
# one migrating process at a time per PostgreSQL database (key: "roost" in ASCII)
MIGRATION_LOCK = 0x726F6F7374
T = TypeVar("T")


def sqlite_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'roost.db'}"


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlstate(error: Exception) -> str | None:
    """PostgreSQL's code for the error a statement failed with (None from SQLite)."""
    return getattr(getattr(error, "orig", None), "sqlstate", None)


def _sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL (None for an in-memory database or another backend)."""
    if not _is_sqlite(url):
        return None
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


@contextmanager
def _reporting_full_disk() -> Iterator[None]:
    """A full filesystem is the operator's to fix, not a bug: say so (507 `no_space`)."""
    try:
        yield
    except OperationalError as error:
        if "full" in str(error.orig) or _sqlstate(error) == DISK_FULL_SQLSTATE:
            raise NoSpaceError(
                "the filesystem of the daemon's database is full; free space there (or grow "
                "it) and try again"
            ) from None
        raise


def _sqlite_engine(url: str, *, immediate: bool) -> Engine:
    engine = create_engine(url, pool_size=8, max_overflow=32, pool_timeout=60)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _postgresql_engine(url: str) -> Engine:
    """A pool as large as SQLite's; connections checked before use (a server restart, an
    idle timeout), READ COMMITTED as PostgreSQL's default but stated: allocation relies on
    it (a statement sees rows committed since the transaction began)."""
    return create_engine(
        url,
        pool_size=8,
        max_overflow=32,
        pool_timeout=60,
        pool_pre_ping=True,
        isolation_level="READ COMMITTED",
    )


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(hashtext(:name))")


def hold_lock(connection: Connection, name: str) -> None:
    """Hold the lock `name` until the transaction ends, for an allocation that reads what is
    free and then takes it: on PostgreSQL an advisory transaction lock, as writers run side by
    side there; nothing on SQLite, whose writers hold the database's one write lock already."""
    if connection.dialect.name == "postgresql":
        connection.execute(_ADVISORY_LOCK, {"name": name})


class Database:
    """Sessions for reading and for writing, and the schema's migrations."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._file = _sqlite_file(url)
        self._identity: tuple[int, int] | None = None
        if _is_sqlite(url):
            self._write_engine = _sqlite_engine(url, immediate=True)
            self._read_engine = _sqlite_engine(url, immediate=False)
        else:
            self._write_engine = self._read_engine = _postgresql_engine(url)
        # reentrant: a write opened inside another in one thread meets SQLite's lock as before
        self._writing: AbstractContextManager[object] = (
            threading.RLock() if _is_sqlite(url) else nullcontext()
        )
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)
        self._reader = sessionmaker(self._read_engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema up to date (Alembic `upgrade head`).

        On SQLite, foreign keys are off while the migrations run: a migration that changes a
        table's constraints copies it into a new table and drops the old one, and with foreign
        keys on, that drop would cascade into every row that refers to it (a VM's config
        versions and leases). They are checked once the migrations are done. On PostgreSQL the
        whole upgrade is one transaction, under a lock that makes another process migrating the
        same database wait (and then find it up to date)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with _reporting_full_disk(), self._write_engine.connect() as connection:
            raw = connection.connection.driver_connection if _is_sqlite(self.url) else None
            if raw is not None:  # outside any transaction, where SQLite heeds it
                raw.execute("PRAGMA foreign_keys=OFF")
            try:
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if raw is not None:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"a migration broke foreign keys: {broken[:5]}")
                connection.commit()
            finally:
                if raw is not None:
                    connection.rollback()
                    raw.execute("PRAGMA foreign_keys=ON")
        if self._file is not None:
            self._identity = _identity(self._file)

    def gone(self) -> bool:
        """Whether the database file this daemon opened has been removed or replaced since
        (writes would then go to a deleted file, or mix two databases)."""
        return self._identity is not None and _identity(self._file or Path()) != self._identity

    def check_present(self) -> None:
        if self.gone():
            raise UnavailableError(
                f"the daemon's database {self._file} was removed or replaced while it ran, so "
                "it refuses to write; restart the daemon (it then checks what runs against the "
                "database it finds)",
                code="database_gone",
            )

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction, committed on success, rolled back on any error."""
        self.check_present()
        with self._writing, _reporting_full_disk(), self._writer() as session, session.begin():
            yield session

    def on_write_sessions(self, name: str, listener: Callable[..., object]) -> None:
        """Call `listener` on SQLAlchemy session event `name` (`after_commit`, ...) of every
        write session: how others learn what a transaction did once it has committed."""
        event.listen(self._writer, name, listener)

    def transact(self, work: Callable[[Session], T], attempts: int = 8) -> T:
        """Run `work` in a write transaction, again from scratch when a concurrent writer took
        the same unique value (a random MAC, the lowest free CID), the lock timed out (SQLite)
        or PostgreSQL chose it as a deadlock's victim."""

        def once() -> T:
            with self.write() as session:
                return work(session)

        return _retried(once, attempts)

    def transact_core(self, work: Callable[[Connection], T], attempts: int = 8) -> T:
        """As `transact`, on a bare connection: for the one-statement status changes on the
        path of every boot, where the session's machinery costs more than the statement."""

        def once() -> T:
            self.check_present()
            with self._writing, _reporting_full_disk(), self._write_engine.begin() as connection:
                return work(connection)

        return _retried(once, attempts)

    def dispose(self) -> None:
        self._write_engine.dispose()
        self._read_engine.dispose()


def _retried(attempt: Callable[[], T], attempts: int) -> T:
    for number in range(attempts):
        try:
            return attempt()
        except (IntegrityError, OperationalError) as error:
            retryable = (
                isinstance(error, IntegrityError)
                or "locked" in str(error)
                or _sqlstate(error) in RETRYABLE_SQLSTATES
            )
            if not retryable or number == attempts - 1:
                raise
            time.sleep(0.001 * 2**number)
    raise AssertionError("unreachable")
