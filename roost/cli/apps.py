"""The command tree; command modules attach themselves to these."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from roost.api.endpoints import DEFAULT_API

app = typer.Typer(
    name="roost",
    help="Run plugins as microVMs, networked as vsock-only, bridged or dhcp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
plugin_app = typer.Typer(help="Plugins: validate, install, list, show, rm.", no_args_is_help=True)
vm_app = typer.Typer(
    help="VMs: plan, create, list, show, start, stop, restart, pause, resume, rm.",
    no_args_is_help=True,
)
network_app = typer.Typer(help="Networks roost manages.", no_args_is_help=True)
app.add_typer(plugin_app, name="plugin")
app.add_typer(vm_app, name="vm")
app.add_typer(network_app, name="network")


class Globals:
    api: str = DEFAULT_API


@app.callback()
def _globals(
    api: Annotated[
        str | None,
        typer.Option(
            "--api",
            help="The daemon: unix:///path or tcp://HOST:PORT ($ROOST_API; default "
            f"{DEFAULT_API}).",
        ),
    ] = None,
) -> None:
    Globals.api = api or os.environ.get("ROOST_API") or DEFAULT_API
