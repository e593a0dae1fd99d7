"""Options shared by several commands, declared once so they read the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from roost.cli.files import read_json
from roost.errors import ErrorDetail, InvalidError
from roost.spec import NetworkConfig, VMConfig, parse
from roost.spec.network import network_override, parse_network

JSONOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
NetworkModeOpt = Annotated[
    str | None,
    typer.Option(
        "--network-mode",
        help="vsock, bridged or dhcp; starts a fresh network override from the flags given.",
    ),
]
NetworkSubnetOpt = Annotated[
    str | None, typer.Option("--network-subnet", help="Bridged: the VM's subnet (CIDR).")
]
NetworkGatewayOpt = Annotated[
    str | None, typer.Option("--network-gateway", help="Bridged: the subnet's gateway.")
]
NetworkAutoAssignOpt = Annotated[
    bool | None,
    typer.Option(
        "--network-auto-assign/--no-network-auto-assign",
        help="Bridged: let roost pick the VM's address from the subnet.",
        show_default=False,
    ),
]
NetworkIPOpt = Annotated[
    str | None, typer.Option("--network-ip", help="Bridged: the VM's own address.")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="A VM config JSON file; flags override its fields."),
]


@dataclass(frozen=True)
class NetworkFlags:
    mode: str | None
    subnet: str | None
    gateway: str | None
    auto_assign: bool | None
    ip: str | None

    @property
    def given(self) -> bool:
        return any(
            value is not None
            for value in (self.mode, self.subnet, self.gateway, self.auto_assign, self.ip)
        )

    def apply(self, base: NetworkConfig | None) -> NetworkConfig | None:
        return network_override(
            base,
            mode=self.mode,
            subnet=self.subnet,
            gateway=self.gateway,
            auto_assign=self.auto_assign,
            ip=self.ip,
        )


def vm_config_from(
    plugin: str,
    config_file: Path | None,
    flags: NetworkFlags,
    *,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    vmm: str | None = None,
) -> VMConfig:
    """A VM config from `--config` (if any), with the command-line flags on top."""
    data = read_json(config_file) if config_file is not None else {}
    if not isinstance(data, dict):
        raise InvalidError.at("-", f"{config_file} must hold a JSON object (a VM config)")
    named = data.setdefault("plugin", plugin)
    if named != plugin:
        raise InvalidError(
            f"{config_file} is a config for plugin {named!r}, not {plugin!r}",
            [ErrorDetail("plugin", f"is {named!r}, but the command names plugin {plugin!r}")],
        )
    with_flags(data, vcpus=vcpus, memory_mib=memory_mib, vmm=vmm)
    # the flags apply to the file's network as written; the result is validated once, whole
    written = data.get("network")
    network = flags.apply(None if written is None else parse_network(written))
    data["network"] = None if network is None else network.model_dump(exclude_none=True)
    return parse(VMConfig, data)


def with_flags(
    data: dict[str, Any], *, vcpus: int | None, memory_mib: int | None, vmm: str | None
) -> None:
    """Put the resource and VMM flags into a config or patch document (resources per field)."""
    resources = dict(data.get("resources") or {})
    if vcpus is not None:
        resources["vcpus"] = vcpus
    if memory_mib is not None:
        resources["memory_mib"] = memory_mib
    if resources:
        data["resources"] = resources
    if vmm is not None:
        data["vmm"] = vmm
