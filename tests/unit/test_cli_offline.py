"""The offline commands as a script sees them: exit codes, stdout, stderr and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from roost.cli.main import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plugins"
WEB = EXAMPLES / "web-service" / "plugin.json"
SECURE = EXAMPLES / "secure-worker" / "plugin.json"
DHCP_VM = EXAMPLES / "web-service" / "vm-dhcp.json"


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_validate_examples() -> None:
    result = run("plugin", "validate", WEB, SECURE)
    assert result.exit_code == 0
    assert f"{WEB}: valid (web-service 1.0.0)" in result.stdout


def test_validate_reports_each_error_as_file_loc_message(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        "bad.json",
        {
            "name": "x",
            "version": "1",
            "initramfs": {"path": "i"},
            "network": {"mode": "bridged", "subnet": "10.9.0.0/24", "gateway": "10.9.1.1"},
            "allowed_network_modes": ["bridged", "bridged"],
        },
    )
    result = run("plugin", "validate", WEB, bad)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{bad}: allowed_network_modes.1: bridged is listed twice",
        f"{bad}: network.gateway: 10.9.1.1 is not inside subnet 10.9.0.0/24",
    ]


def test_validate_unreadable_and_non_json_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    garbage = write(tmp_path, "garbage.json", "{nope")
    result = run("plugin", "validate", missing, garbage)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{missing}: -: cannot read")
    assert lines[1].startswith(f"{garbage}: -: not valid JSON")


def test_validate_json_for_one_and_for_several(tmp_path: Path) -> None:
    one = json.loads(run("plugin", "validate", SECURE, "--json").stdout)
    assert one["file"] == str(SECURE)
    assert one["valid"] is True
    assert one["manifest"]["network"] == {"mode": "vsock"}
    assert one["manifest"]["resources"] == {"vcpus": 1, "memory_mib": 256}
    bad = write(tmp_path, "bad.json", {"name": "x", "version": "1", "network": {}})
    result = run("plugin", "validate", SECURE, bad, "--json")
    assert result.exit_code == 1
    both = json.loads(result.stdout)
    assert [r["valid"] for r in both] == [True, False]
    assert both[1] == {
        "file": str(bad),
        "valid": False,
        "errors": [
            {"loc": "-", "msg": "a plugin needs an initramfs or a rootfs (or both)"},
            {"loc": "network.mode", "msg": "is required; use one of vsock, bridged, dhcp, cni"},
        ],
    }


def plan(*args: str | Path) -> dict[str, Any]:
    result = run("vm", "plan", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_plan_examples_follow_the_seed() -> None:
    secure = plan("worker-1", "--plugin", SECURE)
    assert secure["network"]["mode"] == "vsock"
    assert secure["plan"]["tap"] is False
    assert secure["network"]["ip"] is None
    web = plan("web-1", "--plugin", WEB)
    assert web["network"] == {
        "mode": "bridged",
        "source": "plugin",
        "subnet": "10.100.0.0/24",
        "gateway": "10.100.0.1",
        "auto_assign": True,
        "ip": None,
    }
    assert web["plan"]["ipam"] == "auto"
    dhcp = plan("web-2", "--plugin", WEB, "--config", DHCP_VM)
    assert dhcp["network"]["mode"] == "dhcp"
    assert dhcp["network"]["source"] == "vm"
    assert dhcp["plan"]["kernel_ip_arg"] == "ip=dhcp"


def test_plan_flags_override_the_config_field_by_field(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "vm.json",
        {
            "plugin": "web-service",
            "network": {
                "mode": "bridged",
                "subnet": "10.7.0.0/24",
                "gateway": "10.7.0.1",
                "ip": "10.7.0.5",
            },
        },
    )
    result = plan("a", "--plugin", WEB, "--config", config, "--network-ip", "10.7.0.9")
    assert (result["network"]["subnet"], result["network"]["ip"]) == ("10.7.0.0/24", "10.7.0.9")
    assert result["plan"]["kernel_ip_arg"] == "ip=10.7.0.9::10.7.0.1:255.255.255.0:a:eth0:off"


def test_plan_mode_flag_starts_a_fresh_override(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "vm.json",
        {
            "network": {
                "mode": "bridged",
                "subnet": "10.7.0.0/24",
                "gateway": "10.7.0.1",
                "ip": "10.7.0.5",
            }
        },
    )
    result = plan("a", "--plugin", WEB, "--config", config, "--network-mode", "vsock")
    assert result["network"] == {
        "mode": "vsock",
        "source": "vm",
        "subnet": None,
        "gateway": None,
        "auto_assign": None,
        "ip": None,
    }


def test_plan_flags_without_mode_keep_the_plugin_mode() -> None:
    result = plan("a", "--plugin", WEB, "--network-ip", "10.100.0.50")
    assert result["network"]["mode"] == "bridged"
    assert result["network"]["ip"] == "10.100.0.50"
    assert result["plan"]["ipam"] == "manual"
    auto = plan(
        "b",
        "--plugin",
        WEB,
        "--network-mode",
        "bridged",
        "--network-subnet",
        "10.3.0.0/16",
        "--network-auto-assign",
    )
    assert (auto["network"]["gateway"], auto["plan"]["ipam"]) == ("10.3.0.1", "auto")


def test_plan_default_subnet(tmp_path: Path) -> None:
    plugin = write(tmp_path, "p.json", {"name": "p", "version": "1", "initramfs": {"path": "i"}})
    result = plan("a", "--plugin", plugin, "--default-subnet", "172.30.0.0/16")
    assert result["network"]["source"] == "default"
    assert (result["network"]["subnet"], result["network"]["gateway"]) == (
        "172.30.0.0/16",
        "172.30.0.1",
    )
    # a bridged override of a bridged plugin inherits the plugin's subnet, not the default
    inherited = plan(
        "a", "--plugin", WEB, "--network-mode", "bridged", "--default-subnet", "172.30.0.0/16"
    )
    assert inherited["network"]["subnet"] == "10.100.0.0/24"


@pytest.mark.parametrize(
    ("args", "loc"),
    [
        (["--network-mode", "nat"], "network.mode"),
        (["--network-ip", "10.200.0.1"], "network.ip"),
        (["--network-mode", "dhcp", "--network-ip", "10.100.0.9"], "network.ip"),
        (["--network-subnet", "10.0.0.1/24"], "network.subnet"),
        (["--default-subnet", "fd00::/64", "--network-mode", "bridged"], "default_subnet"),
    ],
)
def test_plan_invalid_input_prints_the_error_object(args: list[str], loc: str) -> None:
    result = run("vm", "plan", "a", "--plugin", WEB, *args, "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "invalid"
    assert [d["loc"] for d in error["details"]] == [loc]
    assert error["message"] in result.stderr


def test_plan_refuses_a_config_for_another_plugin(tmp_path: Path) -> None:
    config = write(tmp_path, "vm.json", {"plugin": "secure-worker"})
    result = run("vm", "plan", "a", "--plugin", WEB, "--config", config, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["details"][0]["loc"] == "plugin"


def test_plan_refuses_a_bad_vm_name() -> None:
    result = run("vm", "plan", "Web_1", "--plugin", WEB)
    assert result.exit_code == 1
    assert "name: 'Web_1' is not a valid name" in result.stderr


def test_plan_human_output() -> None:
    result = run("vm", "plan", "web-1", "--plugin", WEB, "--network-ip", "10.100.0.7")
    assert result.exit_code == 0
    assert "ip=10.100.0.7::10.100.0.1:255.255.255.0:web-1:eth0:off" in result.stdout
    assert "bridged (from vm)" in result.stdout


@pytest.mark.parametrize("kind", ["manifest", "vm-config", "vm-patch"])
def test_schema(kind: str) -> None:
    result = run("schema", kind)
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["type"] == "object"
    assert "network" in schema["properties"]


def test_schema_unknown_kind_is_a_usage_error() -> None:
    assert run("schema", "vm").exit_code == 2


def test_plan_flags_complete_a_config_network_before_it_is_judged(tmp_path: Path) -> None:
    config = write(tmp_path, "vm.json", {"network": {"mode": "bridged", "subnet": "10.1.0.0/24"}})
    alone = run("vm", "plan", "a", "--plugin", WEB, "--config", config, "--json")
    assert alone.exit_code == 1
    completed = plan("a", "--plugin", WEB, "--config", config, "--network-auto-assign")
    assert (completed["network"]["gateway"], completed["plan"]["ipam"]) == ("10.1.0.1", "auto")


@pytest.mark.parametrize(
    "ids", [["--uid", "0", "--gid", "65534"], ["--uid", "65534", "--gid", "0"]]
)
def test_serve_refuses_to_jail_vms_as_root(tmp_path: Path, ids: list[str]) -> None:
    """Under the jailer, uid or gid 0 would leave Firecracker root: refused before anything."""
    result = run(
        "serve",
        "--state-dir",
        tmp_path / "state",
        "--listen",
        f"unix://{tmp_path / 'api.sock'}",
        "--jailer",
        "/bin/true",
        *ids,
    )
    assert result.exit_code == 1
    assert "is 0 (root)" in result.stderr
    assert not (tmp_path / "state").exists()
