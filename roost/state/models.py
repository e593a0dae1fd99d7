"""The database schema. Allocation invariants are constraints here, not only code:
one VM per (network, ip), one VM per CID on a host, one holder per (network, IPv6 address),
unique MACs, tap names and VM names, and no host's capacity exceeded."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# what listings order by and pages compare: in byte order on PostgreSQL whatever the
# database's collation, as SQLite compares (migration 0017)
NAME = String(63).with_variant(String(63, collation="C"), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def timestamp(moment: datetime) -> str:
    """A stored moment as the API shows it: ISO 8601 in UTC, with a `Z`."""
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; roost stores UTC
        return moment.isoformat() + "Z"
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Plugin(Base):
    """An installed plugin: its normalized manifest and the artifacts stored for it."""

    __tablename__ = "plugins"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(NAME, unique=True)
    version: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]]
    installed_at: Mapped[datetime] = mapped_column(default=utcnow)
    artifacts: Mapped[list[PluginArtifact]] = relationship(
        back_populates="plugin", cascade="all, delete-orphan", order_by="PluginArtifact.role"
    )


class PluginArtifact(Base):
    """One file of a plugin, kept in the content store under its sha256."""

    __tablename__ = "plugin_artifacts"

    plugin_id: Mapped[int] = mapped_column(
        ForeignKey("plugins.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    plugin: Mapped[Plugin] = relationship(back_populates="artifacts")


class Host(Base):
    """A `roost serve` agent of a cluster (PostgreSQL): where it is reached (`api`, its VXLAN
    `vtep_address`), what it offers (`capacity_*`, `labels`, `facts`: the VMMs, vsock kinds and
    networks it has) and what placed VMs hold of it (`allocated_*`, never above capacity: a
    constraint). `heartbeat_at` is the database's clock at its last heartbeat; `epoch` grows at
    each registration and fencing, so a fenced agent's heartbeats match no row."""

    __tablename__ = "hosts"
    __table_args__ = (
        CheckConstraint("allocated_vcpus BETWEEN 0 AND capacity_vcpus", name="allocated_vcpus"),
        CheckConstraint(
            "allocated_memory_mib BETWEEN 0 AND capacity_memory_mib", name="allocated_memory_mib"
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(NAME, unique=True)
    vtep_address: Mapped[str] = mapped_column(String(45), unique=True)
    api: Mapped[str] = mapped_column(Text)
    labels: Mapped[dict[str, Any]]
    capacity_vcpus: Mapped[int] = mapped_column(Integer)
    capacity_memory_mib: Mapped[int] = mapped_column(BigInteger)
    allocated_vcpus: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    allocated_memory_mib: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cordoned: Mapped[bool] = mapped_column(default=False, server_default=false())
    heartbeat_at: Mapped[datetime] = mapped_column(server_default=func.now())
    epoch: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    facts: Mapped[dict[str, Any]]
    # the reconciler has written `host.offline` for the outage its heartbeat is in
    offline_noted: Mapped[bool] = mapped_column(default=False, server_default=false())
    joined_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Network(Base):
    """A network VMs attach to, by name. `kind` says who owns its bridge: roost for an
    `on-demand` one (made by a subnet in a config, removed with its last lease, identified by
    its subnet) and a `managed` one (`network create`, kept until `network rm`), the operator
    for an `external` one, whose subnet (and so `first`/`last`, its addresses as integers, for
    plain comparisons) is optional. `ipv6_prefix` is a managed network's /64. A `cni` one has
    no bridge and no subnet: its `conflist`'s plugins make what its VMs attach to.

    In a cluster, a managed or on-demand network spans hosts over VXLAN `vni` with `mtu`, its
    gateway address on one host's bridge (`gateway_host_id`); an external or dhcp network
    belongs to one host (`host_id`): its name, bridge and subnet are unique on that host (a
    unique index over the host, 0 for the cluster's own networks, as on a single host), and
    never those of a cluster network (checked under the networks lock)."""

    __tablename__ = "networks"
    __table_args__ = (
        CheckConstraint("kind IN ('on-demand', 'managed', 'external', 'cni')", name="kind"),
        CheckConstraint("kind IN ('external', 'cni') OR subnet IS NOT NULL", name="subnet"),
        CheckConstraint("(kind = 'cni') = (bridge IS NULL)", name="bridge"),
        CheckConstraint("(kind = 'cni') = (conflist IS NOT NULL)", name="conflist"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(NAME)
    kind: Mapped[str] = mapped_column(String(16), default="on-demand")
    bridge: Mapped[str | None] = mapped_column(String(15))
    subnet: Mapped[str | None] = mapped_column(String(18))
    gateway: Mapped[str | None] = mapped_column(String(15))
    first: Mapped[int | None] = mapped_column(BigInteger)
    last: Mapped[int | None] = mapped_column(BigInteger)
    next_hint: Mapped[int | None] = mapped_column(BigInteger)
    ipv6_prefix: Mapped[str | None] = mapped_column(String(43))
    conflist: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    vni: Mapped[int | None] = mapped_column(Integer, unique=True)
    mtu: Mapped[int | None] = mapped_column(Integer)
    gateway_host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"))
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="RESTRICT"))


for _column in (Network.name, Network.bridge, Network.subnet):
    Index(
        f"uq_networks_host_{_column.key}",
        func.coalesce(Network.host_id, 0),
        _column,
        unique=True,
    )


class Policy(Base):
    """A network policy (`roost.spec.policy.Policy` as JSON in `body`), attached to VMs'
    interfaces by name."""

    __tablename__ = "policies"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(NAME, unique=True)
    body: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class VM(Base):
    """A VM and what it holds: its status, its interfaces (`nics`), its VMM. `network` is
    what it was last planned with (`roost.state.vms.StoredInterfaces`). In a cluster it lives
    on host `host_id` (null on a single host) and holds `reserved_*` of its capacity."""

    __tablename__ = "vms"
    __table_args__ = (
        CheckConstraint(
            "running_version IS NULL OR running_version <= config_version",
            name="running_version",
        ),
        CheckConstraint(
            "NOT restart_required OR running_version IS NOT NULL", name="restart_required"
        ),
        CheckConstraint(
            "vsock_backend IN ('firecracker', 'cloud-hypervisor', 'user', 'kernel')",
            name="vsock_backend",
        ),
        Index("ix_vms_status", "status", "name"),
        Index("ix_vms_plugin_id", "plugin_id", "name"),
        Index("ix_vms_host_id", "host_id", "name"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(NAME, unique=True)
    plugin_id: Mapped[int] = mapped_column(ForeignKey("plugins.id", ondelete="RESTRICT"))
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str | None] = mapped_column(Text)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    vmm_kind: Mapped[str] = mapped_column(String(32))
    network: Mapped[dict[str, Any]]
    # the modes of the interfaces in `network`, between commas (`,bridged,dhcp,`; empty for a
    # VM with none), for listings: kept by a trigger (migration 0010) whenever `network` changes
    modes: Mapped[str] = mapped_column(String(64), server_default="")
    vsock_unavailable: Mapped[str | None] = mapped_column(Text)
    # how the host reaches its guest's vsock, chosen when its VMM starts (see VsockBackend)
    vsock_backend: Mapped[str | None] = mapped_column(String(16))
    pid: Mapped[int | None] = mapped_column(Integer)
    supervisor_pid: Mapped[int | None] = mapped_column(Integer)
    config_version: Mapped[int] = mapped_column(Integer, default=1)
    # the version its VMM was booted with, while one runs; never newer than the latest
    running_version: Mapped[int | None] = mapped_column(Integer)
    restart_required: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="RESTRICT"))
    reserved_vcpus: Mapped[int | None] = mapped_column(Integer)
    reserved_memory_mib: Mapped[int | None] = mapped_column(BigInteger)

    plugin: Mapped[Plugin] = relationship()
    configs: Mapped[list[VMConfigVersion]] = relationship(
        back_populates="vm", cascade="all, delete-orphan", order_by="VMConfigVersion.version"
    )
    ip_leases: Mapped[list[IPLease]] = relationship(
        back_populates="vm", cascade="all, delete-orphan"
    )
    nics: Mapped[list[VMNic]] = relationship(
        back_populates="vm", cascade="all, delete-orphan", order_by="VMNic.index"
    )
    cid_lease: Mapped[CIDLease | None] = relationship(
        back_populates="vm", cascade="all, delete-orphan"
    )


class VMConfigVersion(Base):
    """Each config a VM has had, with the plugin manifest and artifacts it was made against
    (so reinstalling a plugin never changes an existing VM; a patch copies them on), and what
    it resolved to: `effective` network (with the address this version was given), resources
    and VMM."""

    __tablename__ = "vm_configs"

    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    config: Mapped[dict[str, Any]]
    manifest: Mapped[dict[str, Any]]
    artifacts: Mapped[dict[str, Any]]
    effective: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    vm: Mapped[VM] = relationship(back_populates="configs")


class VMLabel(Base):
    """One label of a VM's latest config version, for listings that select by label: kept by
    triggers (migration 0010) whenever a VM's latest version changes."""

    __tablename__ = "vm_labels"
    __table_args__ = (Index("ix_vm_labels_key_value", "key", "value", "vm_id"),)

    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(253), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class VMArtifact(Base):
    """One stored artifact a VM's config version refers to, for garbage collection's lookups by
    digest: kept by a trigger (migration 0011) when a version is added, gone with it."""

    __tablename__ = "vm_artifacts"
    __table_args__ = (
        ForeignKeyConstraint(
            ["vm_id", "version"], ["vm_configs.vm_id", "vm_configs.version"], ondelete="CASCADE"
        ),
        Index("ix_vm_artifacts_sha256", "sha256"),
    )

    vm_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))


class VMNic(Base):
    """One interface a VM has had, by its index in the VM's list (the guest's device order):
    roost's MAC and the tap name, both kept for the VM's life (a patch that drops the
    interface and one that adds it again find them); the user's MAC from the config, when it
    gives one (then the guest's); the address a dhcp guest was seen with while its VMM runs;
    and the IPv6 address it holds on a network with a prefix (SLAAC, predicted from its MAC,
    or static), which no other interface may hold."""

    __tablename__ = "vm_nics"
    __table_args__ = (
        CheckConstraint('"index" BETWEEN 0 AND 7', name="index"),
        CheckConstraint("(ipv6 IS NULL) = (ipv6_network_id IS NULL)", name="ipv6"),
        UniqueConstraint("ipv6_network_id", "ipv6"),
    )

    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    user_mac: Mapped[str | None] = mapped_column(String(17), unique=True)
    tap: Mapped[str] = mapped_column(String(15), unique=True)
    observed_ip: Mapped[str | None] = mapped_column(String(15))
    ipv6_network_id: Mapped[int | None] = mapped_column(
        ForeignKey("networks.id", ondelete="RESTRICT")
    )
    ipv6: Mapped[str | None] = mapped_column(String(39))
    vm: Mapped[VM] = relationship(back_populates="nics")


class IPLease(Base):
    """An address held by one interface of a VM (`interface`, its index); the primary key
    makes (network, ip) single-holder. Each interface holds at most one `current` address (the
    one it runs with, or will start with) and, while its VMM runs a version older than a patch
    that needs another address, one `reserved`."""

    __tablename__ = "ip_leases"
    __table_args__ = (
        UniqueConstraint("vm_id", "interface", "purpose"),
        CheckConstraint("interface BETWEEN 0 AND 7", name="interface"),
        CheckConstraint("purpose IN ('current', 'reserved')", name="purpose"),
    )

    network_id: Mapped[int] = mapped_column(
        ForeignKey("networks.id", ondelete="RESTRICT"), primary_key=True
    )
    ip: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    interface: Mapped[int] = mapped_column(Integer, default=0)
    purpose: Mapped[str] = mapped_column(String(8), default="current")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    network: Mapped[Network] = relationship()
    vm: Mapped[VM] = relationship(back_populates="ip_leases")


class IPPoolEntry(Base):
    """A free address of a network with a subnet, on PostgreSQL: where concurrent allocations
    claim one each (`FOR UPDATE SKIP LOCKED`) without queuing on one lock. Filled when the
    network is made and kept by triggers (a lease taken removes its row, a lease dropped, by
    a release or a VM's removal, brings it back in that transaction, `released` saying when:
    the addresses free longest go first). Empty on SQLite, whose single writer finds the next
    free address from the leases."""

    __tablename__ = "ip_pool"
    __table_args__ = (Index("ix_ip_pool_network_id", "network_id", "released", "ip"),)

    network_id: Mapped[int] = mapped_column(
        ForeignKey("networks.id", ondelete="CASCADE"), primary_key=True
    )
    ip: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # when it was last released (µs since the epoch), 0 if never held
    released: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class CIDLease(Base):
    """A vsock context id held by a VM, unique on its host (`host_id`, the VM's; null on a
    single host, where the index counts it as host 0)."""

    __tablename__ = "cid_leases"

    vm_id: Mapped[int] = mapped_column(
        ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    cid: Mapped[int] = mapped_column(BigInteger)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="RESTRICT"))
    vm: Mapped[VM] = relationship(back_populates="cid_lease")


Index(
    "uq_cid_leases_host_cid",
    func.coalesce(CIDLease.host_id, 0),
    CIDLease.cid,
    unique=True,
)


class VsockForward(Base):
    """A TCP listener the daemon holds for a VM (`vm forward --persist`), relaying each
    connection to the guest's vsock `guest_port`; restored when the daemon restarts, removed
    with its VM. `listen` is `ADDR:PORT`, a loopback address, unique on the host that listens
    (`host_id`, the VM's; null on a single host)."""

    __tablename__ = "vsock_forwards"
    __table_args__ = (
        CheckConstraint("guest_port BETWEEN 1 AND 4294967294", name="guest_port"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    listen: Mapped[str] = mapped_column(String(64))
    guest_port: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="RESTRICT"))


Index(
    "uq_vsock_forwards_host_listen",
    func.coalesce(VsockForward.host_id, 0),
    VsockForward.listen,
    unique=True,
)


class CniAttachment(Base):
    """One VM interface attached to a CNI network (`network`, the name its config gives): what
    ADD ran with (the conflist as run, the container id, namespace path, interface name and
    arguments), recorded before ADD, and its result once ADD has finished (null until then).
    It is kept by the VM's name until DEL has run, outliving the VM's record (`vm_id` then goes
    null), so a daemon that died between the two still finds what to DEL; a VM of that name
    made again has the same namespace and container id, and DELs it before its own ADD. In a
    cluster it is the host's that ran ADD (`host_id`): only that host DELs it."""

    __tablename__ = "cni_attachments"
    __table_args__ = (
        CheckConstraint('"index" BETWEEN 0 AND 7', name="index"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm: Mapped[str] = mapped_column(String(63))
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("vms.id", ondelete="SET NULL"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    network: Mapped[str] = mapped_column(String(255))
    container_id: Mapped[str] = mapped_column(String(255))
    netns: Mapped[str] = mapped_column(Text)
    ifname: Mapped[str] = mapped_column(String(15))
    conflist: Mapped[dict[str, Any]]
    args: Mapped[dict[str, Any]]
    capability_args: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="RESTRICT"))


Index(
    "uq_cni_attachments_host_vm",
    func.coalesce(CniAttachment.host_id, 0),
    CniAttachment.vm,
    CniAttachment.index,
    unique=True,
)


class PendingCreate(Base):
    """A create that has begun and not yet returned: recorded (and committed) before the
    create starts anything on the host, removed once it has answered. A daemon that finds one
    at start knows the create was cut short and rolls it back, VMM and all: in a cluster, the
    daemon of the host it began on (`host_id`)."""

    __tablename__ = "pending_creates"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))


class StoredEvent(Base):
    """An event of a cluster (PostgreSQL), as every agent's event bus tails it: `id` is its
    place in the cluster's one order (given under a lock, so ids become visible in order),
    `at` the database's clock when it was written, `data` its fields beyond id, type and time,
    `origin` the host that told it. Only the last events are kept. Unused on SQLite, where a
    daemon's events live in its memory."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]]
    origin: Mapped[str] = mapped_column(String(63))
