"""Everything about one VM that follows from its plugin, its config and the daemon's defaults."""

from __future__ import annotations

from dataclasses import dataclass

from roost.plan.network import (
    DefaultNetwork,
    EffectiveNetwork,
    NetworkPlan,
    plan_network,
    resolve_network,
)
from roost.spec.common import Resources
from roost.spec.manifest import Manifest
from roost.spec.vmconfig import VMConfig


@dataclass(frozen=True)
class VMPlan:
    """A VM's resolved network, its network plan and its resources."""

    name: str
    network: EffectiveNetwork
    net: NetworkPlan
    resources: Resources


def plan_vm(name: str, manifest: Manifest, config: VMConfig, default: DefaultNetwork) -> VMPlan:
    network = resolve_network(manifest, config, default)
    return VMPlan(
        name=name,
        network=network,
        net=plan_network(network, name),
        resources=config.resources.apply(manifest.resources),
    )


def boot_args(manifest: Manifest, config: VMConfig, name: str, ip_arg: str | None) -> str:
    """The guest's command line: the plugin's, the VM's, its name, then its `ip=`."""
    parts = [manifest.boot_args, config.boot_args, f"roost.name={name}", ip_arg]
    return " ".join(part for part in parts if part)
