"""The command tree; command modules attach themselves to these."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roost.api.endpoints import DEFAULT_API
from roost.cli import VERSION_LINE
from roost.cli.reach import set_globals

try:
    from roost.cli.plain_values import PlainValuesGroup as RootGroup
except ImportError:  # a Typer whose values are not converted by pydantic: nothing to spare
    from typer.core import TyperGroup as RootGroup  # type: ignore[assignment]

# Help is click's plain text (no rich panels): it wraps at the terminal's width and never cuts
# an option's name short, as rich's tables do at 80 columns.
PLAIN_HELP = None

app = typer.Typer(
    name="roost",
    cls=RootGroup,
    help="Run plugins as microVMs, networked as vsock-only, bridged or dhcp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=PLAIN_HELP,
)
plugin_app = typer.Typer(
    help="Plugins: validate, install, list, show, rm.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)
vm_app = typer.Typer(
    help="VMs: plan, create, list, show, start, stop, restart, pause, resume, rm, config, "
    "connect, forward.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)
config_app = typer.Typer(
    help="A VM's config versions: show, history, patch.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN_HELP,
)
network_app = typer.Typer(
    help="Networks roost manages.", no_args_is_help=True, rich_markup_mode=PLAIN_HELP
)
app.add_typer(plugin_app, name="plugin")
app.add_typer(vm_app, name="vm")
vm_app.add_typer(config_app, name="config")
app.add_typer(network_app, name="network")


def _print_version(given: bool) -> None:
    if given:
        typer.echo(VERSION_LINE)
        raise typer.Exit()


@app.callback()
def _globals(
    api: Annotated[
        str | None,
        typer.Option(
            "--api",
            help="The daemon: unix:///path, tcp://HOST:PORT or https://HOST:PORT "
            f"($ROOST_API; default {DEFAULT_API}).",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            metavar="FILE",
            help="A file holding the daemon's token (else $ROOST_TOKEN).",
        ),
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            metavar="FILE",
            help="PEM CA certificates to verify an https:// daemon (else the system's).",
        ),
    ] = None,
    _version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print roost's version and exit.",
        ),
    ] = False,
) -> None:
    set_globals(api, token_file, ca)
