"""Commands that need no daemon: validate, plan, schema."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from roost.cli.apps import app, plugin_app, vm_app
from roost.cli.files import manifest_problems, read_manifest
from roost.cli.interfaces import InterfaceOpt, interfaces_from
from roost.cli.options import (
    ConfigOpt,
    JSONOpt,
    NetworkAutoAssignOpt,
    NetworkFlags,
    NetworkGatewayOpt,
    NetworkIPOpt,
    NetworkModeOpt,
    NetworkSubnetOpt,
    vm_config_from,
)
from roost.cli.output import err, fields, out, print_json, reporting, table, usage_error, yes_no
from roost.defaults import DEFAULT_SUBNET
from roost.errors import ExitCode, InvalidError
from roost.names import check_name

if TYPE_CHECKING:
    from pydantic import BaseModel

    from roost.plan import EffectiveNetwork, NetworkPlan
    from roost.plan.interfaces import EffectiveInterface, ResolvedInterfaces
    from roost.plan.network import CniNetwork
    from roost.spec import Manifest

# roost.plan and roost.spec (pydantic) are imported by the commands that use them, so that the
# commands that talk to the daemon start without them


@plugin_app.command("validate")
def plugin_validate(
    files: Annotated[list[Path], typer.Argument(help="Manifest files to check.")],
    as_json: JSONOpt = False,
) -> None:
    """Check plugin manifests offline; exit 1 if any is invalid."""
    results: list[dict[str, Any]] = []
    for path in files:
        manifest, problems = manifest_problems(path)
        if manifest is not None:
            results.append(
                {
                    "file": str(path),
                    "valid": True,
                    "manifest": manifest.model_dump(mode="json", exclude_none=True),
                }
            )
            if not as_json:
                out.print(f"{path}: valid ({manifest.name} {manifest.version})", markup=False)
        else:
            results.append(
                {"file": str(path), "valid": False, "errors": [p.to_json() for p in problems]}
            )
            for problem in problems:
                err.print(f"{path}: {problem.loc}: {problem.msg}", markup=False)
    if as_json:
        print_json(results[0] if len(results) == 1 else results)
    if not all(result["valid"] for result in results):
        raise typer.Exit(ExitCode.INVALID)


@vm_app.command("plan")
def vm_plan(
    name: Annotated[str, typer.Argument(help="The VM's name.")],
    plugin: Annotated[Path, typer.Option("--plugin", help="The plugin's manifest file.")],
    config: ConfigOpt = None,
    default_subnet: Annotated[
        str, typer.Option("--default-subnet", help="The daemon's default network.")
    ] = DEFAULT_SUBNET,
    network_mode: NetworkModeOpt = None,
    network_subnet: NetworkSubnetOpt = None,
    network_gateway: NetworkGatewayOpt = None,
    network_auto_assign: NetworkAutoAssignOpt = None,
    network_ip: NetworkIPOpt = None,
    interface: InterfaceOpt = None,
    as_json: JSONOpt = False,
) -> None:
    """Show, offline, the network a VM would get and what roost would set up for it.

    A registered network named by the config is left for the daemon to resolve.
    """
    flags = NetworkFlags(
        network_mode, network_subnet, network_gateway, network_auto_assign, network_ip
    )
    interfaces = interfaces_from(interface, flags)
    with reporting(as_json):
        check_name(name)
        try:
            manifest = read_manifest(plugin)
        except InvalidError as error:
            raise InvalidError(f"{plugin} is not a valid plugin manifest", error.details) from None
        vm_config = vm_config_from(manifest.name, config, flags, interfaces=interfaces)
        from roost.plan import DefaultNetwork
        from roost.plan.interfaces import resolve_interfaces

        default = DefaultNetwork.from_cidr(default_subnet)
        resolved = resolve_interfaces(manifest, vm_config, default, None, vm_name=name)
    if as_json:
        print_json(_plan_json(name, resolved))
    elif resolved.single:
        _single_plan_human(name, manifest, resolved)
    else:
        _interfaces_plan_human(name, manifest, resolved)


def _plan_json(name: str, resolved: ResolvedInterfaces) -> dict[str, Any]:
    """The plan as scripts read it: `network` and `plan` as ever for a VM with at most one
    interface (null for several, as in the VM's JSON); `interfaces` for every VM (one for a
    single network, none for vsock), each with its own `plan`."""
    single = resolved.network
    return {
        "name": name,
        "network": None if single is None else single.to_json(),
        "plan": None if single is None else _single_plan(name, resolved, single).to_json(),
        "interfaces": [
            {**interface.to_json(), "plan": interface.plan.to_json()}
            for interface in resolved.interfaces
        ],
    }


def _single_plan(name: str, resolved: ResolvedInterfaces, network: EffectiveNetwork) -> NetworkPlan:
    """The plan of a single network: its interface's, or (vsock: none) the network's own."""
    from roost.plan import plan_network

    return resolved.interfaces[0].plan if resolved.interfaces else plan_network(network, name)


def _single_plan_human(name: str, manifest: Manifest, resolved: ResolvedInterfaces) -> None:
    network = resolved.network
    assert network is not None  # the single form always has one
    from roost.plan import IPAM

    net = _single_plan(name, resolved, network)
    address = network.ip or ("allocated at create" if net.ipam is IPAM.AUTO else None)
    if network.cni is not None:
        address = _decided_by(network.cni)
    fields(
        [
            ("vm", name),
            ("plugin", f"{manifest.name} {manifest.version}"),
            ("mode", f"{network.mode} (from {network.source})"),
            *(
                [("network", f"{network.network}: resolved by the daemon")]
                if network.network is not None
                else []
            ),
            ("subnet", network.subnet),
            ("gateway", network.gateway),
            ("address", address),
            ("tap", yes_no(net.tap)),
            ("ipam", net.ipam),
            ("nic", yes_no(net.nic)),
            ("vsock", yes_no(net.vsock)),
            ("kernel ip arg", net.kernel_ip_arg),
            *([("netns", f"roost-vm-{name}")] if net.netns else []),
        ]
    )


def _interfaces_plan_human(name: str, manifest: Manifest, resolved: ResolvedInterfaces) -> None:
    """A list of interfaces: one row each, in the guest's device order, then a line for each
    registered network only the daemon can resolve."""
    interfaces = resolved.interfaces
    fields(
        [
            ("vm", name),
            ("plugin", f"{manifest.name} {manifest.version}"),
            ("interfaces", f"{len(interfaces)} (from {interfaces[0].source})"),
        ]
    )
    out.print("", markup=False)
    rows = [
        (
            interface.index,
            interface.name,
            interface.mode,
            interface.cni.network if interface.cni else interface.network or interface.subnet,
            _planned_address(interface),
            interface.mac or "at create",
            yes_no(interface.default_route),
        )
        for interface in interfaces
    ]
    table(["#", "NAME", "MODE", "NETWORK/SUBNET", "IP", "MAC", "DEFAULT ROUTE"], rows)
    for interface in interfaces:
        if interface.unresolved is not None:
            out.print(interface.unresolved, markup=False)


def _decided_by(cni: CniNetwork) -> str:
    """A cni network's address before its VM starts: whatever its CNI plugins give."""
    return f"addresses decided by {cni.network}"


def _planned_address(interface: EffectiveInterface) -> str | None:
    from roost.plan import IPAM

    if interface.cni is not None:
        return _decided_by(interface.cni)
    if interface.ip is not None:
        return str(interface.ip)
    if interface.plan.observe_ip:
        return "by dhcp"
    return "at create" if interface.plan.ipam is IPAM.AUTO else None


def schemas() -> dict[str, type[BaseModel]]:
    """The models `roost schema` describes, by the name it takes."""
    from roost.spec import Manifest, VMConfig, VMConfigPatch

    return {"manifest": Manifest, "vm-config": VMConfig, "vm-patch": VMConfigPatch}


@app.command("schema")
def schema(
    kind: Annotated[str, typer.Argument(help="manifest, vm-config or vm-patch.")],
) -> None:
    """Print the JSON Schema of a manifest, a VM config or a VM config patch."""
    models = schemas()
    model = models.get(kind)
    if model is None:
        usage_error(f"unknown schema {kind!r}; use one of {', '.join(models)}")
    print_json(model.model_json_schema())
