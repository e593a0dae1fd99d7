"""`roost host setup`: prepare the host roost runs on, idempotently, saying what it does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roost.cli.apps import PLAIN_HELP, app
from roost.cli.options import JSONOpt
from roost.cli.output import out, print_json, reporting
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

host_app = typer.Typer(
    help="The host roost runs on: setup.", no_args_is_help=True, rich_markup_mode=PLAIN_HELP
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
