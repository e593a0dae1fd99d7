"""How every command reaches the daemon: the root's options (`--api`, `--token-file`, `--ca`)
and a client for them whose errors become output and an exit code. No Typer here, so that
roost.cli.fast can run `vm show` without importing it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from roost.api.endpoints import DEFAULT_API
from roost.cli.client import Client
from roost.cli.output import reporting
from roost.names import check_name


class Globals:
    """The options of `roost` itself: how every command reaches the daemon."""

    api: str = DEFAULT_API
    token_file: Path | None = None
    ca: Path | None = None


def set_globals(
    api: str | None = None, token_file: Path | None = None, ca: Path | None = None
) -> None:
    """The root's options as every command reads them (from Typer, or roost.cli.fast)."""
    Globals.api = api or os.environ.get("ROOST_API") or DEFAULT_API
    Globals.token_file = token_file
    Globals.ca = ca


@contextmanager
def daemon(as_json: bool) -> Iterator[Client]:
    """A client for the daemon, with any error turned into output and an exit code."""
    with reporting(as_json):
        client = Client(Globals.api, token_file=Globals.token_file, ca=Globals.ca)
        try:
            yield client
        finally:
            client.close()


def vm_path(name: str, action: str | None = None) -> str:
    """The API path of a VM (or an action on it); a name that is not one is refused here,
    before it can reach another route."""
    path = f"/v1/vms/{check_name(name)}"
    return f"{path}/{action}" if action else path
