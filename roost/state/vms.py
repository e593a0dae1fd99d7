"""VM records: their statuses, the statements on the path of every boot, and the writes that
move a VM from one status to the next.

The hot statements are SQLAlchemy Core, built once and run on a bare connection or the
session's: loading ORM entities costs several times the queries here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Connection,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from roost.errors import ConflictError, NotFoundError
from roost.plan.network import EffectiveNetwork, NetworkPlan
from roost.state.db import Database
from roost.state.models import (
    VM,
    CIDLease,
    IPLease,
    Network,
    PendingCreate,
    Plugin,
    PluginArtifact,
    VMConfigVersion,
)


class VMStatus(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"
    ERROR = "error"


# a VMM runs (or is being started or stopped) for a VM in one of these
LIVE = frozenset({VMStatus.STARTING, VMStatus.RUNNING, VMStatus.PAUSED, VMStatus.STOPPING})

Row = Mapping[Any, Any]

# Everything a VM's JSON needs, in one query: the VM's columns, its plugin's name, its CID and
# the config version that describes what it has now (the one its VMM runs, else the latest).
VM_ROWS: Select[Any] = (
    select(
        *VM.__table__.columns,
        Plugin.name.label("plugin"),
        CIDLease.cid.label("cid"),
        VMConfigVersion.config.label("config"),
        VMConfigVersion.manifest.label("manifest"),
    )
    .join(Plugin, Plugin.id == VM.plugin_id)
    .join(
        VMConfigVersion,
        and_(
            VMConfigVersion.vm_id == VM.id,
            VMConfigVersion.version == func.coalesce(VM.running_version, VM.config_version),
        ),
    )
    .outerjoin(CIDLease, CIDLease.vm_id == VM.id)
)
_VM_ROW = VM_ROWS.where(VM.name == bindparam("name"))
_VM_ID = select(VM.id).where(VM.name == bindparam("name"))
_STATUS = select(VM.status).where(VM.name == bindparam("name"))
_TAP = select(VM.tap).where(VM.name == bindparam("name"))
_VMM_KIND = select(VM.vmm_kind).where(VM.name == bindparam("name"))
_ADD_VM = insert(VM)
_SET_VM = update(VM).where(VM.id == bindparam("vm_id"))
_SET_NAMED = update(VM).where(VM.name == bindparam("vm_name"))
_SET_NAMED_RETURNING = _SET_NAMED.returning(*VM.__table__.columns)
_HOLDING = (
    select(VM.id, VM.mac, VM.tap, Network.subnet)
    .outerjoin(IPLease, and_(IPLease.vm_id == VM.id, IPLease.purpose == "current"))
    .outerjoin(Network, Network.id == IPLease.network_id)
    .where(VM.name == bindparam("name"))
)
_PLUGIN = (
    select(
        Plugin.id,
        Plugin.manifest,
        PluginArtifact.role,
        PluginArtifact.sha256,
        PluginArtifact.size,
    )
    .outerjoin(PluginArtifact)
    .where(Plugin.name == bindparam("name"))
)
_ADD_PENDING = insert(PendingCreate)
_DROP_PENDING = delete(PendingCreate).where(PendingCreate.name == bindparam("name"))


@dataclass(frozen=True)
class Holding:
    """What allocation reads of a VM's record: its id, name, the MAC and tap name it keeps for
    life once it has them, and the subnet it holds an address on."""

    id: int
    name: str
    mac: str | None
    tap: str | None
    subnet: str | None


@dataclass(frozen=True)
class PluginRecord:
    """An installed plugin as a create reads it: its id, manifest and stored artifacts."""

    id: int
    manifest: dict[str, Any]
    artifacts: dict[str, Any]


@dataclass(frozen=True)
class StoredNetwork:
    """The network a VM was last planned with, as recorded in its `network` column (the one
    place that reads that column's JSON)."""

    effective: EffectiveNetwork
    plan: NetworkPlan
    bridge: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "effective": self.effective.to_json(),
            "plan": self.plan.to_json(),
            "bridge": self.bridge,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredNetwork | None:
        """None for a VM not planned yet (a create cut short before its allocation)."""
        if not data:
            return None
        return cls(
            EffectiveNetwork.from_json(data["effective"]),
            NetworkPlan.from_json(data["plan"]),
            data.get("bridge"),
        )


@dataclass(frozen=True)
class LiveRecord:
    """What recovery reads of a VM whose record says a VMM runs for it."""

    name: str
    status: VMStatus
    pid: int | None
    supervisor_pid: int | None
    running_version: int | None
    vmm_kind: str
    tap: str | None
    mac: str | None
    network: StoredNetwork | None
    vsock_backend: str | None


def no_vm(name: str) -> NotFoundError:
    return NotFoundError(f"VM {name!r} does not exist (roost vm list shows those that do)")


def vm_exists(name: str) -> ConflictError:
    return ConflictError(f"VM {name!r} already exists; choose another name", code="exists")


class VMRecords:
    """Reading and writing VM records."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- reading ------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        with self.db.read() as session:
            found = session.connection().execute(VM_ROWS.order_by(VM.name))
            return [row._mapping for row in found]

    def row(self, name: str) -> Row:
        with self.db.read() as session:
            found = session.connection().execute(_VM_ROW, {"name": name}).first()
        if found is None:
            raise no_vm(name)
        return found._mapping

    def status(self, name: str) -> VMStatus:
        with self.db.read() as session:
            status = session.connection().execute(_STATUS, {"name": name}).scalar()
        if status is None:
            raise no_vm(name)
        return VMStatus(status)

    def tap(self, name: str) -> str | None:
        with self.db.read() as session:
            tap: str | None = session.connection().execute(_TAP, {"name": name}).scalar()
            return tap

    def vmm_kind(self, name: str) -> str | None:
        with self.db.read() as session:
            kind: str | None = session.connection().execute(_VMM_KIND, {"name": name}).scalar()
            return kind

    def names(self) -> set[str]:
        with self.db.read() as session:
            return set(session.scalars(select(VM.name)))

    def live(self) -> list[LiveRecord]:
        """Every VM whose record says a VMM runs (or is being started or stopped) for it."""
        with self.db.read() as session:
            found = session.execute(
                select(
                    VM.name,
                    VM.status,
                    VM.pid,
                    VM.supervisor_pid,
                    VM.running_version,
                    VM.vmm_kind,
                    VM.tap,
                    VM.mac,
                    VM.network,
                    VM.vsock_backend,
                ).where(VM.status.in_([status.value for status in LIVE]))
            ).all()
        return [
            LiveRecord(
                row.name,
                VMStatus(row.status),
                row.pid,
                row.supervisor_pid,
                row.running_version,
                row.vmm_kind,
                row.tap,
                row.mac,
                StoredNetwork.from_json(row.network),
                row.vsock_backend,
            )
            for row in found
        ]

    def live_taps(self) -> set[str]:
        """The taps of VMs whose record says a VMM runs for them."""
        with self.db.read() as session:
            taps = session.scalars(
                select(VM.tap).where(
                    VM.status.in_([status.value for status in LIVE]), VM.tap.is_not(None)
                )
            )
            return {tap for tap in taps if tap is not None}

    # ---- inside an allocating transaction -------------------------------------------------

    @staticmethod
    def plugin(connection: Connection, name: str) -> PluginRecord:
        """The installed plugin `name`, in one query."""
        found = connection.execute(_PLUGIN, {"name": name}).all()
        if not found:
            raise NotFoundError(
                f"plugin {name!r} is not installed (roost plugin install FILE installs it)"
            )
        artifacts = {
            row.role: {"sha256": row.sha256, "size": row.size}
            for row in found
            if row.role is not None
        }
        return PluginRecord(found[0].id, found[0].manifest, artifacts)

    @staticmethod
    def check_new(connection: Connection, name: str) -> None:
        if connection.execute(_VM_ID, {"name": name}).first() is not None:
            raise vm_exists(name)

    @staticmethod
    def add(
        connection: Connection, *, name: str, plugin_id: int, status: VMStatus, vmm: str
    ) -> Holding:
        """Record a new VM; it holds nothing yet (its first config version is added once its
        allocation has resolved it)."""
        added = connection.execute(
            _ADD_VM,
            {
                "name": name,
                "plugin_id": plugin_id,
                "status": status,
                "vmm_kind": vmm,
                "network": {},
            },
        )
        assert added.inserted_primary_key is not None
        vm_id = int(added.inserted_primary_key[0])
        return Holding(id=vm_id, name=name, mac=None, tap=None, subnet=None)

    @staticmethod
    def holding(connection: Connection, name: str) -> Holding:
        found = connection.execute(_HOLDING, {"name": name}).first()
        if found is None:
            raise no_vm(name)
        return Holding(id=found.id, name=name, mac=found.mac, tap=found.tap, subnet=found.subnet)

    @staticmethod
    def set_planned(
        connection: Connection,
        vm_id: int,
        *,
        status: VMStatus,
        mac: str | None,
        tap: str | None,
        network: StoredNetwork,
        vmm: str,
        vsock_unavailable: str | None,
        vsock_backend: str | None,
    ) -> None:
        """Record what a VM holds and the network it is planned with, as it starts afresh."""
        connection.execute(
            _SET_VM,
            {
                "vm_id": vm_id,
                "status": status,
                "mac": mac,
                "tap": tap,
                "network": network.to_json(),
                "vmm_kind": vmm,
                "vsock_unavailable": vsock_unavailable,
                "vsock_backend": vsock_backend,
                "observed_ip": None,
                "status_reason": None,
                "exit_code": None,
            },
        )

    @staticmethod
    def running_version(connection: Connection, name: str) -> int | None:
        version: int | None = connection.execute(
            select(VM.running_version).where(VM.name == name)
        ).scalar()
        return version

    @staticmethod
    def restart_required(connection: Connection, name: str) -> bool:
        return bool(connection.execute(select(VM.restart_required).where(VM.name == name)).scalar())

    @staticmethod
    def set_latest(
        connection: Connection,
        vm_id: int,
        version: int,
        *,
        restart_required: bool,
        held_now: Mapping[str, Any] | None = None,
    ) -> None:
        """Make `version` the VM's latest; with `held_now` (no VMM runs: the record values of
        its network, VMM and vsock availability), it is also what the VM has now."""
        values: dict[str, Any] = {
            "vm_id": vm_id,
            "config_version": version,
            "restart_required": restart_required,
            **(held_now or {}),
        }
        connection.execute(_SET_VM, values)

    # ---- status changes -----------------------------------------------------------------

    def write(self, name: str, shown: Row | None, **values: Any) -> Row:
        """Update the VM's record in one transaction and return its row for the view. With
        `shown` — what a running VM's view takes from other tables, which cannot change while
        it runs — that is one statement."""

        def work(connection: Connection) -> Row:
            parameters = {"vm_name": name, **values}
            if shown is not None:
                updated = connection.execute(_SET_NAMED_RETURNING, parameters).first()
                if updated is None:
                    raise no_vm(name)
                return {**updated._mapping, **shown}
            connection.execute(_SET_NAMED, parameters)
            found = connection.execute(_VM_ROW, {"name": name}).first()
            if found is None:
                raise no_vm(name)
            return found._mapping

        return self.db.transact_core(work)

    def set_observed_ip(self, name: str, ip: str) -> None:
        """The address a dhcp guest leased, kept only while its VMM runs."""

        def work(connection: Connection) -> None:
            connection.execute(
                update(VM)
                .where(VM.name == name, VM.status.in_([status.value for status in LIVE]))
                .values(observed_ip=ip)
            )

        self.db.transact_core(work)

    # ---- creates in progress ------------------------------------------------------------

    def begin_create(self, name: str) -> None:
        """Record that a create of `name` has begun (committed before it touches the host);
        a VM of that name, or another create of it, is a conflict."""

        def work(connection: Connection) -> None:
            self.check_new(connection, name)
            connection.execute(_ADD_PENDING, {"name": name})

        try:
            self.db.transact_core(work, attempts=1)
        except IntegrityError:
            raise ConflictError(
                f"a create of VM {name!r} is already under way", code="vm_busy"
            ) from None

    def end_create(self, name: str) -> None:
        self.db.transact_core(lambda connection: connection.execute(_DROP_PENDING, {"name": name}))

    def pending_creates(self) -> set[str]:
        with self.db.read() as session:
            return set(session.scalars(select(PendingCreate.name)))

    # ---- removal ------------------------------------------------------------------------

    @staticmethod
    def delete(session: Session, name: str, release: Callable[[VM], object]) -> bool:
        """Delete the VM's record, after `release` has let go of what it holds (its address:
        the record's deletion would take its leases with it). False if there is none."""
        vm = session.scalar(select(VM).where(VM.name == name))
        if vm is None:
            return False
        release(vm)
        session.delete(vm)
        return True
