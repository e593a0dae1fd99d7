"""Reaching a guest's vsock ports from where the CLI runs: `vm connect` (stdin and stdout),
`vm forward` (a TCP listener), and the forwards the daemon holds (`--persist`, `vm forwards`,
`vm unforward`).

Every connection is a WebSocket to the daemon (`GET /v1/vms/{name}/vsock/{port}`, framed as
roost.api.vsock says), over the Unix socket, TCP or TLS (verified as the client's HTTPS is),
wherever the API is. The relays themselves (asyncio, websockets) are roost.cli.vsock_relay's,
imported by the commands that relay.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import typer

from roost.cli.apps import vm_app
from roost.cli.options import JSONOpt
from roost.cli.output import err, out, print_json, reporting, table
from roost.cli.reach import daemon, vm_path
from roost.cli.remote import NameArg
from roost.cli.views import show
from roost.errors import InvalidError

MAX_PORT = 65535

PortArg = Annotated[int, typer.Argument(help="The guest's vsock port.", show_default=False)]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", help="Seconds to keep trying to reach the guest's port."),
]
LingerOpt = Annotated[
    float,
    typer.Option(
        "--linger",
        help="After stdin ends, seconds of silence from the guest before closing.",
    ),
]


# ---- vm connect -------------------------------------------------------------------------


@vm_app.command("connect")
def vm_connect(
    name: NameArg, port: PortArg, timeout: TimeoutOpt = 10.0, linger: LingerOpt = 1.0
) -> None:
    """Connect stdin and stdout to a port of the VM's vsock, through the daemon.

    Bytes pass as they are. When stdin ends, the output goes on until the guest closes or has
    been silent for --linger seconds. Ctrl-C ends it (exit 0)."""
    from roost.cli.vsock_relay import relay_stdio

    with reporting(as_json=False), contextlib.suppress(KeyboardInterrupt):
        relay_stdio(vm_path(name, f"vsock/{port}"), timeout, linger)


# ---- vm forward -------------------------------------------------------------------------


@vm_app.command("forward")
def vm_forward(
    name: NameArg,
    spec: Annotated[
        str,
        typer.Argument(
            metavar="[ADDR:]HOSTPORT:GUESTPORT",
            help="Listen on ADDR (default 127.0.0.1) port HOSTPORT (0: any free one), relay "
            "to the guest's vsock port GUESTPORT.",
            show_default=False,
        ),
    ],
    persist: Annotated[
        bool,
        typer.Option(
            "--persist",
            help="Let the daemon hold the forward (where it runs, loopback only) until "
            "removed; prints its id.",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the forward as JSON (with --persist: the daemon's; without: once "
            "listening, with the port chosen).",
        ),
    ] = False,
) -> None:
    """Relay TCP connections to a port of the VM's vsock.

    Without --persist the listener runs here until Ctrl-C (exit 0), each connection through
    a WebSocket of its own; one that fails is reported on stderr and the listener stays."""
    from roost.cli.vsock_relay import address, listen_and_relay

    with reporting(as_json):
        vm_path(name)  # a name that cannot be one is refused before anything listens
        host, host_port, guest_port = _forward_spec(spec)
    listen = address(host, host_port)
    if persist:
        with daemon(as_json) as client:
            body = {"listen": listen, "guest_port": guest_port}
            forward = client.call("POST", vm_path(name, "forwards"), body=body)
        if as_json:
            print_json(forward)
        else:
            out.print(str(forward["id"]), markup=False)
        return
    with reporting(as_json), contextlib.suppress(KeyboardInterrupt):
        listen_and_relay(name, host, host_port, guest_port, as_json)


def _forward_spec(spec: str) -> tuple[str, int, int]:
    """`[ADDR:]HOSTPORT:GUESTPORT` as (address, host port, guest port); an IPv6 address is
    written in brackets."""
    rest, _, guest_text = spec.rpartition(":")
    host, colon, host_text = rest.rpartition(":")
    if not colon:
        host, host_text = "127.0.0.1", rest
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif "[" in host or "]" in host or ":" in host:
        host = ""  # an IPv6 address without its brackets, or half of them
    ports = [text for text in (host_text, guest_text) if text.isascii() and text.isdigit()]
    if not host or len(ports) != 2 or int(host_text) > MAX_PORT or int(guest_text) < 1:
        raise InvalidError.at(
            "forward",
            f"{spec!r} is not [ADDR:]HOSTPORT:GUESTPORT (e.g. 8080:1024 or "
            "127.0.0.1:8080:1024; HOSTPORT 0 to 65535, GUESTPORT from 1)",
        )
    return host, int(host_text), int(guest_text)


# ---- the daemon's forwards --------------------------------------------------------------


@vm_app.command("forwards")
def vm_forwards(name: NameArg, as_json: JSONOpt = False) -> None:
    """List the forwards the daemon holds for the VM."""
    with daemon(as_json) as client:
        forwards = client.call("GET", vm_path(name, "forwards"))

    def human(items: list[dict[str, Any]]) -> None:
        rows = [(f["id"], f["listen"], f["guest_port"]) for f in items]
        table(["ID", "LISTEN", "GUEST PORT"], rows)

    show(forwards, as_json, human)


@vm_app.command("unforward")
def vm_unforward(
    name: NameArg,
    forward_id: Annotated[
        int, typer.Argument(metavar="ID", help="The forward's id.", show_default=False)
    ],
    as_json: JSONOpt = False,
) -> None:
    """Remove a forward the daemon holds for the VM."""
    with daemon(as_json) as client:
        client.call("DELETE", vm_path(name, f"forwards/{forward_id}"))
    if as_json:
        print_json({"removed": forward_id})
    else:
        err.print(f"removed forward {forward_id} of VM {name}", markup=False)
