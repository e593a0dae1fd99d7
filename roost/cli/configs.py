"""`roost vm config`: a VM's config versions, and patches that make new ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from roost.cli.apps import config_app
from roost.cli.files import read_json
from roost.cli.interfaces import InterfaceOpt, interfaces_from
from roost.cli.options import (
    JSONOpt,
    LabelOpt,
    NetworkAutoAssignOpt,
    NetworkFlags,
    NetworkGatewayOpt,
    NetworkIPOpt,
    NetworkModeOpt,
    NetworkPolicyOpt,
    NetworkSubnetOpt,
    labels_from,
    refuse_field_flags_on_interfaces,
    with_flags,
)
from roost.cli.output import fields, out, print_json, table, usage_error
from roost.cli.reach import daemon, vm_path
from roost.cli.remote import NameArg
from roost.cli.views import interface_fields, list_columns, optional_fields, show
from roost.errors import InvalidError
from roost.names import VMMKind


def _version_human(version: dict[str, Any]) -> None:
    effective = version["effective"]
    resources = effective["resources"]
    fields(
        [
            ("version", version["version"]),
            ("created", version["created_at"]),
            *_network_fields(effective),
            ("resources", f"{resources['vcpus']} vCPU, {resources['memory_mib']} MiB"),
            ("vmm", effective["vmm"]),
            (
                "labels",
                ", ".join(f"{k}={v}" for k, v in version["config"].get("labels", {}).items())
                or None,
            ),
            ("config", _compact(version["config"])),
        ]
    )


def _network_fields(effective: dict[str, Any]) -> list[tuple[str, Any]]:
    """The resolved network of a config version: a single one (or vsock) as ever, several
    interfaces (`network` null) each in turn."""
    network = effective["network"]
    if network is None:
        interfaces = effective["interfaces"]
        return [("network", f"{len(interfaces)} interfaces"), *interface_fields(interfaces)]
    return [
        ("network", f"{network['mode']} (from {network['source']})"),
        ("subnet", network["subnet"]),
        ("gateway", network["gateway"]),
        ("ip", network["ip"]),
        *optional_fields(network),
    ]


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


@config_app.command("show")
def config_show(name: NameArg, as_json: JSONOpt = False) -> None:
    """Show a VM's latest config version and what it resolves to."""
    with daemon(as_json) as client:
        version = client.call("GET", vm_path(name, "config"))
    show(version, as_json, _version_human)


@config_app.command("history")
def config_history(name: NameArg, as_json: JSONOpt = False) -> None:
    """List a VM's config versions, newest first."""
    with daemon(as_json) as client:
        versions = client.call("GET", vm_path(name, "config/history"))

    def human(items: list[dict[str, Any]]) -> None:
        rows = []
        for item in items:
            network = item["effective"]["network"]
            resources = item["effective"]["resources"]
            if network is None:
                mode, ip, _, _ = list_columns(item["effective"]["interfaces"])
            else:
                mode, ip = network["mode"], network["ip"]
            rows.append(
                (
                    item["version"],
                    item["created_at"],
                    mode,
                    ip,
                    f"{resources['vcpus']}/{resources['memory_mib']}",
                    item["effective"]["vmm"],
                )
            )
        table(["VERSION", "CREATED", "MODE", "IP", "CPU/MIB", "VMM"], rows)

    show(versions, as_json, human)


def patch_body(
    stored_network: dict[str, Any] | None,
    document: dict[str, Any] | None,
    flags: NetworkFlags,
    *,
    reset_network: bool,
    stored_interfaces: list[dict[str, Any]] | None = None,
    interfaces: list[dict[str, Any]] | None = None,
    vm_name: str = "the VM",
    vcpus: int | None = None,
    memory_mib: int | None = None,
    vmm: str | None = None,
    labels: dict[str, str] | None = None,
    removed_labels: list[str] | None = None,
) -> dict[str, Any]:
    """A patch from `--file`'s document and the flags. `--network-reset` clears the network
    and interfaces (back to the plugin's), `--interface` (`interfaces`) replaces them by its
    list. The network flags start from the document's `network` or `interfaces` when it has
    either, else from the VM's stored override, and change a network field by field
    (`--network-mode` starts afresh, and is the only one for a base of interfaces) — as
    `vm plan` and `vm create` do. `--label` sets labels and `--remove-label` removes them
    (sent as a merge: only those keys change, so a concurrent patch of other labels stays),
    added to the document's label changes."""
    from roost.spec import VMConfigPatch, parse
    from roost.spec.network import parse_network

    body = dict(document or {})
    if labels or removed_labels:
        removed: dict[str, str | None] = dict.fromkeys(removed_labels or [])
        body["labels"] = {**(body.get("labels") or {}), **(labels or {}), **removed}
    if reset_network:
        body.pop("interfaces", None)
        body["network"] = None
    elif interfaces is not None:
        body.pop("network", None)
        body["interfaces"] = interfaces
    elif flags.given:
        written, written_interfaces, holder = _network_base(
            body, stored_network, stored_interfaces, vm_name
        )
        if written_interfaces is not None:
            refuse_field_flags_on_interfaces(flags, holder, patch=True)
            written = None
            body.pop("interfaces", None)
        network = flags.apply(None if written is None else parse_network(written))
        body["network"] = None if network is None else network.model_dump(exclude_none=True)
    with_flags(body, vcpus=vcpus, memory_mib=memory_mib, vmm=vmm)
    parse(VMConfigPatch, body)  # judged here too, so a bad flag fails before any request
    return body


def _network_base(
    body: dict[str, Any],
    stored_network: dict[str, Any] | None,
    stored_interfaces: list[dict[str, Any]] | None,
    vm_name: str,
) -> tuple[Any, Any, str]:
    """What the network flags change: the document's network or interfaces (as written),
    else the VM's stored ones; and whose they are, for an error."""
    if "network" in body:
        return body["network"], None, "the --file patch"
    if "interfaces" in body:
        return None, body["interfaces"], "the --file patch"
    return stored_network, stored_interfaces, f"VM {vm_name}'s config"


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str]]:
    """What a new version changed, field by field (`network.ip: 10.0.0.2 -> 10.0.0.9`, an
    interface's by its index: `interfaces.1.ip`)."""

    def flat(data: dict[Any, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):  # an empty one holds nothing to tell
                items.update(flat(value, f"{prefix}{key}."))
            elif isinstance(value, list) and value:  # interfaces: `interfaces.1.ip`
                items.update(flat(dict(enumerate(value)), f"{prefix}{key}."))
            else:
                items[f"{prefix}{key}"] = value
        return items

    old = flat({"config": before["config"], "effective": before["effective"]})
    new = flat({"config": after["config"], "effective": after["effective"]})
    return [
        (key, f"{_shown(old.get(key))} -> {_shown(new.get(key))}")
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _shown(value: Any) -> str:
    return "-" if value is None else str(value)


@config_app.command("patch")
def config_patch(
    name: NameArg,
    vcpus: Annotated[int | None, typer.Option("--vcpus", help="vCPUs.")] = None,
    memory: Annotated[int | None, typer.Option("--memory", help="Memory (MiB).")] = None,
    vmm: Annotated[VMMKind | None, typer.Option("--vmm", help="The VMM to run it.")] = None,
    network_mode: NetworkModeOpt = None,
    network_subnet: NetworkSubnetOpt = None,
    network_gateway: NetworkGatewayOpt = None,
    network_auto_assign: NetworkAutoAssignOpt = None,
    network_ip: NetworkIPOpt = None,
    network_policy: NetworkPolicyOpt = None,
    network_reset: Annotated[
        bool,
        typer.Option(
            "--network-reset",
            help="Back to the plugin's network: clears the VM's network and interfaces.",
        ),
    ] = False,
    interface: InterfaceOpt = None,
    label: LabelOpt = None,
    remove_label: Annotated[
        list[str] | None,
        typer.Option(
            "--remove-label",
            metavar="KEY",
            help="Remove the VM's label KEY (repeat for each).",
            show_default=False,
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="A patch document (a VM config patch, JSON)."),
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Apply at once: restart the VM if it must.")
    ] = False,
    as_json: JSONOpt = False,
) -> None:
    """Change a VM's config: a new version, applied at its next start.

    Network flags change the VM's stored network override (or --file's) field by field;
    --network-mode starts a fresh override from the flags given. On a VM with interfaces
    only --network-mode (a fresh single NIC) and --network-reset apply; --interface
    replaces the whole list.
    """
    flags = NetworkFlags(
        network_mode,
        network_subnet,
        network_gateway,
        network_auto_assign,
        network_ip,
        network_policy,
    )
    if network_reset and flags.given:
        usage_error("--network-reset cannot be combined with --network-* flags")
    if network_reset and interface:
        usage_error(
            "--network-reset cannot be combined with --interface: --network-reset returns to "
            "the plugin's network, --interface sets the VM's own interfaces; use one"
        )
    interfaces = interfaces_from(interface, flags)
    with daemon(as_json) as client:
        document = None
        if file is not None:
            document = read_json(file)
            if not isinstance(document, dict):
                raise InvalidError.at("-", f"{file} must hold a JSON object (a VM config patch)")
        before = client.call("GET", vm_path(name, "config"))
        body = patch_body(
            before["config"].get("network"),
            document,
            flags,
            reset_network=network_reset,
            stored_interfaces=before["config"].get("interfaces"),
            interfaces=interfaces,
            vm_name=name,
            vcpus=vcpus,
            memory_mib=memory,
            vmm=vmm.value if vmm is not None else None,
            labels=labels_from(label),
            removed_labels=remove_label,
        )
        after = client.call(
            "PATCH", vm_path(name, "config"), body=body, restart="true" if restart else None
        )
        vm = client.call("GET", vm_path(name))
    if as_json:
        print_json(after)
        return
    if after["version"] == before["version"]:
        out.print(f"VM {name}: nothing changed (config version {after['version']})", markup=False)
        return
    out.print(
        f"VM {name}: config version {after['version']} (was {before['version']})", markup=False
    )
    fields(changes(before, after))
    if vm["restart_required"]:
        out.print(
            f"restart required: VM {name} runs version {vm['running_version']}; "
            f"roost vm restart {name} applies version {after['version']}",
            markup=False,
        )
