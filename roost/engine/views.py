"""The JSON the API returns for VMs, plugins and networks (the contract scripts rely on)."""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from roost.plan.ipv6 import router_address
from roost.spec import Resources, ResourcesOverride
from roost.state.models import Network, Plugin, timestamp
from roost.state.vms import (
    LIVE,
    ShownNic,
    StoredInterface,
    StoredNetwork,
    VMStatus,
    decoded,
    labels_json,
    nics_json,
)
from roost.vmm.base import RunDir, VsockBackend


def vm_view(
    vm: Mapping[Any, Any],
    *,
    run_dir: RunDir | None,
    api_socket: Path | None,
) -> dict[str, Any]:
    """A VM as the API shows it, from its `roost.state.vms.VM_ROWS` row (as a mapping).
    `api_socket` is its VMM's control socket while it runs. `run_dir` is None for a VM of
    another host (a cluster's): its files are that host's, so no path is shown, and its VMM's
    pid is the one stored while its status says a VMM runs (this agent does not follow it)."""
    vcpus, memory_mib = _resources(
        vm["config"].get("resources", {}), vm["manifest"].get("resources", {})
    )
    stored = StoredNetwork.from_json(vm["network"])
    assert stored is not None, "a VM is shown once its create has planned its network"
    nics = nics_json(vm)
    interfaces = [interface_view(one, nics.get(one.index)) for one in stored.interfaces]
    vsock_ok = vm["vsock_unavailable"] is None
    backend = vm["vsock_backend"] if vsock_ok else None
    hybrid = backend in (VsockBackend.FIRECRACKER, VsockBackend.CLOUD_HYPERVISOR, VsockBackend.USER)
    if run_dir is None:
        pid = vm["pid"] if vm["status"] in LIVE else None
    else:
        pid = vm["pid"] if api_socket else None
    return {
        "name": vm["name"],
        "plugin": vm["plugin"],
        "host": vm["host"],
        "status": vm["status"],
        "status_reason": vm["status_reason"],
        "exit_code": vm["exit_code"],
        "network": network_json(stored, interfaces),
        "interfaces": interfaces,
        "vsock": {
            "cid": vm["cid"],
            "uds_path": str(run_dir.vsock_socket) if hybrid and run_dir else None,
            "available": vsock_ok,
            "backend": backend,
            "reason": vm["vsock_unavailable"],
        },
        "resources": {"vcpus": vcpus, "memory_mib": memory_mib},
        "vmm": {
            "kind": vm["vmm_kind"],
            "pid": pid,
            "api_socket": str(api_socket) if api_socket else None,
        },
        "console_log": None if run_dir is None else str(run_dir.console_log),
        "config_version": vm["config_version"],
        "running_version": vm["running_version"],
        "restart_required": bool(vm["restart_required"]),
        "labels": labels_json(vm),
        "created_at": timestamp(vm["created_at"]),
        "updated_at": timestamp(vm["updated_at"]),
    }


UNKNOWN = "unknown"  # a VM's status while its host is offline (cluster)


def with_host_status(vm: Mapping[Any, Any], offline: Container[int]) -> Mapping[Any, Any]:
    """A VM's row as read, with status `unknown` while its host is offline (`offline`: the
    ids of the hosts whose heartbeat is late), a status computed, never stored; a lost VM
    stays `lost`."""
    if not offline or vm.get("host_id") not in offline or vm["status"] == VMStatus.LOST:
        return vm
    return {**vm, "status": UNKNOWN}


def encoded(content: Any) -> bytes:
    """`content` as JSON exactly as the API's JSON responses encode it (starlette's
    JSONResponse), so encoded pieces joined into an array are the bytes it would send."""
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


def json_array(items: Sequence[bytes]) -> bytes:
    """The JSON array of already encoded items."""
    return b"[" + b",".join(items) + b"]"


# VMs whose listed JSON is kept: a daemon is meant for up to 10,000, room for them all and as
# many removed since (about 1 KB of JSON and 2 KB of row each)
KEPT_VIEWS = 20_000


class ListedViews:
    """Each listed VM's JSON, encoded once per distinct listing row and kept by VM name.

    A VM's view is a function of its `LISTED_ROWS` row, of whether its VMM runs (`live`) and
    of the daemon's fixed settings and drivers, nothing else: so a kept view is reused only
    while the VM's whole row and liveness are equal to those it was made from, and any change
    to any column (status, pid, config, network, a NIC's address, a label) makes it anew. About
    3 KB a VM (its JSON and its row). A listing of every VM keeps only theirs (dropping removed
    VMs'); at most `bound` VMs are kept, past it all are dropped.
    """

    def __init__(
        self, view: Callable[[Mapping[str, Any], bool], dict[str, Any]], bound: int = KEPT_VIEWS
    ) -> None:
        self._view = view
        self._bound = bound
        self._kept: dict[str, tuple[tuple[Any, ...], bytes]] = {}

    def __len__(self) -> int:
        """How many VMs' JSON is kept."""
        return len(self._kept)

    def encoded(
        self,
        rows: Iterable[Any],
        live: Container[str],
        *,
        every: bool = False,
        offline: Container[int] = frozenset(),
    ) -> list[tuple[str, bytes]]:
        """Each `LISTED_ROWS` row's VM name and its view's JSON; `live` holds the names of
        the VMs whose VMM runs, `every` says the rows are every VM's, `offline` the ids of
        the hosts whose heartbeat is late (their VMs are `unknown`)."""
        kept = self._kept
        found = []
        for row in rows:
            name = row.name
            runs = name in live
            key = (*row, runs, bool(offline) and row.host_id in offline)
            hit = kept.get(name)
            if hit is not None and hit[0] == key:
                found.append((name, hit[1]))
                continue
            fragment = encoded(self._view(with_host_status(decoded(row), offline), runs))
            if len(kept) >= self._bound:
                kept.clear()
            kept[name] = (key, fragment)
            found.append((name, fragment))
        if every and len(kept) > len(found):
            listed = {name for name, _ in found}
            # list() copies at once: listings in other threads may add to `kept` meanwhile
            for name in [name for name in list(kept) if name not in listed]:
                kept.pop(name, None)
        return found


def _resources(override: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[int, int]:
    """The vCPUs and MiB a VM's config (`override`) gives it over its plugin's (`base`)."""
    return _resolved(tuple(sorted(override.items())), tuple(sorted(base.items())))


@functools.lru_cache(maxsize=1024)
def _resolved(
    override: tuple[tuple[str, Any], ...], base: tuple[tuple[str, Any], ...]
) -> tuple[int, int]:
    """Validated once per distinct pair (a plugin's VMs share a few): pydantic's models were a
    tenth of a listing's time per VM."""
    resources = ResourcesOverride.model_validate(dict(override)).apply(
        Resources.model_validate(dict(base))
    )
    return resources.vcpus, resources.memory_mib


def interface_view(interface: StoredInterface, nic: ShownNic | None) -> dict[str, Any]:
    """One interface of a VM: every field always there, null when unused (`ipv6` is
    `{"ip", "prefix", "gateway", "source"}` on a network with an IPv6 prefix), and where set its
    `policies` and `policy_defaults`, and a cni interface's `cni` and `addresses`."""
    effective, plan = interface.effective, interface.plan
    ipv6 = None
    if interface.ipv6 is not None:
        prefix = ipaddress.IPv6Network(interface.ipv6["prefix"])
        ipv6 = {
            "ip": None if nic is None else nic.ipv6,
            "prefix": str(prefix),
            "gateway": str(router_address(prefix)),
            "source": interface.ipv6["source"],
        }
    return {
        "name": interface.name,
        "mode": effective.mode.value,
        "network": effective.on_network,
        "bridge": interface.bridge if plan.tap else None,
        "tap": nic.tap if plan.tap and nic is not None else None,
        "mac": _guest_mac(interface, nic),
        "ip": None if effective.ip is None else str(effective.ip),
        "subnet": None if effective.subnet is None else str(effective.subnet),
        "gateway": None if effective.gateway is None else str(effective.gateway),
        "observed_ip": nic.observed_ip if plan.observe_ip and nic is not None else None,
        "ipv6": ipv6,
        "default_route": interface.default_route,
        **effective.policies_json(),
        **effective.cni_json(),
    }


def _guest_mac(interface: StoredInterface, nic: ShownNic | None) -> str | None:
    """The MAC its guest's NIC has: a cni interface's plugins' (taken at its last start),
    else the one roost keeps for it."""
    cni = interface.effective.cni
    if cni is not None and cni.mac is not None:
        return cni.mac
    return nic.mac if interface.plan.nic and nic is not None else None


def network_json(stored: StoredNetwork, interfaces: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The single `network` a VM with at most one interface shows, exactly as before several
    interfaces (null for a VM with several)."""
    if stored.network is None:
        return None
    only = interfaces[0] if interfaces else None
    return {
        **stored.network.to_json(),
        **{
            key: None if only is None else only[key]
            for key in ("mac", "bridge", "tap", "observed_ip")
        },
    }


def plugin_view(plugin: Plugin, vms: list[str]) -> dict[str, Any]:
    return {
        "name": plugin.name,
        "version": plugin.version,
        "manifest": plugin.manifest,
        "artifacts": {a.role: {"sha256": a.sha256, "size": a.size} for a in plugin.artifacts},
        "vms": vms,
    }


def network_view(
    network: Network, leased: Iterable[int], hosts: Mapping[int, str] | None = None
) -> dict[str, Any]:
    """A network: `kind` is on-demand, managed, external or cni; `managed` says whether roost
    owns its bridge and addresses (both roost kinds) or not (the operator's bridge, a cni
    network's plugins); `conflist` is a cni network's; `vni` and `mtu` a cluster network's
    (null on a single host). In a cluster (`hosts`: their names by id) `host` names the host
    a host-local network (external, dhcp) belongs to, null for the cluster's."""
    view = {
        "name": network.name,
        "kind": network.kind,
        "managed": network.kind in ("on-demand", "managed"),
        "bridge": network.bridge,
        "subnet": network.subnet,
        "gateway": network.gateway,
        "ipv6_prefix": network.ipv6_prefix,
        "conflist": network.conflist,
        "vni": network.vni,
        "mtu": network.mtu,
        "leases": [str(ipaddress.IPv4Address(ip)) for ip in leased],
    }
    if hosts is not None:
        view["host"] = None if network.host_id is None else hosts.get(network.host_id)
    return view
