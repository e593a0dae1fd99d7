"""The whole command tree: every command module, attached to roost.cli.apps' apps on import."""

from __future__ import annotations

from roost.cli import (
    configs,
    events,
    host,
    image,
    networks,
    offline,
    policies,
    remote,
    serve,
    ui,
    vsock,
)
from roost.cli.apps import app

COMMAND_MODULES = (
    configs,
    events,
    host,
    image,
    networks,
    offline,
    policies,
    remote,
    serve,
    ui,
    vsock,
)

__all__ = ["COMMAND_MODULES", "app"]
