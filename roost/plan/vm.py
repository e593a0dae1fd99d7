"""Everything about one VM that follows from its plugin, its config and the daemon's defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from roost.plan.interfaces import ResolvedInterfaces, resolve_interfaces
from roost.plan.network import DefaultNetwork, EffectiveNetwork, NetworkPlan, plan_network
from roost.plan.registry import NetworkLookup
from roost.spec.common import Resources
from roost.spec.manifest import Manifest
from roost.spec.network import NetworkMode
from roost.spec.vmconfig import VMConfig


@dataclass(frozen=True)
class VMPlan:
    """A VM's resolved interfaces (its `network`, for the single form and vsock, among them)
    and its resources."""

    name: str
    interfaces: ResolvedInterfaces
    resources: Resources

    @property
    def network(self) -> EffectiveNetwork:
        """The network of a VM with at most one interface (not one with several)."""
        network = self.interfaces.network
        assert network is not None, f"VM {self.name} has several interfaces, not one network"
        return network

    @property
    def net(self) -> NetworkPlan:
        """The plan of `network` (a vsock VM's: no tap, no NIC)."""
        found = self.interfaces.interfaces
        return found[0].plan if found else plan_network(self.network, self.name)


def plan_vm(
    name: str,
    manifest: Manifest,
    config: VMConfig,
    default: DefaultNetwork,
    lookup: NetworkLookup | None = None,
) -> VMPlan:
    """The VM's plan; `lookup` finds the networks its config names (None offline: a named
    network is then left for the daemon to resolve)."""
    return VMPlan(
        name=name,
        interfaces=resolve_interfaces(manifest, config, default, lookup, vm_name=name),
        resources=config.resources.apply(manifest.resources),
    )


def boot_args(manifest: Manifest, config: VMConfig, name: str, network_args: str | None) -> str:
    """The guest's command line: the plugin's, the VM's, its name, then its network's (the
    single form's `ip=`, or the `roost.nic=` arguments of a list of interfaces)."""
    parts = [manifest.boot_args, config.boot_args, f"roost.name={name}", network_args]
    return " ".join(part for part in parts if part)


def effective_json(
    plan: VMPlan,
    network: EffectiveNetwork | None,
    vmm: str,
    interfaces: ResolvedInterfaces | None = None,
) -> dict[str, Any]:
    """What a config version resolves to, as the API shows it: its network (`network` is the
    plan's, with the address allocated or reserved for it; None for several interfaces),
    resources and VMM, and with `interfaces` (as allocated) the list of them."""
    data: dict[str, Any] = {
        "network": None if network is None else network.to_json(),
        "resources": {"vcpus": plan.resources.vcpus, "memory_mib": plan.resources.memory_mib},
        "vmm": vmm,
    }
    if interfaces is not None:
        data["interfaces"] = interfaces.to_json()
    return data


def needs_restart(
    before: dict[str, Any],
    before_config: dict[str, Any],
    after: dict[str, Any],
    after_config: dict[str, Any],
) -> bool:
    """Whether a VMM running version `before` must restart to run `after` (both as
    `effective_json` with their interfaces, and their configs): what the VMM, each tap and its
    rules, the guest's command line and the vsock services listened for while it runs are made
    from counts;
    labels, where a network was written, whether an address was picked or pinned, a tap's
    policies (applied to a live tap at once) and a CNI result (made at each start) do not."""

    def what_boots(effective: dict[str, Any], config: dict[str, Any]) -> tuple[Any, ...]:
        # per interface; a named network: its bridge; the MAC a guest's NIC gets
        keys = (
            "name",
            "mode",
            "subnet",
            "gateway",
            "ip",
            "network",
            "mac",
            "ipv6",
            "default_route",
        )
        addressing = tuple(
            (*(_boots_with(interface, key) for key in keys), _cni_attached(interface.get("cni")))
            for interface in effective["interfaces"]
        )
        return (
            addressing,
            config.get("interfaces") is not None,  # roost.nic= rather than the classic ip=
            effective["resources"],
            effective["vmm"],
            config.get("boot_args"),
            config.get("vsock_services") or None,
        )

    return what_boots(before, before_config) != what_boots(after, after_config)


def _boots_with(interface: dict[str, Any], key: str) -> Any:
    """An interface's field as its VMM boots with it; a cni interface's MAC is its plugins',
    taken at each start, never the version's."""
    if key == "mac" and interface.get("mode") == NetworkMode.CNI:
        return None
    return interface.get(key)


def _cni_attached(cni: dict[str, Any] | None) -> str | None:
    """What a cni interface is attached with (its network and what its plugins are given), not
    what ADD answered at a start."""
    if cni is None:
        return None
    given = {key: cni.get(key) for key in ("network", "args", "capability_args")}
    return json.dumps(given, sort_keys=True)
