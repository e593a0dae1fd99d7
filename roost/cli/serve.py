"""`roost serve`: run the daemon."""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path
from typing import Annotated

import typer

from roost.api.access import certificate_names, client_context, read_token
from roost.api.endpoints import DEFAULT_API, Endpoint
from roost.cli.apps import app
from roost.cli.output import reporting
from roost.defaults import DEFAULT_SUBNET
from roost.engine.settings import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_OPERATIONS,
    DEFAULT_RUN_DIR,
    DEFAULT_STATE_DIR,
    Accel,
    Orphans,
    QemuMachine,
    QemuVsock,
    Settings,
)
from roost.errors import HostError, InvalidError
from roost.names import VMMKind

# a DNS name as a Host header carries it: dot-separated labels of letters, digits and hyphens
HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


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
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning.")] = "info",
) -> None:
    """Run the roost daemon (its VMs keep running when it stops).

    A tcp:// listener needs a token (--token-file or $ROOST_TOKEN), which clients send as a
    bearer token; one off loopback also needs TLS (--tls-cert and --tls-key).
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for chatty in ("alembic", "httpx", "uvicorn.error"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from roost.api.server import serve

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
        )
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


def _server_name(name: str) -> str:
    """`name` if a `Host` header can name it: a DNS name or an address, without a port."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if not HOST_NAME.fullmatch(name):
            raise InvalidError.at(
                "server-name",
                f"{name!r} is not a host name or an address (give it without scheme or port, "
                "e.g. roost.example.com)",
            ) from None
    return name
