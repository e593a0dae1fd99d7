"""Options shared by several commands, declared once so they read the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from roost.cli.files import read_json
from roost.cli.output import usage_error
from roost.errors import ErrorDetail, InvalidError

if TYPE_CHECKING:
    from roost.spec import NetworkConfig, VMConfig

# roost.spec (pydantic) is imported where a config is made: commands that make none start faster

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
NetworkPolicyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--network-policy",
        metavar="NAME",
        help=(
            "Bridged or dhcp: a stored policy to enforce on the VM's tap (repeat for each; "
            "together they replace the network's policies). roost policy list shows them."
        ),
        show_default=False,
    ),
]
LabelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        metavar="KEY=VALUE",
        help="A label of the VM (repeat for each); roost vm list --label selects by them.",
        show_default=False,
    ),
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
    policies: list[str] | None = None

    @property
    def given(self) -> bool:
        return bool(self.names)

    @property
    def names(self) -> list[str]:
        """The flags given, as written on the command line."""
        values = {
            "--network-mode": self.mode,
            "--network-subnet": self.subnet,
            "--network-gateway": self.gateway,
            "--network-auto-assign": self.auto_assign,
            "--network-ip": self.ip,
            "--network-policy": self.policies or None,
        }
        return [name for name, value in values.items() if value is not None]

    def apply(self, base: NetworkConfig | None) -> NetworkConfig | None:
        from roost.spec.network import network_override

        return network_override(
            base,
            mode=self.mode,
            subnet=self.subnet,
            gateway=self.gateway,
            auto_assign=self.auto_assign,
            ip=self.ip,
            policies=self.policies or None,
        )


def vm_config_from(
    plugin: str,
    config_file: Path | None,
    flags: NetworkFlags,
    *,
    interfaces: list[dict[str, Any]] | None = None,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    vmm: str | None = None,
    labels: dict[str, str] | None = None,
) -> VMConfig:
    """A VM config from `--config` (if any), with the command-line flags on top: the
    `--interface` list (`interfaces`) in place of the file's interfaces and network, or the
    network flags on the file's network (on its interfaces only `--network-mode`, which starts
    a fresh single network; `labels` on the file's)."""
    from roost.spec import VMConfig, parse
    from roost.spec.network import parse_network

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
    if labels:
        data["labels"] = {**(data.get("labels") or {}), **labels}
    if interfaces is not None:
        data.pop("network", None)
        data["interfaces"] = interfaces
    else:
        if flags.given and data.get("interfaces") is not None:
            refuse_field_flags_on_interfaces(flags, f"{config_file}'s config", patch=False)
            data.pop("interfaces")
        # the flags apply to the file's network as written; the result is validated once, whole
        written = data.get("network")
        network = flags.apply(None if written is None else parse_network(written))
        data["network"] = None if network is None else network.model_dump(exclude_none=True)
    return parse(VMConfig, data)


def labels_from(given: list[str] | None) -> dict[str, str]:
    """The `--label KEY=VALUE` flags as a map (a later one for a key wins); one without `=` is
    a usage error. Keys and values are judged with the config they go into."""
    labels = {}
    for text in given or []:
        key, equals, value = text.partition("=")
        if not equals:
            usage_error(f"--label {text!r}: write KEY=VALUE, e.g. --label tier=web")
        labels[key] = value
    return labels


def refuse_field_flags_on_interfaces(flags: NetworkFlags, holder: str, *, patch: bool) -> None:
    """A usage error for `--network-*` flags without `--network-mode` on a config whose
    network is a list of interfaces: there is no single network for them to change field by
    field (`--network-mode` starts a fresh one, which the other flags fill in)."""
    if flags.mode is None and flags.given:
        fields = flags.names
        verb = "changes" if len(fields) == 1 else "change"
        reset = ", or --network-reset for the plugin's default" if patch else ""
        usage_error(
            f"{', '.join(fields)} {verb} a single network field by field, but {holder} has "
            "interfaces (a list); use --interface for each interface or --network-mode to "
            f"start a fresh single-NIC network{reset}"
        )


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
