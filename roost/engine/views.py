"""The JSON the API returns for VMs, plugins and networks (the contract scripts rely on)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from roost.spec import Resources, ResourcesOverride
from roost.state.models import Network, Plugin, timestamp
from roost.state.vms import StoredNetwork
from roost.vmm.base import RunDir, VsockBackend


def vm_view(
    vm: Mapping[Any, Any],
    *,
    run_dir: RunDir,
    api_socket: Path | None,
) -> dict[str, Any]:
    """A VM as the API shows it, from its `roost.state.vms.VM_ROWS` row (as a mapping).
    `api_socket` is its VMM's control socket while it runs."""
    resources = ResourcesOverride.model_validate(vm["config"].get("resources", {})).apply(
        Resources.model_validate(vm["manifest"].get("resources", {}))
    )
    stored = StoredNetwork.from_json(vm["network"])
    assert stored is not None, "a VM is shown once its create has planned its network"
    plan = stored.plan
    vsock_ok = plan.vsock and vm["vsock_unavailable"] is None
    backend = vm["vsock_backend"] if vsock_ok else None
    hybrid = backend in (VsockBackend.FIRECRACKER, VsockBackend.CLOUD_HYPERVISOR, VsockBackend.USER)
    return {
        "name": vm["name"],
        "plugin": vm["plugin"],
        "status": vm["status"],
        "status_reason": vm["status_reason"],
        "exit_code": vm["exit_code"],
        "network": {
            **stored.effective.to_json(),
            "mac": vm["mac"] if plan.nic else None,
            "bridge": stored.bridge if plan.tap else None,
            "tap": vm["tap"] if plan.tap else None,
            "observed_ip": vm["observed_ip"] if plan.observe_ip else None,
        },
        "vsock": {
            "cid": vm["cid"],
            "uds_path": str(run_dir.vsock_socket) if hybrid else None,
            "available": vsock_ok,
            "backend": backend,
            "reason": vm["vsock_unavailable"],
        },
        "resources": {"vcpus": resources.vcpus, "memory_mib": resources.memory_mib},
        "vmm": {
            "kind": vm["vmm_kind"],
            "pid": vm["pid"] if api_socket else None,
            "api_socket": str(api_socket) if api_socket else None,
        },
        "console_log": str(run_dir.console_log),
        "config_version": vm["config_version"],
        "running_version": vm["running_version"],
        "restart_required": bool(vm["restart_required"]),
        "created_at": timestamp(vm["created_at"]),
        "updated_at": timestamp(vm["updated_at"]),
    }


def plugin_view(plugin: Plugin, vms: list[str]) -> dict[str, Any]:
    return {
        "name": plugin.name,
        "version": plugin.version,
        "manifest": plugin.manifest,
        "artifacts": {a.role: {"sha256": a.sha256, "size": a.size} for a in plugin.artifacts},
        "vms": vms,
    }


def network_view(network: Network, leased: Iterable[int]) -> dict[str, Any]:
    """A network: `kind` is on-demand, managed or external; `managed` says whether roost owns
    its bridge and addresses (both roost kinds) or the operator does (external)."""
    return {
        "name": network.name,
        "kind": network.kind,
        "managed": network.kind != "external",
        "bridge": network.bridge,
        "subnet": network.subnet,
        "gateway": network.gateway,
        "ipv6_prefix": network.ipv6_prefix,
        "leases": [str(ipaddress.IPv4Address(ip)) for ip in leased],
    }
