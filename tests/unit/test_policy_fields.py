"""`policies` and `policy_defaults` on a VM's network and interfaces: how they are written and
judged, inherited, shown in JSON, set from the command line, and that changing them never
makes a restart required."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from roost.cli.configs import patch_body
from roost.cli.interfaces import SpecError, parse_interface_spec
from roost.cli.main import app
from roost.cli.options import NetworkFlags, vm_config_from
from roost.errors import InvalidError
from roost.plan import DefaultNetwork, resolve_network
from roost.plan.interfaces import resolve_interfaces
from roost.plan.network import EffectiveNetwork
from roost.plan.vm import effective_json, needs_restart, plan_vm
from roost.spec import Manifest, VMConfig, parse
from roost.spec.network import MAX_POLICIES
from roost.spec.policy import PolicyDefaults

DEFAULT = DefaultNetwork.from_cidr("10.57.0.0/24")
PLUGIN_NET = {"mode": "bridged", "subnet": "10.100.0.0/24", "auto_assign": True}
DROP_IN = {"ingress": "drop", "egress": "allow"}


def manifest(network: Any = None) -> Manifest:
    return parse(
        Manifest, {"name": "p", "version": "1", "initramfs": {"path": "i"}, "network": network}
    )


def config(**fields: Any) -> VMConfig:
    return parse(VMConfig, {"plugin": "p", **fields})


def locs(error: pytest.ExceptionInfo[InvalidError]) -> list[str]:
    return [detail.loc for detail in error.value.details]


def messages(error: pytest.ExceptionInfo[InvalidError]) -> list[str]:
    return [detail.msg for detail in error.value.details]


# ---- the spec -------------------------------------------------------------------------------


def test_a_network_takes_policy_names_and_defaults() -> None:
    vm = config(network={"mode": "dhcp", "policies": ["web-in"], "policy_defaults": DROP_IN})
    assert vm.network is not None
    assert vm.network.policies == ["web-in"]
    assert vm.network.policy_defaults == PolicyDefaults(ingress="drop")


def test_a_policy_name_is_a_dns_label_like_a_policys_own_name() -> None:
    with pytest.raises(InvalidError) as refused:
        config(network={"mode": "bridged", "policies": ["ok", "Not_OK"]})
    assert locs(refused) == ["network.policies.1"]
    assert "DNS label" in messages(refused)[0]


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"network": {"mode": "bridged", "policies": ["a", "b", "a"]}}, "network.policies.2"),
        ({"network": {"policies": ["a", "a"]}}, "network.policies.1"),
        (
            {"interfaces": [{"mode": "dhcp"}, {"mode": "bridged", "policies": ["x", "x"]}]},
            "interfaces.1.policies.1",
        ),
    ],
)
def test_a_policy_named_twice_is_refused_at_the_second(fields: dict[str, Any], loc: str) -> None:
    with pytest.raises(InvalidError) as refused:
        config(**fields)
    assert locs(refused) == [loc]
    assert "again; name each policy once" in messages(refused)[0]


def test_at_most_sixteen_policies_per_interface() -> None:
    names = [f"p{i}" for i in range(MAX_POLICIES + 1)]
    with pytest.raises(InvalidError) as refused:
        config(network={"mode": "bridged", "policies": names})
    assert locs(refused) == ["network.policies"]
    assert f"at most {MAX_POLICIES}" in messages(refused)[0]
    assert config(network={"mode": "bridged", "policies": names[:-1]}).network is not None


def test_a_policy_default_is_allow_or_drop_per_direction() -> None:
    with pytest.raises(InvalidError) as refused:
        config(network={"mode": "bridged", "policy_defaults": {"ingress": "reject"}})
    assert locs(refused) == ["network.policy_defaults.ingress"]


@pytest.mark.parametrize("field", ["policies", "policy_defaults"])
def test_policies_on_a_vsock_override_are_refused(field: str) -> None:
    value = ["a"] if field == "policies" else DROP_IN
    with pytest.raises(InvalidError) as refused:
        config(network={"mode": "vsock", field: value})
    assert locs(refused) == [f"network.{field}"]
    assert "a vsock VM has none" in messages(refused)[0]


def test_policies_on_a_vsock_plugin_network_are_refused() -> None:
    with pytest.raises(InvalidError) as refused:
        manifest({"mode": "vsock", "policies": ["a"]})
    assert locs(refused) == ["network.policies"]


def test_policies_inherited_into_vsock_mode_are_refused_once_resolved() -> None:
    # the override names no mode, so it takes the plugin's: vsock
    with pytest.raises(InvalidError) as refused:
        resolve_network(manifest({"mode": "vsock"}), config(network={"policies": ["a"]}), DEFAULT)
    assert locs(refused) == ["network.policies"]


# ---- inheritance ----------------------------------------------------------------------------


def test_a_vm_inherits_the_plugins_policies_like_its_other_fields() -> None:
    plugin = manifest({**PLUGIN_NET, "policies": ["web-in"], "policy_defaults": DROP_IN})
    effective = resolve_network(plugin, config(network={"ip": "10.100.0.9"}), DEFAULT)
    assert effective.policies == ("web-in",)
    assert effective.policy_defaults == PolicyDefaults(ingress="drop")
    assert effective.subnet is not None and str(effective.subnet) == "10.100.0.0/24"


def test_a_vm_without_an_override_has_the_plugins_policies() -> None:
    plugin = manifest({**PLUGIN_NET, "policies": ["web-in"]})
    assert resolve_network(plugin, config(), DEFAULT).policies == ("web-in",)


@pytest.mark.parametrize(
    "own",
    [
        {"subnet": "10.9.0.0/24", "auto_assign": True},
        {"network": "lan"},
        {"mode": "dhcp"},
    ],
    ids=["own subnet", "own network", "another mode"],
)
def test_a_vm_with_its_own_subnet_network_or_mode_inherits_no_policies(
    own: dict[str, Any],
) -> None:
    plugin = manifest({**PLUGIN_NET, "policies": ["web-in"], "policy_defaults": DROP_IN})
    effective = resolve_network(plugin, config(network=own), DEFAULT)
    assert (effective.policies, effective.policy_defaults) == ((), None)


def test_a_vms_own_policies_replace_the_plugins() -> None:
    plugin = manifest({**PLUGIN_NET, "policies": ["web-in", "base"]})
    assert resolve_network(plugin, config(network={"policies": ["db"]}), DEFAULT).policies == (
        "db",
    )
    emptied = resolve_network(plugin, config(network={"policies": []}), DEFAULT)
    assert emptied.policies == ()


def test_a_vms_interfaces_inherit_nothing_from_the_plugins_network() -> None:
    plugin = manifest({**PLUGIN_NET, "policies": ["web-in"]})
    resolved = resolve_interfaces(
        plugin, config(interfaces=[{"mode": "dhcp"}]), DEFAULT, None, vm_name="v"
    )
    assert resolved.interfaces[0].policies == ()


def test_each_interface_carries_its_own_policies() -> None:
    vm = config(
        interfaces=[
            {"mode": "bridged", "subnet": "10.1.0.0/24", "auto_assign": True, "policies": ["a"]},
            {"mode": "dhcp", "policies": ["b", "c"], "policy_defaults": DROP_IN},
        ]
    )
    resolved = resolve_interfaces(manifest(), vm, DEFAULT, None, vm_name="v")
    first, second = resolved.interfaces
    assert (first.policies, first.policy_defaults) == (("a",), None)
    assert (second.policies, second.policy_defaults) == (("b", "c"), PolicyDefaults(ingress="drop"))


def test_the_single_form_interface_reads_through_to_its_network() -> None:
    plugin = manifest({**PLUGIN_NET, "policies": ["web-in"]})
    resolved = resolve_interfaces(plugin, config(), DEFAULT, None, vm_name="v")
    assert resolved.interfaces[0].policies == ("web-in",)


# ---- JSON -----------------------------------------------------------------------------------


def test_a_network_without_policies_has_no_policy_keys() -> None:
    data = resolve_network(manifest(PLUGIN_NET), config(), DEFAULT).to_json()
    assert "policies" not in data and "policy_defaults" not in data


def test_policies_round_trip_through_json() -> None:
    plugin = manifest({**PLUGIN_NET, "policies": ["web-in", "no-egress"]})
    effective = resolve_network(
        plugin, config(network={"policy_defaults": {"egress": "drop"}}), DEFAULT
    )
    data = effective.to_json()
    assert data["policies"] == ["web-in", "no-egress"]
    assert data["policy_defaults"] == {"ingress": "allow", "egress": "drop"}
    assert EffectiveNetwork.from_json(data) == effective


def test_an_interfaces_json_shows_its_policies_only_where_set() -> None:
    vm = config(
        interfaces=[
            {"mode": "dhcp", "policies": ["a"]},
            {"mode": "bridged", "subnet": "10.1.0.0/24", "auto_assign": True},
            {"mode": "bridged", "network": "lan", "policy_defaults": {"ingress": "drop"}},
        ]
    )
    first, second, third = resolve_interfaces(manifest(), vm, DEFAULT, None, vm_name="v").to_json()
    assert (first["policies"], "policy_defaults" in first) == (["a"], False)
    assert "policies" not in second and "policy_defaults" not in second
    assert ("policies" in third, third["policy_defaults"]) == (False, DROP_IN)


# ---- restarts -------------------------------------------------------------------------------


def version(network: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config version as the engine stores it: what it resolves to, and the config."""
    vm = config(network=network)
    plan = plan_vm("v", manifest(PLUGIN_NET), vm, DEFAULT)
    effective = effective_json(plan, plan.network, "qemu", plan.interfaces)
    return effective, vm.model_dump(mode="json", exclude_none=True)


def test_a_patch_that_changes_only_policies_needs_no_restart() -> None:
    before = version({"ip": "10.100.0.5"})
    after = version({"ip": "10.100.0.5", "policies": ["web-in"], "policy_defaults": DROP_IN})
    assert after[0]["interfaces"][0]["policies"] == ["web-in"]
    assert not needs_restart(*before, *after)
    assert not needs_restart(*after, *before)


def test_a_patch_that_changes_the_ip_with_policies_still_needs_a_restart() -> None:
    before = version({"ip": "10.100.0.5", "policies": ["web-in"]})
    after = version({"ip": "10.100.0.6", "policies": ["web-in"]})
    assert needs_restart(*before, *after)


# ---- the command line -----------------------------------------------------------------------


def flags(**given: Any) -> NetworkFlags:
    names = ("mode", "subnet", "gateway", "auto_assign", "ip", "policies")
    return NetworkFlags(*(given.get(name) for name in names))


def test_network_policy_flags_set_the_networks_policies_on_a_vm_config(tmp_path: Path) -> None:
    vm = vm_config_from("p", None, flags(policies=["web-in", "no-egress"]))
    assert vm.network is not None
    assert vm.network.model_dump(exclude_none=True) == {"policies": ["web-in", "no-egress"]}


def test_network_policy_flags_replace_a_config_files_policies(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text('{"network": {"mode": "dhcp", "policies": ["old"]}}')
    vm = vm_config_from("p", path, flags(policies=["new"]))
    assert vm.network is not None
    assert (vm.network.mode, vm.network.policies) == ("dhcp", ["new"])


def test_network_policy_flags_change_the_stored_override_in_a_patch() -> None:
    stored = {"mode": "bridged", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1", "ip": "10.1.0.5"}
    body = patch_body(stored, None, flags(policies=["web-in"]), reset_network=False)
    assert body == {"network": {**stored, "policies": ["web-in"]}}


def test_a_bad_policy_flag_is_refused_at_its_place_before_any_request() -> None:
    with pytest.raises(InvalidError) as refused:
        patch_body(None, None, flags(policies=["web-in", "web-in"]), reset_network=False)
    assert locs(refused) == ["network.policies.1"]


def test_network_policy_is_a_network_flag_for_the_one_form_rule() -> None:
    assert flags(policies=["a"]).names == ["--network-policy"]
    assert not flags(policies=[]).given


def test_vm_create_takes_repeated_network_policy_flags(tmp_path: Path) -> None:
    # an --interface with a --network-* flag is refused before any request: the flag was read
    result = CliRunner().invoke(
        app,
        [
            "--api",
            "unix:///nonexistent.sock",
            *("vm", "create", "v", "--plugin", "p"),
            *("--network-policy", "a", "--network-policy", "b"),
            *("--interface", "mode=dhcp"),
        ],
    )
    assert result.exit_code == 2
    assert "--interface cannot be combined with --network-policy" in result.output


def test_vm_config_patch_help_names_network_policy() -> None:
    result = CliRunner().invoke(app, ["vm", "config", "patch", "--help"])
    assert result.exit_code == 0
    assert "--network-policy" in result.output


def test_an_interface_spec_takes_policies_separated_by_semicolons() -> None:
    assert parse_interface_spec("mode=dhcp,policies=web-in; no-egress") == {
        "mode": "dhcp",
        "policies": ["web-in", "no-egress"],
    }
    assert parse_interface_spec("mode=dhcp,policies=")["policies"] == []


def test_an_interface_spec_takes_policy_defaults_as_direction_action_pairs() -> None:
    spec = parse_interface_spec("mode=dhcp,policy_defaults=ingress:drop;egress:allow")
    assert spec["policy_defaults"] == DROP_IN
    assert config(interfaces=[spec]).interfaces is not None


@pytest.mark.parametrize("value", ["drop", "ingress:drop;ingress:allow", ":drop"])
def test_a_malformed_policy_defaults_spec_says_what_to_write(value: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_interface_spec(f"mode=dhcp,policy_defaults={value}")
    assert str(refused.value).endswith("write e.g. policy_defaults=ingress:drop;egress:allow")


def test_an_interface_specs_bad_policy_is_refused_at_its_place() -> None:
    spec = parse_interface_spec("mode=dhcp,policies=a;;b")
    with pytest.raises(InvalidError) as refused:
        config(interfaces=[spec])
    assert locs(refused) == ["interfaces.0.policies.1"]
