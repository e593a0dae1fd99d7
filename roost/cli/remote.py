"""Commands that talk to the daemon: plugins, VMs, networks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from roost.cli.apps import network_app, plugin_app, vm_app
from roost.cli.files import read_manifest, with_resolved_artifacts
from roost.cli.interfaces import InterfaceOpt, interfaces_from
from roost.cli.options import (
    ConfigOpt,
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
    vm_config_from,
)
from roost.cli.output import err, fields, print_json, table, usage_error
from roost.cli.reach import daemon, vm_path
from roost.cli.views import address, list_columns, show, show_vm, vm_human
from roost.errors import InvalidError
from roost.names import VMMKind, check_name

NameArg = Annotated[str, typer.Argument(help="The VM's name.")]


def plugin_path(name: str) -> str:
    return f"/v1/plugins/{check_name(name)}"


# ---- plugins --------------------------------------------------------------------------------


def _plugin_human(plugin: dict[str, Any]) -> None:
    manifest = plugin["manifest"]
    network = manifest.get("network") or {"mode": "(daemon default)"}
    interfaces = manifest.get("interfaces")
    pairs: list[tuple[str, Any]] = [
        ("name", plugin["name"]),
        ("version", plugin["version"]),
        ("description", manifest.get("description")),
        *(
            [("network", ", ".join(f"{k}={v}" for k, v in network.items()))]
            if interfaces is None
            else [("interfaces", "; ".join(_written(i) for i in interfaces) or "none (vsock)")]
        ),
        ("allowed modes", ", ".join(manifest.get("allowed_network_modes") or []) or "any"),
    ]
    for role, artifact in plugin["artifacts"].items():
        pairs.append((role, f"sha256:{artifact['sha256'][:16]}… ({artifact['size']} bytes)"))
    pairs.append(("vms", ", ".join(plugin["vms"]) or None))
    fields(pairs)


def _written(interface: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in interface.items())


@plugin_app.command("install")
def plugin_install(
    file: Annotated[Path, typer.Argument(help="The plugin's manifest.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an installed plugin.")] = False,
    as_json: JSONOpt = False,
) -> None:
    """Install a plugin: the daemon stores its artifacts (checking sha256s)."""
    with daemon(as_json) as client:
        try:
            manifest = with_resolved_artifacts(read_manifest(file), file)
        except InvalidError as error:
            raise InvalidError(f"{file} is not a valid plugin manifest", error.details) from None
        body = manifest.model_dump(mode="json", exclude_none=True)
        with _TransferProgress(quiet=as_json) as progress:
            plugin = client.stream(
                "POST",
                "/v1/plugins",
                body=body,
                on_event=progress.update,
                force=force or None,
            )
    show(plugin, as_json, _plugin_human)


class _TransferProgress:
    """Progress bars (on stderr) for the artifacts a daemon stores."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err.console,
            disable=quiet,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _TransferProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self._progress.__exit__(*args)

    def update(self, event: dict[str, Any]) -> None:
        role = event.get("role", "?")
        if event.get("event") == "artifact":
            self._tasks[role] = self._progress.add_task(f"{role:<9}", total=None)
        elif event.get("event") == "progress" and role in self._tasks:
            self._progress.update(self._tasks[role], completed=event["done"], total=event["total"])


@plugin_app.command("list")
def plugin_list(as_json: JSONOpt = False) -> None:
    """List installed plugins."""
    with daemon(as_json) as client:
        plugins = client.call("GET", "/v1/plugins")

    def human(items: list[dict[str, Any]]) -> None:
        rows = [
            (p["name"], p["version"], _plugin_network(p["manifest"]), len(p["vms"])) for p in items
        ]
        table(["NAME", "VERSION", "NETWORK", "VMS"], rows)

    show(plugins, as_json, human)


def _plugin_network(manifest: dict[str, Any]) -> str:
    """A plugin's default network mode; for a list of interfaces their modes joined by '+'."""
    interfaces = manifest.get("interfaces")
    if interfaces is not None:
        return "+".join(interface["mode"] for interface in interfaces) or "vsock"
    return str((manifest.get("network") or {}).get("mode", "default"))


@plugin_app.command("show")
def plugin_show(name: Annotated[str, typer.Argument()], as_json: JSONOpt = False) -> None:
    """Show one plugin."""
    with daemon(as_json) as client:
        plugin = client.call("GET", plugin_path(name))
    show(plugin, as_json, _plugin_human)


@plugin_app.command("rm")
def plugin_rm(name: Annotated[str, typer.Argument()], as_json: JSONOpt = False) -> None:
    """Remove a plugin no VM uses."""
    with daemon(as_json) as client:
        client.call("DELETE", plugin_path(name))
    if as_json:
        print_json({"removed": name})
    else:
        err.print(f"removed plugin {name}", markup=False)


# ---- VMs ------------------------------------------------------------------------------------

VM_COLUMNS = ["NAME", "PLUGIN", "STATUS", "MODE", "IP", "MAC", "TAP", "CID", "VMM", "PID"]


RESTART_MARK = "*"


def _vm_row(vm: dict[str, Any], *, host: bool = False) -> list[Any]:
    """`vm`'s cells under VM_COLUMNS, with its host's after its name if `host`."""
    network = vm["network"]
    if network is None:  # several interfaces
        mode, ip, mac, tap = list_columns(vm["interfaces"])
    else:
        mode, ip, mac, tap = (
            network["mode"],
            address(network),
            network["mac"],
            network["tap"],
        )
    return [
        vm["name"],
        *([vm.get("host")] if host else []),
        vm["plugin"],
        vm["status"] + (RESTART_MARK if vm["restart_required"] else ""),
        mode,
        ip,
        mac,
        tap,
        vm["vsock"]["cid"],
        vm["vmm"]["kind"],
        vm["vmm"]["pid"],
    ]


def vm_table(vms: list[dict[str, Any]]) -> None:
    """`vm list`'s table: with a HOST column after NAME only in a cluster (when any VM listed
    has a host)."""
    if any(vm.get("host") is not None for vm in vms):
        table(["NAME", "HOST", *VM_COLUMNS[1:]], [_vm_row(vm, host=True) for vm in vms])
    else:
        table(VM_COLUMNS, [_vm_row(vm) for vm in vms])


@vm_app.command("create")
def vm_create(
    name: NameArg,
    plugin: Annotated[str, typer.Option("--plugin", help="The installed plugin to run.")],
    vcpus: Annotated[
        int | None, typer.Option("--vcpus", help="Override the plugin's vCPUs.")
    ] = None,
    memory: Annotated[
        int | None, typer.Option("--memory", help="Override the plugin's memory (MiB).")
    ] = None,
    network_mode: NetworkModeOpt = None,
    network_subnet: NetworkSubnetOpt = None,
    network_gateway: NetworkGatewayOpt = None,
    network_auto_assign: NetworkAutoAssignOpt = None,
    network_ip: NetworkIPOpt = None,
    network_policy: NetworkPolicyOpt = None,
    interface: InterfaceOpt = None,
    config: ConfigOpt = None,
    label: LabelOpt = None,
    no_start: Annotated[
        bool, typer.Option("--no-start", help="Create and allocate, but do not boot.")
    ] = False,
    vmm: Annotated[
        VMMKind | None, typer.Option("--vmm", help="The VMM for this VM (default: the daemon's).")
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            "--host", help="The host to create it on (a cluster's; default: placement chooses)."
        ),
    ] = None,
    host_label: Annotated[
        list[str] | None,
        typer.Option(
            "--host-label",
            metavar="KEY=VALUE",
            help="A label its host must have (a cluster's; repeat for each).",
            show_default=False,
        ),
    ] = None,
    as_json: JSONOpt = False,
) -> None:
    """Create a VM from an installed plugin (and start it, unless --no-start); in a cluster
    on the host placement chooses, among those --host and --host-label allow."""
    flags = NetworkFlags(
        network_mode,
        network_subnet,
        network_gateway,
        network_auto_assign,
        network_ip,
        network_policy,
    )
    interfaces = interfaces_from(interface, flags)
    with daemon(as_json) as client:
        vm_config = vm_config_from(
            plugin,
            config,
            flags,
            interfaces=interfaces,
            vcpus=vcpus,
            memory_mib=memory,
            vmm=vmm,
            labels=labels_from(label),
        )
        body = {
            "name": name,
            "start": not no_start,
            **vm_config.model_dump(mode="json", exclude_none=True),
        }
        if host is not None:
            body["host"] = host
        if host_label:
            body["host_labels"] = _host_labels_from(host_label)
        vm = client.call("POST", "/v1/vms", body=body)
    _warn_about_vsock(vm)
    show(vm, as_json, vm_human)


def _host_labels_from(given: list[str]) -> dict[str, str]:
    """The `--host-label KEY=VALUE` flags as a map (a later one for a key wins)."""
    labels = {}
    for text in given:
        key, equals, value = text.partition("=")
        if not equals:
            usage_error(f"--host-label {text!r}: write KEY=VALUE, e.g. --host-label zone=a")
        labels[key] = value
    return labels


# VMs asked for per request: 10,000 of them in a few requests, each answer a few MB at most
LIST_PAGE = 2500


@vm_app.command("list")
def vm_list(
    plugin: Annotated[str | None, typer.Option("--plugin", help="Only VMs of this plugin.")] = None,
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            help="Only VMs in this status (repeat for any of several).",
            show_default=False,
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help="Only VMs with an interface in this mode (vsock, bridged, dhcp, cni); vsock: "
            "VMs with no interface.",
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            metavar="KEY=VALUE",
            help="Only VMs with this label (repeat: VMs with all of them).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Only VMs on this host (a cluster's).")
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the VMs' names, one a line.")
    ] = False,
    as_json: JSONOpt = False,
) -> None:
    """List VMs in name order, all of them or those the filters select; in a cluster, those
    of every host, with a HOST column."""
    if quiet and as_json:
        usage_error("--quiet prints names, --json whole VMs: use one")
    vms: list[dict[str, Any]] = []
    with daemon(as_json) as client:
        pages = client.pages(
            "/v1/vms",
            plugin=plugin,
            status=status,
            mode=mode,
            label=label,
            host=host,
            limit=LIST_PAGE,
            fields="name" if quiet else None,  # names alone: no VM's view made or sent
        )
        for page in pages:
            if quiet:
                sys.stdout.write("".join(f"{vm['name']}\n" for vm in page))
            else:
                vms.extend(page)
    if quiet:
        return

    def human(items: list[dict[str, Any]]) -> None:
        vm_table(items)
        if any(vm["restart_required"] for vm in items):
            err.print(
                f"{RESTART_MARK} restart required: runs an older config version than its latest "
                "(roost vm restart NAME applies it)",
                markup=False,
            )

    show(vms, as_json, human)


@vm_app.command("show")
def vm_show(name: NameArg, as_json: JSONOpt = False) -> None:
    """Show one VM."""
    show_vm(name, as_json)


def _action(name: str, action: str, as_json: bool, **params: Any) -> None:
    with daemon(as_json) as client:
        vm = client.call("POST", vm_path(name, action), **params)
    if action in ("start", "restart"):
        _warn_about_vsock(vm)
    show(vm, as_json, vm_human)


def _warn_about_vsock(vm: dict[str, Any]) -> None:
    if vm["status"] == "running" and not vm["vsock"]["available"]:
        err.print(
            f"warning: VM {vm['name']} has no vsock device: {vm['vsock']['reason']}", markup=False
        )


@vm_app.command("start")
def vm_start(name: NameArg, as_json: JSONOpt = False) -> None:
    """Start a VM (resume it if paused)."""
    _action(name, "start", as_json)


@vm_app.command("stop")
def vm_stop(
    name: NameArg,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", help="Seconds to wait after Ctrl-Alt-Del before SIGTERM."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Kill at once (SIGKILL).")] = False,
    as_json: JSONOpt = False,
) -> None:
    """Stop a VM: Ctrl-Alt-Del, then SIGTERM, then SIGKILL."""
    _action(name, "stop", as_json, timeout=timeout, force=force or None)


@vm_app.command("restart")
def vm_restart(name: NameArg, as_json: JSONOpt = False) -> None:
    """Stop and start a VM (its plan is recomputed)."""
    _action(name, "restart", as_json)


@vm_app.command("pause")
def vm_pause(name: NameArg, as_json: JSONOpt = False) -> None:
    """Pause a running VM."""
    _action(name, "pause", as_json)


@vm_app.command("resume")
def vm_resume(name: NameArg, as_json: JSONOpt = False) -> None:
    """Resume a paused VM."""
    _action(name, "resume", as_json)


@vm_app.command("console")
def vm_console(
    name: NameArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing while the VM runs.")
    ] = False,
) -> None:
    """Print a VM's serial console (either driver)."""
    with daemon(as_json=False) as client:
        try:
            for chunk in client.text_stream(vm_path(name, "console"), follow=follow or None):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        except KeyboardInterrupt:
            pass


@vm_app.command("rm")
def vm_rm(name: NameArg, as_json: JSONOpt = False) -> None:
    """Remove a VM (stopping it first) and release everything it holds."""
    with daemon(as_json) as client:
        client.call("DELETE", vm_path(name))
    if as_json:
        print_json({"removed": name})
    else:
        err.print(f"removed VM {name}", markup=False)


# ---- networks -------------------------------------------------------------------------------


@network_app.command("list")
def network_list(as_json: JSONOpt = False) -> None:
    """List the bridged networks roost manages and the addresses held on them."""
    with daemon(as_json) as client:
        networks = client.call("GET", "/v1/networks")

    def human(items: list[dict[str, Any]]) -> None:
        rows: list[tuple[Any, ...]] = [
            (n["name"], n["bridge"], n["subnet"], n["gateway"], len(n["leases"])) for n in items
        ]
        if any("host" in n for n in items):  # a cluster: host-local networks name their host
            rows = [(*row, n["host"] or "-") for row, n in zip(rows, items, strict=True)]
            table(["NAME", "BRIDGE", "SUBNET", "GATEWAY", "LEASES", "HOST"], rows)
            return
        table(["NAME", "BRIDGE", "SUBNET", "GATEWAY", "LEASES"], rows)

    show(networks, as_json, human)
