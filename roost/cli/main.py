"""The roost command line: offline tools, the daemon (`roost serve`) and its client."""

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
    vsock,
)
from roost.cli.apps import app

COMMAND_MODULES = (configs, events, host, image, networks, offline, policies, remote, serve, vsock)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
