"""The daemon's settings, as `roost serve` takes them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

# the defaults' own module, not roost.host.cni's and roost.plan's: `roost` starts without pydantic
from roost.defaults import CNI_BIN_DIRS as DEFAULT_BIN_DIRS
from roost.defaults import CNI_CONF_DIR as DEFAULT_CONF_DIR
from roost.defaults import DEFAULT_SUBNET


class QemuMachine(StrEnum):
    MICROVM = "microvm"
    Q35 = "q35"


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class QemuVsock(StrEnum):
    AUTO = "auto"
    USER = "user"
    KERNEL = "kernel"


class Orphans(StrEnum):
    """What a starting daemon does with live VMMs its database does not account for."""

    REFUSE = "refuse"  # exit 4, naming them (the default: never kill what it does not know)
    REAP = "reap"  # --reap-orphans: end them
    KEEP = "keep"  # --keep-orphans: leave them running, untouched


DEFAULT_STATE_DIR = Path("/var/lib/roost")
DEFAULT_RUN_DIR = Path("/run/roost")
DEFAULT_BRIDGE = "roost0"
DEFAULT_NETWORK = "default"
DEFAULT_MAX_OPERATIONS = 16
MAX_QUEUED_OPERATIONS = 256
DEFAULT_MAX_BODY_BYTES = 1 << 20
JAILED_EXEC_NAME = "firecracker"  # the jailer names each chroot's parent after its exec file
VCPUS_PER_CPU = 16  # a host's vCPU capacity by default, per CPU it has
DEFAULT_OFFLINE_AFTER = 20.0  # seconds without a heartbeat before a host is offline (Incus's)
DEFAULT_LOST_AFTER = 300.0  # seconds without a heartbeat before its VMs are lost


@dataclass(frozen=True)
class ClusterSettings:
    """This agent in a cluster on PostgreSQL: who it is, how its peers reach it (the VXLAN
    tunnel endpoint, the API), what it holds, and how long silence lasts before its peers take
    it for offline, then its VMs for lost."""

    host_name: str
    vtep_address: str  # an IPv4 address in the agent's namespace
    advertise_api: str  # unix:///path, tcp://HOST:PORT or https://HOST:PORT
    labels: Mapping[str, str] = field(hash=False)  # a dict of its own (JSON-ready)
    capacity_vcpus: int
    capacity_memory_mib: int
    offline_after: float = DEFAULT_OFFLINE_AFTER
    lost_after: float = DEFAULT_LOST_AFTER

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(sorted(self.labels.items())))

    @property
    def heartbeat_interval(self) -> float:
        """Often enough that a few missed beats are not yet an outage."""
        return max(0.2, min(5.0, self.offline_after / 4))


@dataclass(frozen=True)
class Settings:
    state_dir: Path = DEFAULT_STATE_DIR
    run_dir: Path = DEFAULT_RUN_DIR
    database_url: str | None = None
    netns: str | None = None
    firecracker: str | None = None
    cloud_hypervisor: str | None = None
    kernel: Path | None = None
    default_subnet: str = DEFAULT_SUBNET
    dhcp_bridge: str | None = None
    dhcp_leases: Path | None = None
    nat: bool = False  # masquerade the managed networks out of the namespace's default route
    vmm: str = "firecracker"
    qemu_machine: str = "microvm"
    accel: str = "auto"
    qemu_vsock: str = "auto"  # what backs QEMU VMs' vsock: auto, user (roost's) or kernel
    stop_timeout: float = 3.0
    stop_vms_on_exit: bool = False  # stop every running VM on SIGTERM/SIGINT
    # directories `path` artifacts may come from for API clients that are not root (TCP);
    # the local Unix socket's clients are root anyway and may name any regular file
    artifact_dirs: tuple[Path, ...] = ()
    # directories whose Unix sockets TCP clients may name as a VM's `vsock_services`
    service_dirs: tuple[Path, ...] = ()
    orphans: Orphans = Orphans.REFUSE
    max_operations: int = DEFAULT_MAX_OPERATIONS
    max_queued_operations: int = MAX_QUEUED_OPERATIONS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    token: str | None = None  # the bearer token TCP clients must send (--token-file, $ROOST_TOKEN)
    # the certificate and key that make every TCP listener HTTPS (--tls-cert, --tls-key)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # the Host names every TCP listener answers to besides its own host: the TLS certificate's
    # names and --server-name's
    server_names: tuple[str, ...] = ()
    ca: Path | None = None  # the CAs the daemon verifies the peers it calls against (--ca)
    # Firecracker's jailer (--jailer) and the uid and gid it runs each Firecracker VM as
    jailer: Path | None = None
    jail_uid: int | None = None
    jail_gid: int | None = None
    # where cni interfaces' conflists are found by name (re-read at each ADD), and the
    # directories their plugins are looked up in, in order
    cni_conf_dir: Path = DEFAULT_CONF_DIR
    cni_bin_dirs: tuple[Path, ...] = DEFAULT_BIN_DIRS
    # this agent in a cluster (a PostgreSQL database and the cluster flags); None: one host
    cluster: ClusterSettings | None = None

    def chroot(self, name: str) -> Path | None:
        """Where the jailer chroots VM `name` (the jailer's `<base>/<exec name>/<id>/root`),
        or None without a jailer."""
        return None if self.jailer is None else jail_chroot(self.state_dir / "jail", name)


def jail_chroot(base: Path, name: str) -> Path:
    """The jailer's chroot for VM `name` under chroot base `base`."""
    return base / JAILED_EXEC_NAME / name / "root"
