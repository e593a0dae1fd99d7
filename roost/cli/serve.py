"""`roost serve`: run the daemon."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from roost.api.access import certificate_names, client_context, read_token
from roost.api.endpoints import DEFAULT_API, Endpoint
from roost.cli.apps import app
from roost.cli.output import reporting
from roost.defaults import DEFAULT_SUBNET
from roost.engine.settings import (
    DEFAULT_LOST_AFTER,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_OPERATIONS,
    DEFAULT_OFFLINE_AFTER,
    DEFAULT_RUN_DIR,
    DEFAULT_STATE_DIR,
    VCPUS_PER_CPU,
    Accel,
    ClusterSettings,
    Orphans,
    QemuMachine,
    QemuVsock,
    Settings,
)
from roost.errors import HostError, InvalidError
from roost.names import VMMKind, check_name

# a DNS name as a Host header carries it: dot-separated labels of letters, digits and hyphens
HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
CLUSTER_USAGE = "--host-name NAME --vtep-address IP --advertise-api URL"
MAX_CAPACITY_VCPUS = 2**31 - 1  # the hosts table's integer column
MEMINFO = Path("/proc/meminfo")


@app.command("serve")
def serve_command(
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="Database and stored artifacts.")
    ] = DEFAULT_STATE_DIR,
    run_dir: Annotated[
        Path, typer.Option("--run-dir", help="Per-VM sockets, logs and status files.")
    ] = DEFAULT_RUN_DIR,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="Any SQLAlchemy URL (default: SQLite in the state dir)."
        ),
    ] = None,
    listen: Annotated[
        list[str] | None,
        typer.Option(
            "--listen",
            help=f"unix:///path or tcp://HOST:PORT; repeatable (default {DEFAULT_API}).",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            metavar="FILE",
            help="The token TCP clients must send (else $ROOST_TOKEN).",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert",
            metavar="FILE",
            help="A PEM certificate (chain): every TCP listener serves HTTPS with it.",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option("--tls-key", metavar="FILE", help="The certificate's unencrypted key."),
    ] = None,
    server_name: Annotated[
        list[str] | None,
        typer.Option(
            "--server-name",
            metavar="NAME",
            help="A further Host name TCP listeners answer to; repeatable.",
        ),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            metavar="FILE",
            help="PEM CA certificates to verify the peers the daemon calls.",
        ),
    ] = None,
    netns: Annotated[
        str | None,
        typer.Option("--netns", help="An existing network namespace for links, rules and VMMs."),
    ] = None,
    firecracker: Annotated[
        str | None,
        typer.Option("--firecracker", help="The Firecracker binary ($ROOST_FIRECRACKER, PATH)."),
    ] = None,
    jailer: Annotated[
        Path | None,
        typer.Option(
            "--jailer",
            help="Run every Firecracker VM chrooted under this jailer (needs --uid and --gid).",
        ),
    ] = None,
    uid: Annotated[
        int | None, typer.Option("--uid", min=0, help="The uid the jailer runs VMs as.")
    ] = None,
    gid: Annotated[
        int | None, typer.Option("--gid", min=0, help="The gid the jailer runs VMs as.")
    ] = None,
    cloud_hypervisor: Annotated[
        str | None,
        typer.Option(
            "--cloud-hypervisor",
            help="The Cloud Hypervisor binary ($ROOST_CLOUD_HYPERVISOR, PATH).",
        ),
    ] = None,
    kernel: Annotated[
        Path | None,
        typer.Option("--kernel", help="Default ELF vmlinux for plugins that name none."),
    ] = None,
    default_subnet: Annotated[
        str, typer.Option("--default-subnet", help="The default bridged network.")
    ] = DEFAULT_SUBNET,
    dhcp_bridge: Annotated[
        str | None,
        typer.Option(
            "--dhcp-bridge", help="The operator's bridge, with a DHCP server, for dhcp VMs."
        ),
    ] = None,
    dhcp_leases: Annotated[
        Path | None,
        typer.Option("--dhcp-leases", help="A DHCP server's lease file to learn dhcp VMs' IPs."),
    ] = None,
    cni_conf_dir: Annotated[
        Path,
        typer.Option(
            "--cni-conf-dir", help="Where cni interfaces' conflists are found by their name."
        ),
    ] = Settings.cni_conf_dir,
    cni_bin_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--cni-bin-dir",
            help="A directory of CNI plugins; repeatable, searched in order (default "
            f"{' then '.join(map(str, Settings.cni_bin_dirs))}).",
        ),
    ] = None,
    nat: Annotated[
        bool,
        typer.Option(
            "--nat",
            help="Masquerade roost's bridged networks out of the namespace's default route "
            "(turns IPv4 forwarding on there, never off).",
        ),
    ] = False,
    vmm: Annotated[VMMKind, typer.Option("--vmm", help="The default VMM.")] = VMMKind.FIRECRACKER,
    qemu_machine: Annotated[
        QemuMachine, typer.Option("--qemu-machine", help="QEMU's machine type.")
    ] = QemuMachine.MICROVM,
    accel: Annotated[
        Accel, typer.Option("--accel", help="QEMU's accelerator (auto probes KVM once).")
    ] = Accel.AUTO,
    qemu_vsock: Annotated[
        QemuVsock,
        typer.Option(
            "--qemu-vsock",
            help="What backs QEMU VMs' vsock: the kernel's vhost-vsock, roost's own device "
            "(user), or auto (kernel where /dev/vhost-vsock exists, else user).",
        ),
    ] = QemuVsock.AUTO,
    artifact_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--artifact-dir",
            help="A directory TCP clients may name artifact paths in; repeatable.",
        ),
    ] = None,
    service_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--service-dir",
            help="A directory whose Unix sockets TCP clients may name as vsock_services; "
            "repeatable.",
        ),
    ] = None,
    reap_orphans: Annotated[
        bool,
        typer.Option("--reap-orphans", help="End live VMMs the database does not know."),
    ] = False,
    keep_orphans: Annotated[
        bool,
        typer.Option("--keep-orphans", help="Leave live VMMs the database does not know."),
    ] = False,
    stop_vms_on_exit: Annotated[
        bool,
        typer.Option(
            "--stop-vms-on-exit",
            help="On SIGTERM/SIGINT, stop every running VM (gracefully) before exiting; "
            "without it they keep running.",
        ),
    ] = False,
    stop_timeout: Annotated[
        float,
        typer.Option(
            "--stop-timeout",
            min=0,
            max=3600,
            help="Seconds a stop waits for the guest to power off before SIGTERM where the "
            "request names none (vm stop without --timeout, vm restart, vm rm, "
            "--stop-vms-on-exit).",
        ),
    ] = Settings.stop_timeout,
    max_operations: Annotated[
        int,
        typer.Option(
            "--max-operations", min=1, max=1024, help="VM operations and installs at once."
        ),
    ] = DEFAULT_MAX_OPERATIONS,
    max_body_bytes: Annotated[
        int,
        typer.Option("--max-body-bytes", min=1024, help="The largest request body accepted."),
    ] = DEFAULT_MAX_BODY_BYTES,
    host_name: Annotated[
        str | None,
        typer.Option(
            "--host-name",
            metavar="NAME",
            help="Cluster (PostgreSQL): this agent's host name, a DNS label.",
        ),
    ] = None,
    vtep_address: Annotated[
        str | None,
        typer.Option(
            "--vtep-address",
            metavar="IP",
            help="Cluster: this host's IPv4 address that peers' VXLAN tunnels reach.",
        ),
    ] = None,
    advertise_api: Annotated[
        str | None,
        typer.Option(
            "--advertise-api",
            metavar="URL",
            help="Cluster: where peers call this agent's API (unix:///path, tcp://HOST:PORT "
            "or https://HOST:PORT).",
        ),
    ] = None,
    host_label: Annotated[
        list[str] | None,
        typer.Option(
            "--host-label",
            metavar="KEY=VALUE",
            help="Cluster: a label of this host, for placement (repeat for each).",
            show_default=False,
        ),
    ] = None,
    capacity_vcpus: Annotated[
        int | None,
        typer.Option(
            "--capacity-vcpus",
            metavar="N",
            help=f"Cluster: the vCPUs VMs may reserve here (default {VCPUS_PER_CPU} per CPU).",
        ),
    ] = None,
    capacity_memory_mib: Annotated[
        int | None,
        typer.Option(
            "--capacity-memory-mib",
            metavar="N",
            help="Cluster: the MiB of memory VMs may reserve here (default: MemTotal).",
        ),
    ] = None,
    offline_after: Annotated[
        float | None,
        typer.Option(
            "--offline-after",
            metavar="SECONDS",
            help="Cluster: seconds without a heartbeat before a host is offline and gets "
            f"no VMs (default {DEFAULT_OFFLINE_AFTER:g}).",
        ),
    ] = None,
    lost_after: Annotated[
        float | None,
        typer.Option(
            "--lost-after",
            metavar="SECONDS",
            help="Cluster: seconds without a heartbeat before a host's VMs are lost, their "
            f"addresses released (default {DEFAULT_LOST_AFTER:g}).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning.")] = "info",
) -> None:
    """Run the roost daemon (its VMs keep running when it stops).

    A tcp:// listener needs a token (--token-file or $ROOST_TOKEN), which clients send as a
    bearer token; one off loopback also needs TLS (--tls-cert and --tls-key).

    With a PostgreSQL --database-url the daemon is an agent of the cluster that database
    coordinates: --host-name, --vtep-address and --advertise-api are required then.
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for chatty in ("alembic", "httpx", "uvicorn.error"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    with reporting(as_json=False):
        if reap_orphans and keep_orphans:
            typer.echo("error: --reap-orphans and --keep-orphans exclude each other", err=True)
            raise typer.Exit(2)
        endpoints = [Endpoint.parse(url) for url in (listen or [DEFAULT_API])]
        token = read_token(token_file)
        if (tls_cert is None) != (tls_key is None):
            raise InvalidError.at(
                "tls-cert", "--tls-cert and --tls-key go together: a certificate and its key"
            )
        _check_listeners(endpoints, token, tls=tls_cert is not None)
        names = tuple(map(_server_name, server_name or ()))
        if tls_cert is not None and tls_key is not None:
            names += certificate_names(tls_cert, tls_key)
        if ca is not None:
            client_context(ca)  # a CA file that cannot serve fails now, not at the first call
        if (jailer is None) != (uid is None) or (uid is None) != (gid is None):
            raise InvalidError.at(
                "jailer", "--jailer, --uid and --gid go together: the jailer and who VMs run as"
            )
        if uid == 0 or gid == 0:  # the jailer would run Firecracker as root: nothing dropped
            raise InvalidError.at(
                "uid" if uid == 0 else "gid",
                "is 0 (root); jailed VMs run with dropped privileges: give an unprivileged uid "
                "and gid (e.g. --uid 65534 --gid 65534)",
            )
        cluster = cluster_settings(
            database_url,
            ClusterFlags(
                host_name=host_name,
                vtep_address=vtep_address,
                advertise_api=advertise_api,
                host_labels=host_label,
                capacity_vcpus=capacity_vcpus,
                capacity_memory_mib=capacity_memory_mib,
                offline_after=offline_after,
                lost_after=lost_after,
            ),
            token=token,
        )
        if cluster is not None:
            names += _advertised_names(cluster, names)
        orphans = Orphans.REAP if reap_orphans else Orphans.KEEP if keep_orphans else Orphans.REFUSE
        settings = Settings(
            state_dir=state_dir.resolve(),
            run_dir=run_dir.resolve(),
            database_url=database_url,
            netns=netns,
            firecracker=firecracker,
            cloud_hypervisor=cloud_hypervisor,
            kernel=kernel.resolve() if kernel else None,
            default_subnet=default_subnet,
            dhcp_bridge=dhcp_bridge,
            dhcp_leases=dhcp_leases.resolve() if dhcp_leases else None,
            cni_conf_dir=cni_conf_dir.resolve(),
            cni_bin_dirs=tuple(path.resolve() for path in cni_bin_dir or Settings.cni_bin_dirs),
            nat=nat,
            vmm=vmm.value,
            qemu_machine=qemu_machine.value,
            accel=accel.value,
            qemu_vsock=qemu_vsock.value,
            artifact_dirs=tuple(path.resolve() for path in artifact_dir or ()),
            service_dirs=tuple(path.resolve() for path in service_dir or ()),
            orphans=orphans,
            stop_vms_on_exit=stop_vms_on_exit,
            stop_timeout=stop_timeout,
            max_operations=max_operations,
            max_body_bytes=max_body_bytes,
            token=token,
            tls_cert=tls_cert.resolve() if tls_cert else None,
            tls_key=tls_key.resolve() if tls_key else None,
            server_names=names,
            ca=ca.resolve() if ca else None,
            jailer=jailer.resolve() if jailer else None,
            jail_uid=uid,
            jail_gid=gid,
            cluster=cluster,
        )
        # imported once the flags are found sound: the server's imports take a second or
        # more, which a refused start need not wait for
        from roost.api.server import serve

        try:
            serve(settings, endpoints)
        except OSError as error:  # e.g. the address is in use, or a directory is not writable
            raise HostError(f"the daemon cannot run: {error}") from None


def _check_listeners(endpoints: list[Endpoint], token: str | None, *, tls: bool) -> None:
    """TCP listeners only with a token, and off loopback only with TLS: whoever reaches the
    API can make the daemon start VMs as root, and the token must not cross a network in
    clear."""
    for endpoint in endpoints:
        if endpoint.tls:
            raise InvalidError.at(
                "listen",
                f"{endpoint.url}: a listener is tcp://HOST:PORT; --tls-cert and --tls-key make "
                "every TCP listener HTTPS",
            )
        if not endpoint.is_tcp:
            continue
        if not endpoint.is_loopback and not tls:
            raise InvalidError.at(
                "listen",
                f"{endpoint.url}: a TCP listener off loopback needs TLS, or the token would "
                "cross the network in clear; start with --tls-cert FILE --tls-key FILE, or "
                "listen on a loopback address (127.0.0.1, ::1 or localhost)",
            )
        if token is None:
            raise InvalidError.at(
                "listen",
                f"{endpoint.url}: a TCP listener needs a token; pass --token-file FILE or set "
                "$ROOST_TOKEN (clients send it as 'Authorization: Bearer <token>'), or listen "
                "on a Unix socket",
            )


def _server_name(name: str, loc: str = "server-name") -> str:
    """`name` if a `Host` header can name it: a DNS name or an address, without a port."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if not HOST_NAME.fullmatch(name):
            raise InvalidError.at(
                loc,
                f"{name!r} is not a host name or an address (give it without scheme or port, "
                "e.g. roost.example.com)",
            ) from None
    return name


@dataclass(frozen=True)
class ClusterFlags:
    """The cluster flags of `roost serve` as given (None: not given)."""

    host_name: str | None = None
    vtep_address: str | None = None
    advertise_api: str | None = None
    host_labels: list[str] | None = None
    capacity_vcpus: int | None = None
    capacity_memory_mib: int | None = None
    offline_after: float | None = None
    lost_after: float | None = None

    def given(self) -> list[str]:
        """The flags given, as written on the command line."""
        values = {
            "--host-name": self.host_name,
            "--vtep-address": self.vtep_address,
            "--advertise-api": self.advertise_api,
            "--host-label": self.host_labels or None,
            "--capacity-vcpus": self.capacity_vcpus,
            "--capacity-memory-mib": self.capacity_memory_mib,
            "--offline-after": self.offline_after,
            "--lost-after": self.lost_after,
        }
        return [flag for flag, value in values.items() if value is not None]


def is_postgresql(database_url: str | None) -> bool:
    """Whether `database_url` is a PostgreSQL database's (any driver): a cluster's."""
    scheme = (database_url or "").partition(":")[0]
    return scheme.partition("+")[0] == "postgresql"


def cluster_settings(
    database_url: str | None, flags: ClusterFlags, *, token: str | None
) -> ClusterSettings | None:
    """This agent's place in the cluster a PostgreSQL database coordinates, from the cluster
    flags (None on SQLite, where they are refused); `InvalidError` names the flag at fault."""
    given = flags.given()
    if not is_postgresql(database_url):
        if given:
            them = "it" if len(given) == 1 else "them"
            raise InvalidError.at(
                given[0].removeprefix("--"),
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for an agent of a "
                "cluster, whose database is PostgreSQL: add --database-url "
                f"postgresql+psycopg://USER@HOST/DB, or leave {them} out to run one host on "
                "SQLite",
            )
        return None
    host_name, vtep_address, advertise_api = (
        flags.host_name,
        flags.vtep_address,
        flags.advertise_api,
    )
    if host_name is None or vtep_address is None or advertise_api is None:
        required = ("--host-name", "--vtep-address", "--advertise-api")
        missing = [flag for flag in required if flag not in given]
        raise InvalidError.at(
            missing[0].removeprefix("--"),
            f"a PostgreSQL database makes this daemon an agent of a cluster, which needs "
            f"{CLUSTER_USAGE} (missing {', '.join(missing)}), e.g. --host-name host1 "
            "--vtep-address 10.251.0.1 --advertise-api unix:///run/roost/roost.sock",
        )
    name = check_name(host_name, "host-name")
    vtep = _vtep_address(vtep_address)
    api = _advertised_api(advertise_api, token)
    labels = _host_labels(flags.host_labels or [])
    vcpus = _capacity("capacity-vcpus", flags.capacity_vcpus, MAX_CAPACITY_VCPUS, default_vcpus)
    memory_mib = _capacity(
        "capacity-memory-mib", flags.capacity_memory_mib, 2**63 - 1, default_memory_mib
    )
    offline_after = _seconds("offline-after", flags.offline_after, DEFAULT_OFFLINE_AFTER)
    lost_after = _seconds("lost-after", flags.lost_after, DEFAULT_LOST_AFTER)
    if lost_after <= offline_after:
        raise InvalidError.at(
            "lost-after",
            f"is {lost_after:g} s, not longer than --offline-after ({offline_after:g} s): a "
            "silent host is offline first, and its VMs are lost only after a longer silence",
        )
    return ClusterSettings(
        host_name=name,
        vtep_address=vtep,
        advertise_api=api,
        labels=labels,
        capacity_vcpus=vcpus,
        capacity_memory_mib=memory_mib,
        offline_after=offline_after,
        lost_after=lost_after,
    )


def _vtep_address(text: str) -> str:
    """A unicast IPv4 address, as peers' VXLAN tunnels reach this host at it."""
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise InvalidError.at(
            "vtep-address",
            f"{text!r} is not an IPv4 address; give this host's address on the network "
            "between the hosts, e.g. 10.251.0.1",
        ) from None
    kinds = {
        "a multicast": address.is_multicast,
        "the unspecified": address.is_unspecified,
        "a loopback": address.is_loopback,
        "a reserved (or broadcast)": address.is_reserved,
    }
    for kind, applies in kinds.items():
        if applies:
            raise InvalidError.at(
                "vtep-address",
                f"{text} is {kind} address; give this host's unicast address on the network "
                "between the hosts, which its peers' VXLAN tunnels reach",
            )
    return str(address)


def _advertised_api(url: str, token: str | None) -> str:
    """An API URL peers can call: a Unix socket (agents on one machine), or a TCP host they
    can name, with the token they send."""
    endpoint = Endpoint.parse(url, "advertise-api")
    if endpoint.host is None:
        return url
    with_address = _server_name(endpoint.host, "advertise-api")
    if with_address in ("0.0.0.0", "::"):
        raise InvalidError.at(
            "advertise-api",
            f"{url}: {with_address} is where a daemon listens, not an address peers can call; "
            "give this host's address or name",
        )
    if token is None:
        raise InvalidError.at(
            "advertise-api",
            f"{url}: peers call a TCP API with the cluster's token; pass --token-file FILE or "
            "set $ROOST_TOKEN (the same token on every host)",
        )
    return url


def _advertised_names(cluster: ClusterSettings, names: tuple[str, ...]) -> tuple[str, ...]:
    """The advertised API's host name, which peers send as `Host`, unless `names` has it."""
    host = Endpoint.parse(cluster.advertise_api).host
    return () if host is None or host in names else (host,)


def _host_labels(texts: list[str]) -> dict[str, str]:
    """`--host-label KEY=VALUE` flags as a map (a later one for a key wins), by the rules of VM
    labels."""
    from roost.spec.common import MAX_LABELS, label_selector

    labels = {}
    for text in texts:
        if "=" not in text:
            raise InvalidError.at(
                "host-label", f"{text!r}: write KEY=VALUE, e.g. --host-label zone=a"
            )
        try:
            key, value = label_selector(text)
        except ValueError as error:
            raise InvalidError.at("host-label", str(error)) from None
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise InvalidError.at(
            "host-label",
            f"{len(labels)} labels; at most {MAX_LABELS} are allowed: keep those placement "
            "selects hosts by",
        )
    return labels


def _capacity(loc: str, given: int | None, most: int, default: Callable[[], int]) -> int:
    if given is None:
        return default()
    if not 1 <= given <= most:
        raise InvalidError.at(
            loc, f"is {given}; give a whole number from 1 to {most} (or leave it out)"
        )
    return given


def default_vcpus() -> int:
    """16 vCPUs per CPU of the host."""
    return (os.cpu_count() or 1) * VCPUS_PER_CPU


def default_memory_mib() -> int:
    """The host's memory (MemTotal), in MiB."""
    for line in MEMINFO.read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "MemTotal":
            return int(value.split()[0]) // 1024
    raise HostError(f"{MEMINFO} has no MemTotal; give --capacity-memory-mib N")


def _seconds(loc: str, given: float | None, default: float) -> float:
    if given is None:
        return default
    if not math.isfinite(given) or given <= 0:
        raise InvalidError.at(
            loc, f"is {given:g}; give a number of seconds above 0 (default {default:g})"
        )
    return given
