"""How a VM reads for people: `vm show`'s fields (and each interface's), `vm list`'s columns
for several interfaces. No Typer here, so that roost.cli.fast can show a VM without it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from roost.cli.output import fields, print_json, yes_no
from roost.cli.reach import daemon, vm_path


def show(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        print_json(data)
    else:
        human(data)


def show_vm(name: str, as_json: bool) -> None:
    """`roost vm show NAME`: the VM as the daemon has it, as JSON or fields."""
    with daemon(as_json) as client:
        vm = client.call("GET", vm_path(name))
    show(vm, as_json, vm_human)


def vm_human(vm: dict[str, Any]) -> None:
    network, vsock, vmm = vm["network"], vm["vsock"], vm["vmm"]
    status = vm["status"]
    if vm["status_reason"]:
        status += f" ({vm['status_reason']})"
    fields(
        [
            ("name", vm["name"]),
            ("plugin", vm["plugin"]),
            *([("host", vm["host"])] if vm.get("host") else []),  # a cluster's
            ("status", status),
            ("exit code", vm["exit_code"]),
            *network_fields(network, vm.get("interfaces") or []),
            ("vsock cid", vsock["cid"]),
            ("vsock socket", vsock["uds_path"] or _no_socket(vm)),
            ("resources", f"{vm['resources']['vcpus']} vCPU, {vm['resources']['memory_mib']} MiB"),
            ("vmm", f"{vmm['kind']} pid {vmm['pid']}" if vmm["pid"] else vmm["kind"]),
            ("api socket", vmm["api_socket"]),
            ("console", vm["console_log"]),
            ("config version", vm["config_version"]),
            ("running version", vm["running_version"]),
            ("restart required", yes_no(vm["restart_required"])),
            ("labels", ", ".join(f"{k}={v}" for k, v in vm.get("labels", {}).items()) or None),
            ("created", vm["created_at"]),
        ]
    )


def _no_socket(vm: dict[str, Any]) -> str:
    """Why `vm` shows no vsock socket: its device has none here, or it lives on another
    host (a cluster's VM shown by a peer: its files are that host's)."""
    reason = vm["vsock"]["reason"]
    if reason is None and vm.get("host"):
        return f"on host {vm['host']}"
    return f"none: {reason}"


def network_fields(
    network: dict[str, Any] | None, interfaces: list[dict[str, Any]]
) -> list[tuple[str, Any]]:
    """A VM's network: a single one (or vsock) as ever, with its IPv6 address where it has
    one; several interfaces (`network` null) each in turn."""
    if network is None:
        return [("network", f"{len(interfaces)} interfaces"), *interface_fields(interfaces)]
    ipv6 = interfaces[0].get("ipv6") if interfaces else None
    return [
        ("network", f"{network['mode']} (from {network['source']})"),
        ("subnet", network["subnet"]),
        ("gateway", network["gateway"]),
        ("ip", network["ip"]),
        *([("ipv6", ipv6_text(ipv6))] if ipv6 else []),
        ("mac", network["mac"]),
        ("bridge", network["bridge"]),
        ("tap", network["tap"]),
        ("observed ip", network["observed_ip"]),
        *optional_fields(network),
    ]


def address(interface: dict[str, Any]) -> Any:
    """An interface's IPv4 address: its own, else the one the host saw the guest take, else
    (cni) the first its CNI plugins gave."""
    given = interface.get("addresses") or [None]
    first = None if given[0] is None else str(given[0]).partition("/")[0]
    return interface.get("ip") or interface.get("observed_ip") or first


def list_columns(interfaces: Sequence[dict[str, Any]]) -> tuple[str, Any, Any, Any]:
    """`vm list`'s MODE, IP, MAC and TAP for a VM with several interfaces: the modes joined by
    '+', and the address, MAC and tap of the first interface that has an address (else of the
    first)."""
    shown = next((i for i in interfaces if address(i)), interfaces[0] if interfaces else {})
    modes = "+".join(interface["mode"] for interface in interfaces) or "vsock"
    return modes, address(shown), shown.get("mac"), shown.get("tap")


def ipv6_text(ipv6: dict[str, Any] | None) -> str | None:
    if ipv6 is None:
        return None
    ip = ipv6["ip"] or "picked with the MAC"
    return f"{ip} ({ipv6['source']}, prefix {ipv6['prefix']}, gateway {ipv6['gateway']})"


def interface_fields(interfaces: Sequence[dict[str, Any]]) -> list[tuple[str, Any]]:
    """`vm show`'s rows for each interface: a heading row, then its fields indented."""
    rows: list[tuple[str, Any]] = []
    for index, interface in enumerate(interfaces):
        heading = f"{interface['name']}, {interface['mode']}"
        if interface.get("default_route"):
            heading += ", default route"
        rows += [
            (f"interface {index}", heading),
            ("  network", interface.get("network")),
            ("  subnet", interface.get("subnet")),
            ("  gateway", interface.get("gateway")),
            ("  ip", interface.get("ip")),
            ("  observed ip", interface.get("observed_ip")),
            ("  ipv6", ipv6_text(interface.get("ipv6"))),
            ("  mac", interface.get("mac")),
            ("  bridge", interface.get("bridge")),
            ("  tap", interface.get("tap")),
            *optional_fields(interface, "  "),
        ]
    return rows


def optional_fields(network: dict[str, Any], indent: str = "") -> list[tuple[str, Any]]:
    """The rows of what only some networks have (a cni network's, policies), where set."""
    rows: list[tuple[str, Any]] = []
    cni = network.get("cni")
    if cni is not None:
        addresses = network.get("addresses")
        rows += [
            (f"{indent}cni network", cni["network"]),
            (f"{indent}addresses", "at start" if addresses is None else ", ".join(addresses)),
        ]
    if network.get("policies"):
        rows.append((f"{indent}policies", ", ".join(network["policies"])))
    defaults = network.get("policy_defaults")
    if defaults is not None:
        text = f"ingress {defaults['ingress']}, egress {defaults['egress']}"
        rows.append((f"{indent}policy defaults", text))
    return rows
