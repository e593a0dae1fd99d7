"""Everything about one VM that follows from its plugin, its config and the daemon's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from roost.plan.network import (
    DefaultNetwork,
    EffectiveNetwork,
    NetworkPlan,
    plan_network,
    resolve_network,
)
from roost.plan.registry import NetworkLookup
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


def plan_vm(
    name: str,
    manifest: Manifest,
    config: VMConfig,
    default: DefaultNetwork,
    lookup: NetworkLookup | None = None,
) -> VMPlan:
    """The VM's plan; `lookup` finds the networks its config names (None offline: a named
    network is then left for the daemon to resolve)."""
    network = resolve_network(manifest, config, default, lookup)
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


def effective_json(plan: VMPlan, network: EffectiveNetwork, vmm: str) -> dict[str, Any]:
    """What a config version resolves to, as the API shows it: its network (`network` is the
    plan's, with the address allocated or reserved for it), resources and VMM."""
    return {
        "network": network.to_json(),
        "resources": {"vcpus": plan.resources.vcpus, "memory_mib": plan.resources.memory_mib},
        "vmm": vmm,
    }


def needs_restart(
    before: dict[str, Any],
    before_config: dict[str, Any],
    after: dict[str, Any],
    after_config: dict[str, Any],
) -> bool:
    """Whether a VMM running version `before` must restart to run `after` (both as
    `effective_json` and their configs): what the VMM, the tap and its rules, the guest's
    command line and the vsock services listened for while it runs are made from counts;
    labels, where a network was written, and whether an address was picked or pinned do not."""

    def what_boots(effective: dict[str, Any], config: dict[str, Any]) -> tuple[Any, ...]:
        network = effective["network"]
        keys = ("mode", "subnet", "gateway", "ip", "network")  # a named network: its bridge
        addressing = tuple(network.get(key) for key in keys)
        return (
            addressing,
            effective["resources"],
            effective["vmm"],
            config.get("boot_args"),
            config.get("vsock_services") or None,
        )

    return what_boots(before, before_config) != what_boots(after, after_config)
