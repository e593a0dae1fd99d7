"""The hosts of a cluster (PostgreSQL): registration, heartbeats with an epoch (a fenced host's
match no row), cordons, and the capacity placed VMs reserve.

Every moment is the database's clock (`now()`), never an agent's: a host's age is how long ago
the database saw its heartbeat, so agents whose clocks disagree still agree on who is offline.
Capacity is taken by one UPDATE that checks the host is active, fresh and has room and adds to
what it holds: two concurrent reservations queue on the host's row, and the second sees the
first's, so none can overcommit it (the CHECK constraints are the last guard).
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    BigInteger,
    Connection,
    Float,
    Integer,
    Row,
    bindparam,
    case,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.functions import GenericFunction

from roost.errors import ConflictError, NotFoundError
from roost.plan.placement import Candidate, HostSnapshot, HostState, Need, place
from roost.state.db import Database
from roost.state.models import Host, timestamp

__all__ = [
    "Candidate",
    "HostRecord",
    "HostRegistration",
    "HostState",
    "Hosts",
    "Membership",
    "Need",
    "Resources",
]

DEFAULT_OFFLINE_AFTER = 20.0


class _SecondsSince(GenericFunction[float]):
    """Seconds from a stored moment to the database's now."""

    name = "seconds_since"
    type = Float()
    _register = False
    inherit_cache = True


@compiles(_SecondsSince)
def _sqlite_seconds_since(element: _SecondsSince, compiler: SQLCompiler, **kw: Any) -> str:
    moment = compiler.process(element.clauses, **kw)
    return f"((julianday('now') - julianday({moment})) * 86400.0)"


@compiles(_SecondsSince, "postgresql")
def _pg_seconds_since(element: _SecondsSince, compiler: SQLCompiler, **kw: Any) -> str:
    moment = compiler.process(element.clauses, **kw)
    return f"EXTRACT(EPOCH FROM (now() - {moment}))"


_AGE = _SecondsSince(Host.heartbeat_at)
_FRESH = bindparam("offline_after", type_=Float()) > _AGE  # fresher than that
_HOST_COLUMNS = (*Host.__table__.columns, _AGE.label("age"))
_ALL = select(*_HOST_COLUMNS).order_by(Host.name)
_NAMED = select(*_HOST_COLUMNS).where(Host.name == bindparam("host_name"))
_BY_NAME = select(Host.id, Host.allocated_vcpus, Host.allocated_memory_mib).where(
    Host.name == bindparam("new_name")
)
_VTEP_HOLDER = select(Host.name).where(
    Host.vtep_address == bindparam("new_vtep_address"), Host.name != bindparam("new_name")
)
# bind names other than the columns' (SQLAlchemy keeps those for the SET clause)
_REGISTERED: dict[str, BindParameter[Any]] = {
    column: bindparam(f"new_{column}")
    for column in (
        "vtep_address",
        "api",
        "labels",
        "capacity_vcpus",
        "capacity_memory_mib",
        "facts",
    )
}
_NOW_SEEN = {"heartbeat_at": func.now(), "offline_noted": False}
_JOIN = insert(Host).values(
    name=bindparam("new_name"), epoch=1, joined_at=func.now(), **_REGISTERED, **_NOW_SEEN
)
_REJOIN = (
    update(Host)
    .where(Host.id == bindparam("host_id"))
    .values(epoch=Host.epoch + 1, **_REGISTERED, **_NOW_SEEN)
    .returning(Host.epoch)
)
_HEARTBEAT = (
    update(Host)
    .where(Host.id == bindparam("host_id"), Host.epoch == bindparam("seen_epoch"))
    .values(**_NOW_SEEN)
)
_FENCE = (
    update(Host)
    .where(Host.id == bindparam("host_id"), Host.epoch == bindparam("seen_epoch"))
    .values(epoch=Host.epoch + 1)
)
_CORDON = (
    update(Host)
    .where(Host.name == bindparam("host_name"))
    .values(cordoned=bindparam("cordon"))
    .returning(Host.id)
)
_VCPUS = bindparam("vcpus", type_=Integer())
_MEMORY = bindparam("memory_mib", type_=BigInteger())
_RESERVE = (
    update(Host)
    .where(
        Host.id == bindparam("host_id"),
        Host.cordoned == False,  # noqa: E712 (SQL, not Python)
        _FRESH,
        Host.allocated_vcpus + _VCPUS <= Host.capacity_vcpus,
        Host.allocated_memory_mib + _MEMORY <= Host.capacity_memory_mib,
    )
    .values(
        allocated_vcpus=Host.allocated_vcpus + _VCPUS,
        allocated_memory_mib=Host.allocated_memory_mib + _MEMORY,
    )
    .returning(Host.id)
)
# never below zero: a removal must go through even if its host's books are off
_RELEASE = (
    update(Host)
    .where(Host.id == bindparam("host_id"))
    .values(
        allocated_vcpus=case(
            (Host.allocated_vcpus > _VCPUS, Host.allocated_vcpus - _VCPUS), else_=0
        ),
        allocated_memory_mib=case(
            (Host.allocated_memory_mib > _MEMORY, Host.allocated_memory_mib - _MEMORY), else_=0
        ),
    )
)


@dataclass(frozen=True)
class HostRegistration:
    """What an agent says of itself when it joins: where it is reached and what it offers
    (`facts`: per kind, `vmms`, `vsock`, `external_networks`, `cni_networks`, what it has)."""

    name: str
    vtep_address: str
    api: str
    labels: Mapping[str, str]
    capacity_vcpus: int
    capacity_memory_mib: int
    facts: Mapping[str, list[str]]


@dataclass(frozen=True)
class Membership:
    """A registered host: its row and the epoch its heartbeats must match."""

    host_id: int
    epoch: int


class Resources(BaseModel):
    model_config = ConfigDict(frozen=True)

    vcpus: int
    memory_mib: int


class HostRecord(BaseModel):
    """A host as the API shows it (`json()`); `id` and `facts` are for placement, not shown."""

    model_config = ConfigDict(frozen=True)

    id: int = Field(exclude=True)
    name: str
    state: HostState
    vtep_address: str
    api: str
    labels: dict[str, str]
    capacity: Resources
    allocated: Resources
    heartbeat_at: str
    epoch: int
    facts: dict[str, list[str]] = Field(exclude=True)

    def json(self) -> dict[str, Any]:  # type: ignore[override]  # pydantic's gives text
        """The host's JSON: name, state, vtep_address, api, labels, capacity, allocated,
        heartbeat_at (ISO 8601, UTC), epoch."""
        return self.model_dump(mode="json")


def _state(row: Row[Any], offline_after: float) -> HostState:
    if row.age >= offline_after:
        return HostState.OFFLINE
    return HostState.CORDONED if row.cordoned else HostState.ACTIVE


def _record(row: Row[Any], offline_after: float) -> HostRecord:
    return HostRecord(
        id=row.id,
        name=row.name,
        state=_state(row, offline_after),
        vtep_address=row.vtep_address,
        api=row.api,
        labels=row.labels,
        capacity=Resources(vcpus=row.capacity_vcpus, memory_mib=row.capacity_memory_mib),
        allocated=Resources(vcpus=row.allocated_vcpus, memory_mib=row.allocated_memory_mib),
        heartbeat_at=timestamp(row.heartbeat_at),
        epoch=row.epoch,
        facts=row.facts,
    )


def _snapshot(row: Row[Any], offline_after: float) -> HostSnapshot:
    return HostSnapshot(
        id=row.id,
        name=row.name,
        api=row.api,
        state=_state(row, offline_after),
        labels=row.labels,
        facts=row.facts,
        capacity_vcpus=row.capacity_vcpus,
        capacity_memory_mib=row.capacity_memory_mib,
        allocated_vcpus=row.allocated_vcpus,
        allocated_memory_mib=row.allocated_memory_mib,
    )


def no_host(name: str) -> NotFoundError:
    return NotFoundError(
        f"host {name!r} is not in the cluster (roost host list shows those that are)"
    )


class Hosts:
    """The `hosts` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- membership ---------------------------------------------------------------------

    def register(self, registration: HostRegistration) -> Membership:
        """Join (or join again) as `registration.name`: a new epoch (what an earlier run of
        this host did is fenced off), a fresh heartbeat, its cordon and reservations kept. A
        capacity below what its VMs hold, or a VTEP address another host has, is 409."""
        values = {
            "new_name": registration.name,
            "new_vtep_address": registration.vtep_address,
            "new_api": registration.api,
            "new_labels": dict(registration.labels),
            "new_capacity_vcpus": registration.capacity_vcpus,
            "new_capacity_memory_mib": registration.capacity_memory_mib,
            "new_facts": {kind: list(found) for kind, found in registration.facts.items()},
        }

        def work(connection: Connection) -> Membership:
            holder = connection.execute(_VTEP_HOLDER, values).scalar()
            if holder is not None:
                raise ConflictError(
                    f"VTEP address {registration.vtep_address} is host {holder!r}'s; give "
                    "this host its own (--vtep-address)"
                )
            known = connection.execute(_BY_NAME.with_for_update(), values).first()
            if known is None:
                added = connection.execute(_JOIN, values)
                assert added.inserted_primary_key is not None
                return Membership(int(added.inserted_primary_key[0]), 1)
            if (
                known.allocated_vcpus > registration.capacity_vcpus
                or known.allocated_memory_mib > registration.capacity_memory_mib
            ):
                raise ConflictError(
                    f"host {registration.name!r}'s VMs hold {known.allocated_vcpus} vCPUs and "
                    f"{known.allocated_memory_mib} MiB, more than the capacity given "
                    f"({registration.capacity_vcpus} vCPUs, "
                    f"{registration.capacity_memory_mib} MiB); give at least that much "
                    "(--capacity-vcpus, --capacity-memory-mib) or remove VMs first"
                )
            epoch = connection.execute(_REJOIN, {**values, "host_id": known.id}).scalar_one()
            return Membership(known.id, int(epoch))

        try:
            return self.db.transact_core(work)
        except IntegrityError:  # another host took the VTEP address meanwhile
            raise ConflictError(
                f"VTEP address {registration.vtep_address} is another host's; give this "
                "host its own (--vtep-address)"
            ) from None

    def heartbeat(self, membership: Membership) -> bool:
        """Say the host is alive, at the database's clock; False if it has been fenced (its
        epoch moved on): it must stop acting and register again."""
        key = {"host_id": membership.host_id, "seen_epoch": membership.epoch}
        return bool(self.db.transact_core(lambda c: c.execute(_HEARTBEAT, key).rowcount == 1))

    def fence(self, host_id: int, seen_epoch: int, connection: Connection | None = None) -> bool:
        """Fence a host (the reconciler, for one offline past the grace): its epoch moves on,
        so its next heartbeat finds no row. False if it had registered again meanwhile (its
        epoch is not `seen_epoch`). On `connection`, inside the caller's transaction."""
        key = {"host_id": host_id, "seen_epoch": seen_epoch}
        if connection is not None:
            return bool(connection.execute(_FENCE, key).rowcount == 1)
        return bool(self.db.transact_core(lambda c: c.execute(_FENCE, key).rowcount == 1))

    # ---- reading ------------------------------------------------------------------------

    def list(self, offline_after: float = DEFAULT_OFFLINE_AFTER) -> list[HostRecord]:
        """Every host, by name."""
        with self.db.read() as session:
            rows = session.connection().execute(_ALL).all()
        return [_record(row, offline_after) for row in rows]

    def get(self, name: str, offline_after: float = DEFAULT_OFFLINE_AFTER) -> HostRecord:
        with self.db.read() as session:
            row = session.connection().execute(_NAMED, {"host_name": name}).first()
        if row is None:
            raise no_host(name)
        return _record(row, offline_after)

    def snapshot(self, offline_after: float = DEFAULT_OFFLINE_AFTER) -> builtins.list[HostSnapshot]:
        """What placement reads of every host, in one query (a caller may keep it for about a
        heartbeat interval: `reserve` checks again)."""
        with self.db.read() as session:
            rows = session.connection().execute(_ALL).all()
        return [_snapshot(row, offline_after) for row in rows]

    def candidates(
        self, need: Need, offline_after: float = DEFAULT_OFFLINE_AFTER
    ) -> builtins.list[Candidate]:
        """The hosts with room for `need`, eligible ones best first (`roost.plan.placement`)."""
        return place(self.snapshot(offline_after), need)

    # ---- writing ------------------------------------------------------------------------

    def set_cordoned(
        self, name: str, cordoned: bool, offline_after: float = DEFAULT_OFFLINE_AFTER
    ) -> HostRecord:
        """Stop (or resume) placing VMs on the host; its VMs stay."""

        def work(connection: Connection) -> None:
            cordon = {"host_name": name, "cordon": cordoned}
            if connection.execute(_CORDON, cordon).first() is None:
                raise no_host(name)

        self.db.transact_core(work)
        return self.get(name, offline_after)

    @staticmethod
    def reserve(
        connection: Connection,
        host_id: int,
        vcpus: int,
        memory_mib: int,
        offline_after: float = DEFAULT_OFFLINE_AFTER,
    ) -> bool:
        """Take `vcpus` and `memory_mib` of the host's capacity in the caller's transaction,
        if it is active (not cordoned, heartbeat fresher than `offline_after`) and has room
        now; False (nothing taken) otherwise. Negative amounts give back (a smaller patch)."""
        taken = connection.execute(
            _RESERVE,
            {
                "host_id": host_id,
                "vcpus": vcpus,
                "memory_mib": memory_mib,
                "offline_after": offline_after,
            },
        ).first()
        return taken is not None

    @staticmethod
    def release(connection: Connection, host_id: int, vcpus: int, memory_mib: int) -> None:
        """Give back what a VM held of the host's capacity, in the caller's transaction."""
        connection.execute(_RELEASE, {"host_id": host_id, "vcpus": vcpus, "memory_mib": memory_mib})
