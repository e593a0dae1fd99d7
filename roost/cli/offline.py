"""Commands that need no daemon: validate, plan, schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from roost.cli.apps import app, plugin_app, vm_app
from roost.cli.files import manifest_problems, read_manifest
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
from roost.cli.output import err, fields, out, print_json, reporting, yes_no
from roost.errors import ExitCode, InvalidError
from roost.plan import IPAM, DefaultNetwork, plan_vm
from roost.plan.network import DEFAULT_SUBNET
from roost.spec import Manifest, VMConfig, VMConfigPatch
from roost.spec.common import check_name


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
    as_json: JSONOpt = False,
) -> None:
    """Show, offline, the network a VM would get and what roost would set up for it."""
    with reporting(as_json):
        check_name(name)
        try:
            manifest = read_manifest(plugin)
        except InvalidError as error:
            raise InvalidError(f"{plugin} is not a valid plugin manifest", error.details) from None
        flags = NetworkFlags(
            network_mode, network_subnet, network_gateway, network_auto_assign, network_ip
        )
        vm_config = vm_config_from(manifest.name, config, flags)
        result = plan_vm(name, manifest, vm_config, DefaultNetwork.from_cidr(default_subnet))
    if as_json:
        print_json(
            {"name": name, "network": result.network.to_json(), "plan": result.net.to_json()}
        )
        return
    network, net = result.network, result.net
    address = network.ip or ("allocated at create" if net.ipam is IPAM.AUTO else None)
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
        ]
    )


SCHEMAS: dict[str, type[Manifest] | type[VMConfig] | type[VMConfigPatch]] = {
    "manifest": Manifest,
    "vm-config": VMConfig,
    "vm-patch": VMConfigPatch,
}


@app.command("schema")
def schema(
    kind: Annotated[str, typer.Argument(help="manifest, vm-config or vm-patch.")],
) -> None:
    """Print the JSON Schema of a manifest, a VM config or a VM config patch."""
    model = SCHEMAS.get(kind)
    if model is None:
        err.print(f"error: unknown schema {kind!r}; use one of {', '.join(SCHEMAS)}")
        raise typer.Exit(ExitCode.USAGE)
    print_json(model.model_json_schema())
