"""VM records: their statuses, the statements on the path of every boot, and the writes that
move a VM from one status to the next.

The hot statements are SQLAlchemy Core, built once and run on a bare connection or the
session's: loading ORM entities costs several times the queries here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    Connection,
    Select,
    Text,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    not_,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import GenericFunction

from roost.errors import ConflictError, NotFoundError, RoostError
from roost.plan.network import EffectiveNetwork, NetworkPlan
from roost.spec.network import NetworkMode
from roost.state.db import Database
from roost.state.models import (
    VM,
    CIDLease,
    Host,
    PendingCreate,
    Plugin,
    PluginArtifact,
    VMConfigVersion,
    VMLabel,
    VMNic,
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
    # its host was offline past the grace (cluster): its addresses were released, and the
    # host, once back, ends its VMM; `unknown` (its host offline now) is computed, never stored
    LOST = "lost"


# a VMM runs (or is being started or stopped) for a VM in one of these
LIVE = frozenset({VMStatus.STARTING, VMStatus.RUNNING, VMStatus.PAUSED, VMStatus.STOPPING})

Row = Mapping[Any, Any]


# SQLite's JSON and string functions the listing uses, each with PostgreSQL's equivalent: the
# aggregates' text (`nics_json`, `labels_json` read it) is the same JSON on both.
class _JSONObject(GenericFunction[Any]):
    name = "json_object"
    _register = False
    inherit_cache = True


class _JSONGroupArray(GenericFunction[Any]):
    name = "json_group_array"
    _register = False
    inherit_cache = True


class _JSONGroupObject(GenericFunction[Any]):
    name = "json_group_object"
    _register = False
    inherit_cache = True


class _Resources(GenericFunction[Any]):
    """`{"resources": ...}` of a JSON document, `{}` without any."""

    name = "resources"
    _register = False
    inherit_cache = True


class _Position(GenericFunction[Any]):
    """Where a string first occurs in another, from 1 (0: nowhere)."""

    name = "instr"
    _register = False
    inherit_cache = True


@compiles(_Resources)
def _sqlite_resources(element: _Resources, compiler: SQLCompiler, **kw: Any) -> str:
    document = compiler.process(element.clauses, **kw)
    return (
        f"json_object('resources', json(coalesce(json_extract({document}, '$.resources'), '{{}}')))"
    )


@compiles(_Resources, "postgresql")
def _pg_resources(element: _Resources, compiler: SQLCompiler, **kw: Any) -> str:
    document = compiler.process(element.clauses, **kw)
    return f"json_build_object('resources', coalesce({document} -> 'resources', '{{}}'::json))"


def _pg_as(template: str) -> Callable[[Any, SQLCompiler], str]:
    def render(element: Any, compiler: SQLCompiler, **kw: Any) -> str:
        return template.format(compiler.process(element.clauses, **kw))

    return render


compiles(_JSONObject, "postgresql")(_pg_as("json_build_object({})"))
compiles(_JSONGroupArray, "postgresql")(_pg_as("CAST(json_agg({}) AS TEXT)"))
compiles(_JSONGroupObject, "postgresql")(_pg_as("CAST(json_object_agg({}) AS TEXT)"))
compiles(_Position, "postgresql")(_pg_as("strpos({})"))

# A VM's interfaces as one JSON array (`nics_json` reads it), for the one query of its view.
_NICS = (
    select(
        _JSONGroupArray(
            _JSONObject(
                "index",
                VMNic.index,
                "mac",
                func.coalesce(VMNic.user_mac, VMNic.mac),
                "tap",
                VMNic.tap,
                "observed_ip",
                VMNic.observed_ip,
                "ipv6",
                VMNic.ipv6,
            )
        )
    )
    .where(VMNic.vm_id == VM.id)
    .scalar_subquery()
)

# A VM's labels (those of its latest config version: they apply at once) as one JSON object.
_LABELS = (
    select(_JSONGroupObject(VMLabel.key, VMLabel.value))
    .where(VMLabel.vm_id == VM.id)
    .scalar_subquery()
)


# The name of the host a VM lives on (null on a single host), for its JSON's `host`.
_HOST_NAME = select(Host.name).where(Host.id == VM.host_id).scalar_subquery()


def _resources_of(document: Any, as_type: Any) -> Any:
    """`{"resources": ...}` of a config or manifest column, `{}` without any: all a VM's view
    reads of them (decoding each VM's whole manifest was a tenth of a listing)."""
    return type_coerce(_Resources(document), as_type)


# the columns of `_vm_rows` that hold JSON documents
_DOCUMENTS = ("network", "config", "manifest")


def _vm_rows(documents: Any) -> Select[Any]:
    """Everything a VM's JSON needs, in one query: the VM's columns, its plugin's name, its
    host's name (`host`), its CID, its labels and the config version that describes what it
    has now (the one its VMM runs, else the latest); its `_DOCUMENTS` of type `documents`
    (JSON: decoded, Text: as stored)."""
    return (
        select(
            *(
                type_coerce(column, documents).label(column.name)
                if column.name in _DOCUMENTS
                else column
                for column in VM.__table__.columns
            ),
            Plugin.name.label("plugin"),
            _HOST_NAME.label("host"),
            CIDLease.cid.label("cid"),
            _resources_of(VMConfigVersion.config, documents).label("config"),
            _resources_of(VMConfigVersion.manifest, documents).label("manifest"),
            _NICS.label("nics"),
            _LABELS.label("labels"),
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


VM_ROWS = _vm_rows(JSON)
# A listing's rows: its documents as stored, decoded (`decoded`) only for a VM whose view is
# not already known, and the whole row a key that changes with anything its view shows.
LISTED_ROWS = _vm_rows(Text)
# A names-only listing's: what `VMQuery`'s filters read, and the name.
NAME_ROWS: Select[Any] = select(VM.name).join(Plugin, Plugin.id == VM.plugin_id)
_VM_ROW = VM_ROWS.where(VM.name == bindparam("name"))
_VM_ID = select(VM.id).where(VM.name == bindparam("name"))
_STATUS = select(VM.status).where(VM.name == bindparam("name"))
_HOST_AND_STATUS = select(VM.host_id, VM.status).where(VM.name == bindparam("name"))
_TAPS = select(VMNic.tap).join(VM, VM.id == VMNic.vm_id).where(VM.name == bindparam("name"))
_NICS_AND_LABELS_OF = select(
    _NICS.label("nics"), _LABELS.label("labels"), _HOST_NAME.label("host")
).where(VM.name == bindparam("vm_name"))
_VMM_KIND = select(VM.vmm_kind).where(VM.name == bindparam("name"))
_ADD_VM = insert(VM)
_SET_VM = update(VM).where(VM.id == bindparam("vm_id"))
# a VM the cluster declared lost while its start was under way gets nothing planned
_SET_PLANNED = _SET_VM.where(VM.status != VMStatus.LOST.value)
_NAME_OF = select(VM.name).where(VM.id == bindparam("vm_id"))
_FORGET_OBSERVED = (
    update(VMNic).where(VMNic.vm_id == bindparam("nic_vm_id")).values(observed_ip=None)
)
_SET_NAMED = update(VM).where(VM.name == bindparam("vm_name"))
_SET_NAMED_RETURNING = _SET_NAMED.returning(*VM.__table__.columns)
# on a cluster host: a VM the cluster declared lost, or one a drain moved to another host, is
# no longer this host's to write
_SET_KEPT = _SET_NAMED.where(VM.status != VMStatus.LOST.value, VM.host_id == bindparam("this_host"))
_SET_KEPT_RETURNING = _SET_KEPT.returning(*VM.__table__.columns)
_CLAIM_START = _SET_KEPT.values(status=VMStatus.STARTING.value, status_reason=None).returning(VM.id)
_WHERE_IS = select(VM.status, _HOST_NAME.label("host")).where(VM.name == bindparam("name"))
_HOLDING = select(VM.id, VM.host_id).where(VM.name == bindparam("name"))
_DELETE_VM = delete(VM).where(VM.id == bindparam("vm_id"))
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
# PostgreSQL: the plugin a create names, kept as it is until the create commits: a forced
# install replacing its artifacts (then collecting the old ones) or its removal waits, and then
# sees the VM's reference
_PLUGIN_KEPT = (
    select(Plugin.id)
    .where(Plugin.name == bindparam("name"))
    .with_for_update(read=True, key_share=True)
)
_ADD_PENDING = insert(PendingCreate)
_PENDING_NAMES = select(PendingCreate.name)
_DROP_PENDING = delete(PendingCreate).where(PendingCreate.name == bindparam("name"))


@dataclass(frozen=True)
class Holding:
    """A VM as allocation names it: its id (what it holds is read through `alloc`), name and
    host (None on a single host)."""

    id: int
    name: str
    host_id: int | None = None


@dataclass(frozen=True)
class ShownNic:
    """One interface of a VM as its view reads it: the guest's MAC, its tap name, the
    address a dhcp guest was seen with and the IPv6 address it holds."""

    index: int
    mac: str
    tap: str
    observed_ip: str | None
    ipv6: str | None


def decoded(listed: Any) -> dict[str, Any]:
    """A `LISTED_ROWS` row as a `VM_ROWS` one, to be read only: its JSON documents decoded
    (its `config` and `manifest`, a few `resources` that many VMs share, decoded once each)."""
    row = dict(listed._mapping)
    if isinstance(row["network"], str):  # PostgreSQL's driver hands back json already decoded
        row["network"] = json.loads(row["network"])
    for column in ("config", "manifest"):
        if isinstance(row[column], str):
            row[column] = _shared_document(row[column])
    return row


@functools.lru_cache(maxsize=1024)
def _shared_document(text: str) -> Any:
    return json.loads(text)


def labels_json(row: Row) -> dict[str, str]:
    """The labels of a `VM_ROWS` row (its `labels` column), sorted by key."""
    found: dict[str, str] = json.loads(row["labels"] or "{}")
    return dict(sorted(found.items()))


def nics_json(row: Row) -> dict[int, ShownNic]:
    """The interfaces of a `VM_ROWS` row (its `nics` column), by index."""
    found = json.loads(row["nics"] or "[]")
    return {
        item["index"]: ShownNic(
            item["index"], item["mac"], item["tap"], item["observed_ip"], item["ipv6"]
        )
        for item in found
    }


@dataclass(frozen=True)
class PluginRecord:
    """An installed plugin as a create reads it: its id, manifest and stored artifacts."""

    id: int
    manifest: dict[str, Any]
    artifacts: dict[str, Any]


@dataclass(frozen=True)
class StoredInterface:
    """One interface as a VM was last planned with it: its guest name, whether it carries the
    default route, its network and plan (with its address), the bridge its tap joins, and its
    IPv6 `{"prefix", "source"}` (None without IPv6; the address is its `vm_nics` row's)."""

    index: int
    name: str
    default_route: bool
    effective: EffectiveNetwork
    plan: NetworkPlan
    bridge: str | None
    ipv6: dict[str, str] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "default_route": self.default_route,
            "effective": self.effective.to_json(),
            "plan": self.plan.to_json(),
            "bridge": self.bridge,
            "ipv6": self.ipv6,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredInterface:
        return cls(
            data["index"],
            data["name"],
            bool(data["default_route"]),
            EffectiveNetwork.from_json(data["effective"]),
            NetworkPlan.from_json(data["plan"]),
            data.get("bridge"),
            data.get("ipv6"),
        )


@dataclass(frozen=True)
class StoredNetwork:
    """The interfaces a VM was last planned with, as recorded in its `network` column (the one
    place that reads that column's JSON). `network` is the single network a VM with at most
    one interface shows (None for several)."""

    network: EffectiveNetwork | None
    interfaces: tuple[StoredInterface, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "network": None if self.network is None else self.network.to_json(),
            "interfaces": [interface.to_json() for interface in self.interfaces],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredNetwork | None:
        """None for a VM not planned yet (a create cut short before its allocation)."""
        if not data:
            return None
        interfaces = tuple(StoredInterface.from_json(item) for item in data["interfaces"])
        network = data.get("network")
        if network is None:
            return cls(None, interfaces)
        if len(interfaces) == 1 and network == data["interfaces"][0]["effective"]:
            return cls(interfaces[0].effective, interfaces)  # the usual case: read it once
        return cls(EffectiveNetwork.from_json(network), interfaces)


@dataclass(frozen=True)
class LiveRecord:
    """What recovery reads of a VM whose record says a VMM runs for it."""

    name: str
    status: VMStatus
    pid: int | None
    supervisor_pid: int | None
    running_version: int | None
    vmm_kind: str
    nics: dict[int, ShownNic]
    network: StoredNetwork | None
    vsock_backend: str | None

    @property
    def taps(self) -> list[str]:
        return [nic.tap for nic in self.nics.values()]


def no_vm(name: str) -> NotFoundError:
    return NotFoundError(f"VM {name!r} does not exist (roost vm list shows those that do)")


def vm_exists(name: str) -> ConflictError:
    return ConflictError(f"VM {name!r} already exists; choose another name", code="exists")


class NotThisHostsError(RoostError):
    """A cluster host was asked to start a VM that is no longer its own to run: moved to
    another host by a drain since the request was routed here (421 `misdirected`), or declared
    lost (409 `conflict`). Nothing of the VM is written."""


def _not_this_hosts(connection: Connection, name: str) -> RoostError:
    found = connection.execute(_WHERE_IS, {"name": name}).first()
    if found is None:
        return no_vm(name)
    if found.status == VMStatus.LOST.value:
        return NotThisHostsError(
            f"VM {name} was declared lost (its host was offline past the grace, and its "
            f"addresses were released): remove it (roost vm rm {name}) and create it again",
            code="conflict",
        )
    return NotThisHostsError(
        f"VM {name} is on host {found.host} now (a drain moved it after this request reached "
        "this host); send the request again: any agent passes it to the VM's host",
        code="misdirected",
    )


@dataclass(frozen=True)
class VMQuery:
    """Which VMs a listing wants, in name order: of `plugin`, in any of `statuses` (or
    reading `unknown`), with every label of `labels`, with an interface in `mode` (vsock: with
    none), on the host named `host`, named after `after`; at most `limit` of them (None: all).

    A VM of a host in `offline_hosts` (a cluster's hosts whose heartbeat is late) reads
    `unknown` unless it is `lost`: a status filter selects it by that, not by its stored
    status, so a listing shows only VMs in the statuses it asked for."""

    plugin: str | None = None
    statuses: tuple[VMStatus, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    mode: NetworkMode | None = None
    after: str | None = None
    limit: int | None = None
    host: str | None = None
    unknown: bool = False
    offline_hosts: frozenset[int] = frozenset()

    @property
    def by_status(self) -> bool:
        """Whether the VMs are selected by status (which offline hosts change)."""
        return bool(self.statuses) or self.unknown

    def statement(self, rows: Select[Any] = VM_ROWS) -> Select[Any]:
        """`rows` (`VM_ROWS`, `LISTED_ROWS` or `NAME_ROWS`) narrowed to these VMs: each filter
        an indexed lookup or a test of a column of the VM's own row."""
        statement = rows
        if self.plugin is not None:
            statement = statement.where(Plugin.name == self.plugin)
        if self.by_status:
            statement = statement.where(self._status_test())
        for key, value in self.labels:
            labelled = select(VMLabel.vm_id).where(VMLabel.key == key, VMLabel.value == value)
            statement = statement.where(VM.id.in_(labelled))
        if self.mode is NetworkMode.VSOCK:
            statement = statement.where(VM.modes == "")
        elif self.mode is not None:
            statement = statement.where(_Position(VM.modes, f",{self.mode.value},") > 0)
        if self.host is not None:
            on_host = select(Host.id).where(Host.name == self.host).scalar_subquery()
            statement = statement.where(VM.host_id == on_host)
        if self.after is not None:
            statement = statement.where(VM.name > self.after)
        return statement.order_by(VM.name).limit(self.limit)

    def _status_test(self) -> ColumnElement[bool]:
        stored = VM.status.in_([status.value for status in self.statuses])
        if not self.offline_hosts:
            return stored if self.statuses else false()
        reads_unknown = and_(
            func.coalesce(VM.host_id, 0).in_(sorted(self.offline_hosts)),
            VM.status != VMStatus.LOST.value,
        )
        return or_(
            and_(stored, not_(reads_unknown)),
            reads_unknown if self.unknown else false(),
        )


ALL_VMS = VMQuery()


class VMRecords:
    """Reading and writing VM records. `host_id` is the host this agent is (None: the single
    host): the VMs whose VMMs it recovers are its own, and those it adds live on it."""

    def __init__(self, db: Database, host_id: int | None = None) -> None:
        self.db = db
        self.host_id = host_id

    def _on_this_host(self, statement: Select[Any]) -> Select[Any]:
        """`statement` narrowed to this host's VMs (on a single host: every VM)."""
        return statement if self.host_id is None else statement.where(VM.host_id == self.host_id)

    def on_this_host(self, host_id: int | None) -> bool:
        """Whether a VM recorded on host `host_id` is this agent's (on a single host: all)."""
        return self.host_id is None or host_id == self.host_id

    # ---- reading ------------------------------------------------------------------------

    def rows(self, query: VMQuery = ALL_VMS) -> list[Row]:
        """The rows of the VMs `query` names, in name order, in one query."""
        with self.db.read() as session:
            found = session.connection().execute(query.statement())
            return [row._mapping for row in found]

    def listed(self, query: VMQuery = ALL_VMS) -> list[Any]:
        """The `LISTED_ROWS` of the VMs `query` names, in name order, in one query: each a
        tuple (its fields also by name), equal to another only if every column is."""
        with self.db.read() as session:
            return list(session.connection().execute(query.statement(LISTED_ROWS)))

    def names_of(self, query: VMQuery = ALL_VMS) -> list[str]:
        """The names of the VMs `query` names, in name order."""
        with self.db.read() as session:
            return list(session.connection().execute(query.statement(NAME_ROWS)).scalars())

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

    def lost_elsewhere(self, name: str) -> bool:
        """Whether VM `name` is another host's and the cluster declared it lost (never on a
        single host): nothing of it is on this host to remove, only its record."""
        if self.host_id is None:
            return False
        with self.db.read() as session:
            found = session.connection().execute(_HOST_AND_STATUS, {"name": name}).first()
        return found is not None and found.host_id != self.host_id and found.status == VMStatus.LOST

    def taps(self, name: str) -> list[str]:
        """The tap names of every interface the VM has had (those of a running VM among them)."""
        with self.db.read() as session:
            return list(session.connection().execute(_TAPS, {"name": name}).scalars())

    def vmm_kind(self, name: str) -> str | None:
        with self.db.read() as session:
            kind: str | None = session.connection().execute(_VMM_KIND, {"name": name}).scalar()
            return kind

    def names(self) -> set[str]:
        """The names of this host's VMs (on a single host: every VM)."""
        with self.db.read() as session:
            return set(session.scalars(self._on_this_host(select(VM.name))))

    def elsewhere(self) -> set[str]:
        """The names of the VMs recorded on other hosts, and of the creates other hosts have
        begun (none on a single host): this agent leaves what is theirs alone (a create's CNI
        attachments are recorded before its VM is)."""
        if self.host_id is None:
            return set()
        recorded = select(VM.name).where(VM.host_id.is_(None) | (VM.host_id != self.host_id))
        begun = _PENDING_NAMES.where(
            PendingCreate.host_id.is_(None) | (PendingCreate.host_id != self.host_id)
        )
        with self.db.read() as session:
            return set(session.scalars(recorded)) | set(session.scalars(begun))

    def live(self) -> list[LiveRecord]:
        """Every VM of this host whose record says a VMM runs (or is being started or stopped)
        for it."""
        with self.db.read() as session:
            found = session.execute(
                self._on_this_host(
                    select(
                        VM.name,
                        VM.status,
                        VM.pid,
                        VM.supervisor_pid,
                        VM.running_version,
                        VM.vmm_kind,
                        _NICS.label("nics"),
                        VM.network,
                        VM.vsock_backend,
                    ).where(VM.status.in_([status.value for status in LIVE]))
                )
            ).all()
        return [
            LiveRecord(
                row.name,
                VMStatus(row.status),
                row.pid,
                row.supervisor_pid,
                row.running_version,
                row.vmm_kind,
                nics_json(row._mapping),
                StoredNetwork.from_json(row.network),
                row.vsock_backend,
            )
            for row in found
        ]

    def live_taps(self) -> set[str]:
        """The taps of every interface of this host's VMs whose record says a VMM runs for
        them."""
        with self.db.read() as session:
            taps = session.scalars(
                self._on_this_host(
                    select(VMNic.tap)
                    .join(VM, VM.id == VMNic.vm_id)
                    .where(VM.status.in_([status.value for status in LIVE]))
                )
            )
            return set(taps)

    # ---- inside an allocating transaction -------------------------------------------------

    @staticmethod
    def plugin(connection: Connection, name: str) -> PluginRecord:
        """The installed plugin `name`, in one query (on PostgreSQL after one locking its row
        FOR KEY SHARE until the transaction ends: the artifacts read stay the plugin's)."""
        if connection.dialect.name == "postgresql":
            connection.execute(_PLUGIN_KEPT, {"name": name})
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

    def add(
        self, connection: Connection, *, name: str, plugin_id: int, status: VMStatus, vmm: str
    ) -> Holding:
        """Record a new VM on this host; it holds nothing yet (its first config version is
        added once its allocation has resolved it)."""
        added = connection.execute(
            _ADD_VM,
            {
                "name": name,
                "plugin_id": plugin_id,
                "status": status,
                "vmm_kind": vmm,
                "network": {},
                "host_id": self.host_id,
            },
        )
        assert added.inserted_primary_key is not None
        vm_id = int(added.inserted_primary_key[0])
        return Holding(id=vm_id, name=name, host_id=self.host_id)

    @staticmethod
    def holding(connection: Connection, name: str) -> Holding:
        found = connection.execute(_HOLDING, {"name": name}).first()
        if found is None:
            raise no_vm(name)
        return Holding(id=found.id, name=name, host_id=found.host_id)

    @staticmethod
    def set_planned(
        connection: Connection,
        vm_id: int,
        *,
        status: VMStatus,
        network: StoredNetwork,
        vmm: str,
        vsock_unavailable: str | None,
        vsock_backend: str | None,
        new: bool = False,
    ) -> None:
        """Record the interfaces a VM is planned with, as it starts afresh (no address
        observed on any of them yet: a `new` VM's, made in this transaction, have none).
        `NotThisHostsError` for a VM the cluster declared lost since its start began (its host
        was frozen meanwhile): the caller's transaction, the addresses it took among them, is
        rolled back."""
        planned = connection.execute(
            _SET_PLANNED,
            {
                "vm_id": vm_id,
                "status": status,
                "network": network.to_json(),
                "vmm_kind": vmm,
                "vsock_unavailable": vsock_unavailable,
                "vsock_backend": vsock_backend,
                "status_reason": None,
                "exit_code": None,
            },
        )
        if planned.rowcount == 0:
            name = connection.execute(_NAME_OF, {"vm_id": vm_id}).scalar()
            raise _not_this_hosts(connection, name) if name else no_vm(f"#{vm_id}")
        if not new:
            connection.execute(_FORGET_OBSERVED, {"nic_vm_id": vm_id})

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
        it runs — that is one statement, and one for its interfaces and labels. On a cluster
        host, a VM the cluster declared `lost` (while this host was silent) is left as it is:
        what an operation under way when the host froze would write is stale."""
        kept = self.host_id is not None

        def work(connection: Connection) -> Row:
            parameters = {"vm_name": name, **values}
            if kept:
                parameters["this_host"] = self.host_id
            if shown is not None:
                returning = _SET_KEPT_RETURNING if kept else _SET_NAMED_RETURNING
                updated = connection.execute(returning, parameters).first()
                if updated is not None:
                    changing = connection.execute(_NICS_AND_LABELS_OF, {"vm_name": name}).one()
                    return {**updated._mapping, **shown, **changing._mapping}
            else:
                connection.execute(_SET_KEPT if kept else _SET_NAMED, parameters)
            found = connection.execute(_VM_ROW, {"name": name}).first()
            if found is None:
                raise no_vm(name)
            return found._mapping

        return self.db.transact_core(work)

    def begin_start(self, name: str) -> Row:
        """Record VM `name` `starting`, before any VMM is started for it; its row. On a cluster
        host only while the VM is this host's and not lost, in one statement, so that a drain
        (which moves only a VM without a VMM, its row locked) and a start never both win:
        otherwise `NotThisHostsError`, with nothing written."""
        if self.host_id is None:
            return self.write(name, None, status=VMStatus.STARTING, status_reason=None)

        def work(connection: Connection) -> Row:
            claim = {"vm_name": name, "this_host": self.host_id}
            if connection.execute(_CLAIM_START, claim).first() is None:
                raise _not_this_hosts(connection, name)
            return connection.execute(_VM_ROW, {"name": name}).one()._mapping

        return self.db.transact_core(work)

    def set_observed_ip(self, name: str, index: int, ip: str) -> None:
        """The address a dhcp guest leased on its interface `index`, kept only while its VMM
        runs."""
        live = select(VM.id).where(
            VM.name == name, VM.status.in_([status.value for status in LIVE])
        )
        statement = (
            update(VMNic)
            .where(VMNic.vm_id == live.scalar_subquery(), VMNic.index == index)
            .values(observed_ip=ip)
        )

        def work(connection: Connection) -> None:
            connection.execute(statement)

        self.db.transact_core(work)

    # ---- creates in progress ------------------------------------------------------------

    def begin_create(self, name: str) -> None:
        """Record that a create of `name` has begun (committed before it touches the host);
        a VM of that name, or another create of it, is a conflict."""

        def work(connection: Connection) -> None:
            self.check_new(connection, name)
            connection.execute(_ADD_PENDING, {"name": name, "host_id": self.host_id})

        try:
            self.db.transact_core(work, attempts=1)
        except IntegrityError:
            raise ConflictError(
                f"a create of VM {name!r} is already under way", code="vm_busy"
            ) from None

    def end_create(self, name: str) -> None:
        self.db.transact_core(lambda connection: connection.execute(_DROP_PENDING, {"name": name}))

    def pending_creates(self) -> set[str]:
        """The creates this host began and has not finished (those of other hosts are theirs
        to roll back)."""
        pending = _PENDING_NAMES
        if self.host_id is not None:
            pending = pending.where(PendingCreate.host_id == self.host_id)
        with self.db.read() as session:
            return set(session.scalars(pending))

    # ---- removal ------------------------------------------------------------------------

    @staticmethod
    def delete(session: Session, name: str, release: Callable[[Holding], object]) -> bool:
        """Delete the VM's record, after `release` has let go of what it holds (its address:
        the record's deletion would take its leases with it). False if there is none. One
        statement: the schema's cascades remove its config versions, interfaces, labels, CID
        and forwards (the ORM's cascade loaded and deleted each of them one by one)."""
        connection = session.connection()
        found = connection.execute(_HOLDING, {"name": name}).first()
        if found is None:
            return False
        vm = Holding(id=found.id, name=name, host_id=found.host_id)
        release(vm)
        connection.execute(_DELETE_VM, {"vm_id": vm.id})
        return True
