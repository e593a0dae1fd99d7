"""`roost network create|show|rm`: named networks (`network list` is with the other reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from roost.cli.apps import network_app
from roost.cli.files import read_json
from roost.cli.options import JSONOpt
from roost.cli.output import err, fields, print_json
from roost.cli.reach import daemon
from roost.cli.views import show
from roost.names import check_name

NetworkNameArg = Annotated[str, typer.Argument(help="The network's name.")]


def network_path(name: str) -> str:
    return f"/v1/networks/{check_name(name)}"


def show_network(network: dict[str, Any]) -> None:
    """A network as a human reads it."""
    conflist = network.get("conflist")
    if conflist is not None:
        plugins = ", ".join(plugin.get("type", "?") for plugin in conflist.get("plugins", []))
        fields(
            [
                ("network", network["name"]),
                ("kind", network["kind"]),
                ("managed", "no (its CNI plugins make its links and addresses)"),
                ("conflist", f"{conflist.get('name')} (cniVersion {conflist.get('cniVersion')})"),
                ("plugins", plugins),
            ]
        )
        return
    fields(
        [
            ("network", network["name"]),
            ("kind", network["kind"]),
            ("managed", "yes" if network["managed"] else "no (the operator's bridge)"),
            ("bridge", network["bridge"]),
            ("subnet", network["subnet"]),
            ("gateway", network["gateway"]),
            ("ipv6 prefix", network["ipv6_prefix"]),
            *spanning(network),
            ("leases", ", ".join(network["leases"]) or "none"),
        ]
    )


def spanning(network: dict[str, Any]) -> list[tuple[str, Any]]:
    """A cluster network's VXLAN id and MTU, or the host a host-local one belongs to (nothing
    on a single host, as before)."""
    if network.get("host") is not None:
        return [("host", network["host"])]
    if network.get("vni") is None:
        return []
    return [("vni", network["vni"]), ("mtu", network["mtu"])]


@network_app.command("create")
def network_create(
    name: NetworkNameArg,
    subnet: Annotated[
        str | None, typer.Option("--subnet", help="Its IPv4 CIDR (required unless --external).")
    ] = None,
    gateway: Annotated[
        str | None, typer.Option("--gateway", help="Its gateway (default: the first host).")
    ] = None,
    bridge: Annotated[
        str | None,
        typer.Option("--bridge", help="The bridge (default rbr<id>; required with --external)."),
    ] = None,
    external: Annotated[
        bool,
        typer.Option("--external", help="Register the operator's existing bridge, untouched."),
    ] = False,
    ipv6_prefix: Annotated[
        str | None,
        typer.Option("--ipv6-prefix", help="An IPv6 /64 for a managed network, or auto."),
    ] = None,
    cni: Annotated[
        Path | None,
        typer.Option(
            "--cni",
            metavar="CONFLIST.json",
            help="A CNI network: this conflist, which VMs name with cni.network (alone).",
        ),
    ] = None,
    as_json: JSONOpt = False,
) -> None:
    """Create a managed network (roost makes its bridge now and keeps it until network rm),
    register an operator's bridge with --external, or a CNI conflist with --cni."""
    body = {
        "name": name,
        "subnet": subnet,
        "gateway": gateway,
        "bridge": bridge,
        "external": external,
        "ipv6_prefix": ipv6_prefix,
    }
    with daemon(as_json) as client:
        if cni is not None:
            body["cni"] = read_json(cni)
        network = client.call(
            "POST", "/v1/networks", body={k: v for k, v in body.items() if v is not None}
        )
    show(network, as_json, show_network)


@network_app.command("show")
def network_show(name: NetworkNameArg, as_json: JSONOpt = False) -> None:
    """Show a network: its kind, bridge, subnet, IPv6 prefix and the addresses held on it (a
    cni network: its conflist)."""
    with daemon(as_json) as client:
        network = client.call("GET", network_path(name))
    show(network, as_json, show_network)


@network_app.command("rm")
def network_rm(name: NetworkNameArg, as_json: JSONOpt = False) -> None:
    """Remove a named network no VM uses (a managed one's bridge with it)."""
    with daemon(as_json) as client:
        client.call("DELETE", network_path(name))
    if as_json:
        print_json({"removed": name})
    else:
        err.print(f"removed network {name}", markup=False)
