"""`--interface SPEC` on vm create, vm plan and vm config patch; how several interfaces read in
vm plan, vm list, vm show and vm config show."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from roost.cli.configs import _version_human, changes, patch_body
from roost.cli.interfaces import SPEC_KEYS, SpecError, parse_interface_spec
from roost.cli.main import app
from roost.cli.options import NetworkFlags
from roost.cli.remote import VM_COLUMNS, _plugin_human, _plugin_network, _vm_row
from roost.cli.views import vm_human
from roost.spec import InterfaceConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plugins"
WEB = EXAMPLES / "web-service" / "plugin.json"
HOW = (
    "write KEY=VALUE pairs separated by commas, e.g. --interface "
    "mode=bridged,network=lan,ip=10.1.0.5"
)
NO_FLAGS = NetworkFlags(None, None, None, None, None)
STORED_INTERFACES = [
    {"mode": "bridged", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1", "ip": "10.1.0.5"},
    {"mode": "dhcp"},
]
TWO = ["--interface", "mode=bridged,subnet=10.1.0.0/24,gateway=10.1.0.1,ip=10.1.0.5"]
TWO += ["--interface", "mode=dhcp,network=lan2,name=wan,mac=02:00:00:00:01:05,default_route=true"]


def run(*args: str | Path) -> Any:
    # no daemon listens there: a usage error is given before any request
    return CliRunner().invoke(app, ["--api", "unix:///nonexistent.sock", *map(str, args)])


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(data))
    return path


# ---- the SPEC -------------------------------------------------------------------------------


def test_a_spec_gives_every_field_of_an_interface() -> None:
    spec = (
        "name=lan,mode=bridged,network=lan2,subnet=10.1.0.0/24,gateway=10.1.0.1,"
        "auto_assign=false,ip=10.1.0.5,mac=02:00:00:00:01:05,ipv6=fd00::5,default_route=TRUE"
    )
    assert parse_interface_spec(spec) == {
        "name": "lan",
        "mode": "bridged",
        "network": "lan2",
        "subnet": "10.1.0.0/24",
        "gateway": "10.1.0.1",
        "auto_assign": False,
        "ip": "10.1.0.5",
        "mac": "02:00:00:00:01:05",
        "ipv6": {"ip": "fd00::5"},
        "default_route": True,
    }


def test_the_spec_keys_are_the_fields_of_an_interface() -> None:
    assert sorted(SPEC_KEYS) == sorted(InterfaceConfig.model_fields)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", f"--interface '' is empty; {HOW}"),
        ("mode", f"--interface 'mode': 'mode' has no '='; {HOW}"),
        ("mode=dhcp,,ip=1", f"--interface 'mode=dhcp,,ip=1': an empty pair (a stray comma); {HOW}"),
        ("mode=dhcp,", f"--interface 'mode=dhcp,': an empty pair (a stray comma); {HOW}"),
        ("=dhcp", f"--interface '=dhcp': '=dhcp' has no key; {HOW}"),
        (
            "mode=dhcp,bridge=br0",
            "--interface 'mode=dhcp,bridge=br0': unknown key 'bridge'; the keys are name, mode, "
            "network, subnet, gateway, auto_assign, ip, mac, ipv6, default_route, policies, "
            "policy_defaults, cni",
        ),
        (
            "ip=10.1.0.5,ip=10.1.0.6",
            "--interface 'ip=10.1.0.5,ip=10.1.0.6': ip is given twice; give each key once "
            "(repeat --interface for another interface)",
        ),
        (
            "mode=dhcp,default_route=yes",
            "--interface 'mode=dhcp,default_route=yes': default_route='yes' is not a boolean; "
            "write default_route=true or default_route=false",
        ),
        (
            "mode=bridged,auto_assign=1",
            "--interface 'mode=bridged,auto_assign=1': auto_assign='1' is not a boolean; "
            "write auto_assign=true or auto_assign=false",
        ),
    ],
)
def test_a_malformed_spec_says_what_to_write(spec: str, message: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_interface_spec(spec)
    assert str(refused.value) == message
    for command in (["vm", "plan", "a", "--plugin", WEB], ["vm", "create", "a", "--plugin", "p"]):
        result = run(*command, "--interface", spec)
        assert (result.exit_code, result.stderr) == (2, f"error: {message}\n")
    patched = run("vm", "config", "patch", "a", "--interface", spec)
    assert (patched.exit_code, patched.stderr) == (2, f"error: {message}\n")


def test_a_bad_value_is_refused_by_validation_at_its_interface() -> None:
    result = run(
        "vm", "plan", "a", "--plugin", WEB, *TWO, "--interface", "mode=bridged,ip=10.300.0.1"
    )
    assert result.exit_code == 1
    assert "interfaces.2.ip: '10.300.0.1' is not an IPv4 address" in result.stderr


# ---- mixing with the single-NIC flags -------------------------------------------------------


@pytest.mark.parametrize(
    "flag",
    [
        ["--network-mode", "bridged"],
        ["--network-subnet", "10.2.0.0/24"],
        ["--network-gateway", "10.2.0.1"],
        ["--network-auto-assign"],
        ["--no-network-auto-assign"],
        ["--network-ip", "10.2.0.5"],
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ["vm", "plan", "a", "--plugin", str(WEB)],
        ["vm", "create", "a", "--plugin", "p"],
        ["vm", "config", "patch", "a"],
    ],
)
def test_interface_and_a_network_flag_together_are_a_usage_error(
    command: list[str], flag: list[str]
) -> None:
    result = run(*command, "--interface", "mode=dhcp", *flag)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: --interface cannot be combined with {flag[0].replace('--no-', '--')}: "
        "--interface lists every interface (several NICs), the --network-* flags change one "
        "network (one NIC); use one form\n"
    )


def test_interface_and_network_reset_together_are_a_usage_error() -> None:
    result = run("vm", "config", "patch", "a", "--interface", "mode=dhcp", "--network-reset")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: --network-reset cannot be combined with --interface: --network-reset returns "
        "to the plugin's network, --interface sets the VM's own interfaces; use one\n"
    )


def test_interface_options_replace_the_configs_interfaces_and_network(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        {"network": {"mode": "vsock"}, "labels": {"team": "a"}},
    )
    result = run("vm", "plan", "a", "--plugin", WEB, "--config", config, *TWO, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["network"] is None
    assert [i["mode"] for i in plan["interfaces"]] == ["bridged", "dhcp"]
    listed = write(tmp_path, {"interfaces": STORED_INTERFACES})
    one = run("vm", "plan", "a", "--plugin", WEB, "--config", listed, "--interface", "mode=dhcp")
    assert one.exit_code == 0, one.output
    assert "0  eth0  dhcp" in one.stdout
    assert "10.1.0.5" not in one.stdout


def test_field_flags_on_a_configs_interfaces_are_a_usage_error(tmp_path: Path) -> None:
    config = write(tmp_path, {"interfaces": STORED_INTERFACES})
    result = run("vm", "plan", "a", "--plugin", WEB, "--config", config, "--network-ip", "10.1.0.9")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: --network-ip changes a single network field by field, but {config}'s config "
        "has interfaces (a list); use --interface for each interface or --network-mode to "
        "start a fresh single-NIC network\n"
    )


def test_network_mode_on_a_configs_interfaces_starts_a_fresh_single_network(
    tmp_path: Path,
) -> None:
    config = write(tmp_path, {"interfaces": STORED_INTERFACES})
    result = run(
        "vm", "plan", "a", "--plugin", WEB, "--config", config, "--network-mode", "vsock", "--json"
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["network"]["mode"], plan["interfaces"]) == ("vsock", [])


# ---- patches --------------------------------------------------------------------------------


def flags(**given: Any) -> NetworkFlags:
    names = ("mode", "subnet", "gateway", "auto_assign", "ip")
    return NetworkFlags(*(given.get(name) for name in names))


def test_field_flags_on_a_vm_with_interfaces_are_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(typer.Exit) as exited:
        patch_body(
            None,
            None,
            flags(subnet="10.2.0.0/24", ip="10.2.0.5"),
            reset_network=False,
            stored_interfaces=STORED_INTERFACES,
            vm_name="web-1",
        )
    assert exited.value.exit_code == 2
    assert capsys.readouterr().err == (
        "error: --network-subnet, --network-ip change a single network field by field, but "
        "VM web-1's config has interfaces (a list); use --interface for each interface or "
        "--network-mode to start a fresh single-NIC network, or --network-reset for the "
        "plugin's default\n"
    )


def test_field_flags_on_a_patch_files_interfaces_are_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(typer.Exit) as exited:
        patch_body(
            {"mode": "dhcp"},
            {"interfaces": STORED_INTERFACES},
            flags(ip="10.2.0.5"),
            reset_network=False,
        )
    assert exited.value.exit_code == 2
    assert "but the --file patch has interfaces (a list)" in capsys.readouterr().err


def test_network_mode_on_a_vm_with_interfaces_starts_a_fresh_single_nic() -> None:
    body = patch_body(
        None,
        {"interfaces": STORED_INTERFACES, "labels": {"a": "b"}},
        flags(mode="bridged", subnet="10.2.0.0/24", auto_assign=True),
        reset_network=False,
        stored_interfaces=STORED_INTERFACES,
    )
    assert body == {
        "labels": {"a": "b"},
        "network": {"mode": "bridged", "subnet": "10.2.0.0/24", "auto_assign": True},
    }


def test_network_mode_on_a_vm_stored_with_interfaces_sends_a_single_network() -> None:
    body = patch_body(
        None, None, flags(mode="dhcp"), reset_network=False, stored_interfaces=STORED_INTERFACES
    )
    assert body == {"network": {"mode": "dhcp"}}


def test_network_reset_clears_network_and_interfaces() -> None:
    body = patch_body(
        None,
        {"interfaces": STORED_INTERFACES},
        NO_FLAGS,
        reset_network=True,
        stored_interfaces=STORED_INTERFACES,
    )
    assert body == {"network": None}


def test_a_patchs_interfaces_replace_the_list_and_the_files_network() -> None:
    given = [{"mode": "dhcp", "name": "wan"}]
    body = patch_body(
        {"mode": "dhcp"},
        {"network": {"mode": "vsock"}, "vmm": "qemu"},
        NO_FLAGS,
        reset_network=False,
        stored_interfaces=STORED_INTERFACES,
        interfaces=given,
    )
    assert body == {"vmm": "qemu", "interfaces": given}


def test_a_patch_still_names_its_file_with_file(tmp_path: Path) -> None:
    patch = tmp_path / "patch.json"
    patch.write_text("[]")
    result = run("vm", "config", "patch", "a", "--file", patch)
    assert result.exit_code == 1
    assert f"{patch} must hold a JSON object (a VM config patch)" in result.stderr


# ---- vm plan --------------------------------------------------------------------------------


def test_plan_shows_each_interface_in_a_table() -> None:
    result = run("vm", "plan", "web-1", "--plugin", WEB, *TWO)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "vm          web-1",
        "plugin      web-service 1.0.0",
        "interfaces  2 (from vm)",
        "",
        "#  NAME  MODE     NETWORK/SUBNET  IP        MAC                DEFAULT ROUTE",
        "0  eth0  bridged  10.1.0.0/24     10.1.0.5  at create          no",
        "1  wan   dhcp     lan2            by dhcp   02:00:00:00:01:05  yes",
        "network lan2: resolved by the daemon",
    ]


def test_plan_json_lists_the_interfaces() -> None:
    result = run("vm", "plan", "web-1", "--plugin", WEB, *TWO, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["name"], plan["network"], plan["plan"]) == ("web-1", None, None)
    first, second = plan["interfaces"]
    assert {k: v for k, v in first.items() if k != "plan"} == {
        "name": "eth0",
        "mode": "bridged",
        "network": None,
        "subnet": "10.1.0.0/24",
        "gateway": "10.1.0.1",
        "auto_assign": False,
        "ip": "10.1.0.5",
        "mac": None,
        "ipv6": None,
        "default_route": False,
    }
    assert (first["plan"]["ipam"], first["plan"]["tap"]) == ("manual", True)
    assert second["unresolved"] == "network lan2: resolved by the daemon"
    assert (second["name"], second["mac"], second["default_route"]) == (
        "wan",
        "02:00:00:00:01:05",
        True,
    )
    assert second["plan"]["kernel_ip_arg"] == "ip=dhcp"


def test_plan_of_a_single_network_keeps_its_json_and_lists_its_interface() -> None:
    result = run("vm", "plan", "web-1", "--plugin", WEB, "--network-ip", "10.100.0.7", "--json")
    plan = json.loads(result.stdout)
    assert plan["network"]["ip"] == "10.100.0.7"
    assert plan["plan"]["kernel_ip_arg"] == "ip=10.100.0.7::10.100.0.1:255.255.255.0:web-1:eth0:off"
    assert [(i["name"], i["ip"]) for i in plan["interfaces"]] == [("eth0", "10.100.0.7")]


# ---- vm list, vm show, vm config show -------------------------------------------------------


def interface(index: int, mode: str, **fields: Any) -> dict[str, Any]:
    """An interface of a VM's JSON, every field present."""
    empty = dict.fromkeys(
        ("network", "bridge", "tap", "mac", "ip", "subnet", "gateway", "observed_ip", "ipv6")
    )
    return {"name": f"eth{index}", "mode": mode, **empty, "default_route": index == 0, **fields}


LAN = interface(
    0,
    "bridged",
    network="lan2",
    bridge="br-lan2",
    tap="rtap7-0",
    mac="02:aa:00:00:00:01",
    ip="10.1.0.5",
    subnet="10.1.0.0/24",
    gateway="10.1.0.1",
    ipv6={
        "ip": "fd00:1::a8aa:ff:fe00:1",
        "prefix": "fd00:1::/64",
        "gateway": "fd00:1::1",
        "source": "slaac",
    },
)
WAN = interface(1, "dhcp", network="dhcp", bridge="br-ext", tap="rtap7-1", mac="02:aa:00:00:00:02")


def vm_json(network: dict[str, Any] | None, interfaces: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "web-1",
        "plugin": "web-service",
        "status": "running",
        "status_reason": None,
        "exit_code": None,
        "network": network,
        "interfaces": interfaces,
        "vsock": {"cid": 3, "uds_path": "/run/v.sock", "available": True, "reason": None},
        "resources": {"vcpus": 1, "memory_mib": 256},
        "vmm": {"kind": "firecracker", "pid": 42, "api_socket": "/run/api.sock"},
        "console_log": "/run/console.log",
        "config_version": 1,
        "running_version": 1,
        "restart_required": False,
        "created_at": "2026-12-05T04:00:00Z",
    }


def test_list_joins_the_modes_and_shows_the_first_address() -> None:
    row = _vm_row(vm_json(None, [LAN, WAN]))
    assert dict(zip(VM_COLUMNS, row, strict=True)) == {
        "NAME": "web-1",
        "PLUGIN": "web-service",
        "STATUS": "running",
        "MODE": "bridged+dhcp",
        "IP": "10.1.0.5",
        "MAC": "02:aa:00:00:00:01",
        "TAP": "rtap7-0",
        "CID": 3,
        "VMM": "firecracker",
        "PID": 42,
    }


def test_list_shows_the_first_interface_that_has_an_address() -> None:
    waiting = interface(0, "dhcp", tap="rtap7-0", mac="02:aa:00:00:00:01")
    seen = {**WAN, "observed_ip": "192.168.1.20"}
    assert _vm_row(vm_json(None, [waiting, seen]))[3:7] == [
        "dhcp+dhcp",
        "192.168.1.20",
        "02:aa:00:00:00:02",
        "rtap7-1",
    ]


def test_list_shows_single_nic_and_vsock_vms_as_before() -> None:
    single = {
        "mode": "bridged",
        "source": "plugin",
        "subnet": "10.100.0.0/24",
        "gateway": "10.100.0.1",
        "auto_assign": True,
        "ip": "10.100.0.2",
        "mac": "02:aa:00:00:00:09",
        "bridge": "rbr1",
        "tap": "rtap9",
        "observed_ip": None,
    }
    assert _vm_row(vm_json(single, [interface(0, "bridged")]))[3:7] == [
        "bridged",
        "10.100.0.2",
        "02:aa:00:00:00:09",
        "rtap9",
    ]
    vsock = dict.fromkeys(single) | {"mode": "vsock", "source": "plugin"}
    assert _vm_row(vm_json(vsock, []))[3:7] == ["vsock", None, None, None]


def test_list_shows_a_running_cni_vms_first_address_from_its_plugins() -> None:
    cni = dict.fromkeys(("subnet", "gateway", "ip", "bridge", "observed_ip")) | {
        "mode": "cni",
        "source": "vm",
        "mac": "0a:58:0a:59:00:02",
        "tap": "rtap4",
        "cni": {"network": "lab", "result": {}},
        "addresses": ["10.89.0.2/24", "fd89:1::2/64"],
    }
    assert _vm_row(vm_json(cni, [interface(0, "cni")]))[3:7] == [
        "cni",
        "10.89.0.2",
        "0a:58:0a:59:00:02",
        "rtap4",
    ]


def test_show_lists_each_interface(capsys: pytest.CaptureFixture[str]) -> None:
    vm_human(vm_json(None, [LAN, WAN]))
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("network "))
    assert [line.rstrip() for line in lines[start : start + 21]] == [
        "network           2 interfaces",
        "interface 0       eth0, bridged, default route",
        "  network         lan2",
        "  subnet          10.1.0.0/24",
        "  gateway         10.1.0.1",
        "  ip              10.1.0.5",
        "  observed ip     -",
        "  ipv6            fd00:1::a8aa:ff:fe00:1 (slaac, prefix fd00:1::/64, gateway fd00:1::1)",
        "  mac             02:aa:00:00:00:01",
        "  bridge          br-lan2",
        "  tap             rtap7-0",
        "interface 1       eth1, dhcp",
        "  network         dhcp",
        "  subnet          -",
        "  gateway         -",
        "  ip              -",
        "  observed ip     -",
        "  ipv6            -",
        "  mac             02:aa:00:00:00:02",
        "  bridge          br-ext",
        "  tap             rtap7-1",
    ]
    assert lines[start + 21].startswith("vsock cid")


def test_config_show_lists_each_interface_of_a_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    effective = {
        "network": None,
        "interfaces": [LAN, WAN],
        "resources": {"vcpus": 1, "memory_mib": 256},
        "vmm": "qemu",
    }
    version = {"version": 2, "created_at": "t", "effective": effective, "config": {}}
    _version_human(version)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:4] == [
        "network        2 interfaces",
        "interface 0    eth0, bridged, default route",
    ]
    assert "interface 1    eth1, dhcp" in lines
    assert lines[-4] == "resources      1 vCPU, 256 MiB"


def test_changes_name_an_interfaces_field_by_its_index() -> None:
    before = {"config": {"interfaces": STORED_INTERFACES}, "effective": {}}
    moved = [STORED_INTERFACES[0] | {"ip": "10.1.0.9"}, STORED_INTERFACES[1]]
    after = {"config": {"interfaces": moved}, "effective": {}}
    assert changes(before, after) == [("config.interfaces.0.ip", "10.1.0.5 -> 10.1.0.9")]


def test_a_plugin_with_interfaces_shows_them(capsys: pytest.CaptureFixture[str]) -> None:
    manifest = {"interfaces": [{"mode": "bridged", "subnet": "10.1.0.0/24"}, {"mode": "dhcp"}]}
    assert _plugin_network(manifest) == "bridged+dhcp"
    assert _plugin_network({"interfaces": []}) == "vsock"
    assert _plugin_network({"network": {"mode": "dhcp"}}) == "dhcp"
    assert _plugin_network({}) == "default"
    _plugin_human({"name": "p", "version": "1", "manifest": manifest, "artifacts": {}, "vms": []})
    assert "interfaces     mode=bridged, subnet=10.1.0.0/24; mode=dhcp" in capsys.readouterr().out


def test_show_of_a_single_nic_vm_reads_as_before_with_its_ipv6_where_it_has_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    network = {
        "mode": "bridged",
        "source": "vm",
        "subnet": "10.1.0.0/24",
        "gateway": "10.1.0.1",
        "auto_assign": False,
        "ip": "10.1.0.5",
        "mac": "02:aa:00:00:00:01",
        "bridge": "br-lan2",
        "tap": "rtap7",
        "observed_ip": None,
    }
    vm_human(vm_json(network, [interface(0, "bridged")]))
    before = capsys.readouterr().out.splitlines()
    keys = [line.split("  ")[0] for line in before]
    assert keys[4:13] == [
        "network",
        "subnet",
        "gateway",
        "ip",
        "mac",
        "bridge",
        "tap",
        "observed ip",
        "vsock cid",
    ]
    vm_human(vm_json(network, [LAN]))
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line not in before] == [
        "ipv6              fd00:1::a8aa:ff:fe00:1 (slaac, prefix fd00:1::/64, gateway fd00:1::1)"
    ]
