"""`roost host setup`: prepare the host roost runs on, idempotently, saying what it does; and
`roost host list|show|cordon|uncordon|drain`: a cluster's hosts, as any of its agents sees them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from roost.cli.apps import PLAIN_HELP, app
from roost.cli.options import JSONOpt
from roost.cli.output import err, fields, out, print_json, reporting, table
from roost.cli.reach import daemon
from roost.cli.views import show
from roost.host.setup import (
    RUNTIME_UNIT_DIR,
    SYSCTL_FILE,
    UNIT_DIR,
    UNIT_NAME,
    HostSetup,
    HostSysctls,
    NamespaceSysctls,
    roost_command,
    unit_text,
)
from roost.names import check_name

host_app = typer.Typer(
    help="The host roost runs on (setup) and a cluster's hosts: list, show, cordon, uncordon, "
    "drain.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)
app.add_typer(host_app, name="host")


@host_app.command("setup")
def setup_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would change; change nothing.")
    ] = False,
    netns: Annotated[
        str | None,
        typer.Option(
            "--netns",
            metavar="NAME",
            help="Set the sysctls in this network namespace only, at runtime, write nothing "
            "under /etc, and make the unit serve that namespace.",
        ),
    ] = None,
    unit_dir: Annotated[
        Path | None,
        typer.Option(
            "--unit-dir",
            metavar="DIR",
            help=f"Where {UNIT_NAME} goes (default {UNIT_DIR}; with --netns {RUNTIME_UNIT_DIR}, "
            "as the namespace does not outlive a reboot either).",
        ),
    ] = None,
    as_json: JSONOpt = False,
) -> None:
    """Prepare this host for roost, as root: IPv4 forwarding (at runtime and in
    /etc/sysctl.d) and a systemd unit for `roost serve` with KillMode=process, so stopping or
    restarting it leaves the VMs running. It reloads systemd where systemd runs, never starts
    or enables the unit, and a second run changes nothing."""
    from roost.host.netns import NetnsWorker

    with reporting(as_json):
        worker = NetnsWorker(netns) if netns else None
        try:
            setup = HostSetup(
                sysctls=NamespaceSysctls(worker) if worker else HostSysctls(),
                sysctl_file=None if netns else SYSCTL_FILE,
                unit_dir=unit_dir or (RUNTIME_UNIT_DIR if netns else UNIT_DIR),
                unit=unit_text(roost_command(), netns),
                systemd_running=RUNTIME_UNIT_DIR.is_dir(),
                dry_run=dry_run,
            )
            actions = setup.apply()
        finally:
            if worker is not None:
                worker.close()
    changes = sum(action.changed for action in actions)
    if as_json:
        print_json(
            {
                "dry_run": dry_run,
                "changed": bool(changes) and not dry_run,
                "actions": [action.to_json() for action in actions],
            }
        )
        return
    for action in actions:
        out.print(action.message, markup=False)
    if dry_run:
        summary = f"dry run: {changes} change(s) would be made" if changes else "dry run"
        out.print(f"{summary}; nothing changed", markup=False)
    elif changes:
        out.print(
            f"{changes} change(s) made. Starting or enabling {UNIT_NAME} is yours to do "
            f"(systemctl start {UNIT_NAME})",
            markup=False,
        )
    else:
        out.print("nothing changed: this host is already set up", markup=False)


HostNameArg = Annotated[str, typer.Argument(help="The host's name (as roost host list shows it).")]
NO_CLUSTER = "no hosts: this daemon is not part of a cluster (it runs on its own host)"


def host_path(name: str, action: str | None = None) -> str:
    """The API path of a host (or an action on it); a name that is not one is refused here."""
    path = f"/v1/hosts/{check_name(name)}"
    return f"{path}/{action}" if action else path


def heartbeat_age(heartbeat_at: str, now: datetime | None = None) -> str:
    """How long ago a heartbeat was, as this machine's clock sees it (`3s ago`)."""
    try:
        moment = datetime.fromisoformat(heartbeat_at.replace("Z", "+00:00"))
    except ValueError:
        return heartbeat_at
    seconds = max(0, int(((now or datetime.now(UTC)) - moment).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def _used(host: dict[str, Any], key: str) -> str:
    return f"{host['allocated'][key]}/{host['capacity'][key]}"


def hosts_table(hosts: list[dict[str, Any]], now: datetime | None = None) -> None:
    """The hosts, one line each, within 80 columns for a few hosts of short names: what each
    holds of its capacity (allocated/capacity) and how fresh its heartbeat is."""
    if not hosts:
        err.print(NO_CLUSTER, markup=False)
        return
    rows = [
        (
            host["name"],
            host["state"],
            host["vtep_address"],
            _used(host, "vcpus"),
            _used(host, "memory_mib"),
            heartbeat_age(host["heartbeat_at"], now),
        )
        for host in hosts
    ]
    table(["NAME", "STATE", "VTEP", "VCPUS", "MEMORY MIB", "HEARTBEAT"], rows)


def show_host(host: dict[str, Any], now: datetime | None = None) -> None:
    """A host as a human reads it."""
    labels = ", ".join(f"{key}={value}" for key, value in sorted(host["labels"].items()))
    fields(
        [
            ("host", host["name"]),
            ("state", host["state"]),
            ("vtep", host["vtep_address"]),
            ("api", host["api"]),
            ("labels", labels or None),
            ("vcpus", f"{_used(host, 'vcpus')} allocated"),
            ("memory", f"{_used(host, 'memory_mib')} MiB allocated"),
            ("heartbeat", f"{host['heartbeat_at']} ({heartbeat_age(host['heartbeat_at'], now)})"),
            ("epoch", host["epoch"]),
        ]
    )


def show_drain(drained: dict[str, Any]) -> None:
    """What a drain did: the host (now cordoned), the VMs it moved and those that stayed."""
    host = drained["host"]
    out.print(f"host {host['name']} is {host['state']}: no VM is placed there", markup=False)
    moved, stayed = drained["moved"], drained["stayed"]
    out.print(f"moved {len(moved)} VM(s)" + (":" if moved else ""), markup=False)
    if moved:
        table(["VM", "TO"], [(item["vm"], item["to"]) for item in moved])
    if stayed:
        out.print(f"{len(stayed)} VM(s) stayed:", markup=False)
        table(["VM", "REASON"], [(item["vm"], item["reason"]) for item in stayed])
    else:
        out.print(f"no VM is left on {host['name']}", markup=False)


@host_app.command("list")
def host_list(as_json: JSONOpt = False) -> None:
    """List the cluster's hosts: state (active, cordoned or offline), VTEP address, what
    their VMs hold of their capacity, and their last heartbeat. Empty on a single host."""
    with daemon(as_json) as client:
        hosts = client.call("GET", "/v1/hosts")
    show(hosts, as_json, hosts_table)


@host_app.command("show")
def host_show(name: HostNameArg, as_json: JSONOpt = False) -> None:
    """Show a host of the cluster: its state, addresses, labels, capacity and what its VMs
    hold, heartbeat and epoch."""
    with daemon(as_json) as client:
        host = client.call("GET", host_path(name))
    show(host, as_json, show_host)


@host_app.command("cordon")
def host_cordon(name: HostNameArg, as_json: JSONOpt = False) -> None:
    """Stop placing VMs on a host; its VMs stay and keep running (host drain moves them)."""
    with daemon(as_json) as client:
        host = client.call("POST", host_path(name, "cordon"))
    show(host, as_json, show_host)


@host_app.command("uncordon")
def host_uncordon(name: HostNameArg, as_json: JSONOpt = False) -> None:
    """Place VMs on a cordoned host again."""
    with daemon(as_json) as client:
        host = client.call("POST", host_path(name, "uncordon"))
    show(host, as_json, show_host)


@host_app.command("drain")
def host_drain(name: HostNameArg, as_json: JSONOpt = False) -> None:
    """Cordon a host, then move the records of its VMs that do not run and have no disk copy
    there to other hosts (each keeps its name, addresses and MACs; it gets a vsock CID on its
    new host). Running VMs and VMs with a disk copy stay, each listed with the reason: stop
    and remove (or recreate) them yourself."""
    with daemon(as_json) as client:
        drained = client.call("POST", host_path(name, "drain"))
    show(drained, as_json, show_drain)
