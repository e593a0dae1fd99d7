"""The `cni` mode in spec and plan: how a cni network or interface is written and judged,
what its plan tells later layers, how the CNI result's MAC and addresses reach the guest and
the JSON, and what `vm plan` shows before any start."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from roost.cli.interfaces import parse_interface_spec
from roost.cli.main import app
from roost.errors import InvalidError
from roost.plan import IPAM, AntiSpoof, Attachment, DefaultNetwork, plan_network, resolve_network
from roost.plan.interfaces import EffectiveInterface, ResolvedInterfaces, resolve_interfaces
from roost.plan.network import EffectiveNetwork
from roost.plan.vm import effective_json, needs_restart, plan_vm
from roost.spec import Manifest, VMConfig, parse
from roost.spec.cni import CniResult, parse_result
from roost.spec.network import NetworkMode

DEFAULT = DefaultNetwork.from_cidr("10.57.0.0/24")
MYNET = {"network": "mynet"}
CNI_NET = {"mode": "cni", "cni": MYNET}
NETNS = "/run/netns/roost-vm-v"
# what Debian's bridge + host-local answer (trimmed): the bridge, the veth's host end, the
# interface inside the VM's namespace (index 2), an IPv4 and two IPv6 addresses
RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "0a:58:0a:58:00:01"},
        {"name": "veth1234", "mac": "3e:1f:00:00:00:01"},
        {"name": "eth0", "mac": "0a:58:0a:58:00:05", "sandbox": NETNS},
    ],
    "ips": [
        {"address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 2},
        {"address": "fd00:88::5/64", "gateway": "fd00:88::1", "interface": 2},
        {"address": "fd00:99::5/64", "interface": 2},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
}


def manifest(network: Any = None, **more: Any) -> Manifest:
    data = {"name": "p", "version": "1", "initramfs": {"path": "i"}, "network": network}
    return parse(Manifest, {**data, **more})


def config(**fields: Any) -> VMConfig:
    return parse(VMConfig, {"plugin": "p", **fields})


def refused(make: Any, *args: Any, **fields: Any) -> dict[str, str]:
    with pytest.raises(InvalidError) as error:
        make(*args, **fields)
    return {detail.loc: detail.msg for detail in error.value.details}


def result() -> CniResult:
    return parse_result(RESULT)


def single(network: Any = None, vm: Any = None) -> ResolvedInterfaces:
    return resolve_interfaces(manifest(network), config(network=vm), DEFAULT, None, vm_name="v")


def started(interface: EffectiveInterface) -> EffectiveInterface:
    return interface.with_mac("02:00:00:00:00:07").with_cni_result(result(), 2, "v")


# ---- the spec -------------------------------------------------------------------------------


def test_a_cni_network_names_its_cni_network_with_args_and_capability_args() -> None:
    written = {
        "mode": " CNI ",
        "cni": {
            "network": "mynet",
            "args": {"IgnoreUnknown": "1"},
            "capability_args": {"portMappings": [{"hostPort": 8080, "containerPort": 80}]},
        },
    }
    network = config(network=written).network
    assert network is not None and network.mode is NetworkMode.CNI
    assert network.cni is not None
    assert (network.cni.network, network.cni.args) == ("mynet", {"IgnoreUnknown": "1"})
    assert network.cni.capability_args["portMappings"][0]["hostPort"] == 8080


def test_a_cni_network_without_cni_is_refused_where_it_is_complete() -> None:
    assert refused(manifest, {"mode": "cni"}) == {
        "network.cni": 'is required in cni mode: {"network": "<a cni network or conflist name>"}'
    }
    assert list(refused(config, interfaces=[{"mode": "cni"}])) == ["interfaces.0.cni"]
    # a VM's override may inherit it from the plugin: judged once resolved
    assert list(refused(resolve_network, manifest(), config(network={"mode": "cni"}), DEFAULT)) == [
        "network.cni"
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subnet", "10.1.0.0/24"),
        ("gateway", "10.1.0.1"),
        ("ip", "10.1.0.5"),
        ("auto_assign", False),
        ("network", "lan"),
    ],
)
def test_what_a_cni_networks_plugins_decide_is_refused(field: str, value: Any) -> None:
    errors = refused(config, network={**CNI_NET, field: value})
    assert list(errors) == [f"network.{field}"]
    assert (
        "is not for cni mode: the CNI network's plugins make the link" in errors[f"network.{field}"]
    )


@pytest.mark.parametrize(
    ("field", "value"), [("policies", ["web-in"]), ("policy_defaults", {"ingress": "drop"})]
)
def test_policies_on_a_cni_interface_are_refused(field: str, value: Any) -> None:
    errors = refused(config, interfaces=[{**CNI_NET, field: value}])
    assert list(errors) == [f"interfaces.0.{field}"]
    assert "its traffic never crosses a roost bridge" in errors[f"interfaces.0.{field}"]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("mac", "02:00:00:00:01:05", "takes the MAC of the interface the CNI plugins make"),
        ("ipv6", "fd00::5", "takes every address its CNI plugins give"),
    ],
)
def test_a_cni_interfaces_mac_and_ipv6_are_its_plugins(field: str, value: str, says: str) -> None:
    errors = refused(config, interfaces=[{**CNI_NET, field: value}])
    assert list(errors) == [f"interfaces.0.{field}"]
    assert says in errors[f"interfaces.0.{field}"]


def test_cni_outside_cni_mode_is_refused() -> None:
    assert list(refused(config, network={"mode": "bridged", "cni": MYNET})) == ["network.cni"]


@pytest.mark.parametrize(
    ("cni", "loc"),
    [
        ({"network": "-bad"}, "network.cni.network"),
        ({"network": "a/b"}, "network.cni.network"),
        ({"network": "n", "args": {"A=B": "1"}}, "network.cni.args"),
        ({"network": "n", "args": {"A": "1;2"}}, "network.cni.args"),
        # an environment variable cannot carry a NUL: the plugin would never run
        ({"network": "n", "args": {"A": "1\x002"}}, "network.cni.args"),
        ({"network": "n", "args": {"A\x00": "1"}}, "network.cni.args"),
        ({"network": "n", "bridge": "br0"}, "network.cni.bridge"),
    ],
)
def test_a_bad_cni_field_is_refused_at_its_place(cni: dict[str, Any], loc: str) -> None:
    assert list(refused(config, network={"mode": "cni", "cni": cni})) == [loc]


def test_a_conflists_name_may_be_any_cni_network_name() -> None:
    network = config(network={"mode": "cni", "cni": {"network": "K8s_pod.net"}}).network
    assert network is not None and network.cni is not None
    assert network.cni.network == "K8s_pod.net"


def test_cni_interfaces_cannot_mix_with_bridged_or_dhcp_ones() -> None:
    errors = refused(config, interfaces=[CNI_NET, {"mode": "dhcp"}])
    assert list(errors) == ["interfaces.1.mode"]
    assert (
        "runs in its own network namespace, where no roost bridge is" in errors["interfaces.1.mode"]
    )


def test_two_interfaces_on_one_cni_network_are_refused() -> None:
    errors = refused(config, interfaces=[CNI_NET, CNI_NET])
    assert list(errors) == ["interfaces.1.cni.network"]


def test_a_plugin_may_allow_cni_and_refuse_every_other_mode() -> None:
    plugin = manifest(CNI_NET, allowed_network_modes=["cni"])
    assert resolve_network(plugin, config(), DEFAULT).mode is NetworkMode.CNI
    assert list(refused(resolve_network, plugin, config(network={"mode": "bridged"}), DEFAULT)) == [
        "network.mode"
    ]


def test_a_vm_in_the_plugins_cni_mode_inherits_its_cni_unless_it_names_its_own() -> None:
    plugin = manifest({"mode": "cni", "cni": {"network": "mynet", "args": {"A": "1"}}})
    inherited = resolve_network(plugin, config(network={"mode": "cni"}), DEFAULT)
    assert inherited.cni is not None
    assert (inherited.cni.network, dict(inherited.cni.args)) == ("mynet", {"A": "1"})
    own = resolve_network(plugin, config(network={"cni": {"network": "other"}}), DEFAULT)
    assert own.cni is not None
    assert (own.cni.network, dict(own.cni.args)) == ("other", {})


def test_an_interface_spec_names_its_cni_network() -> None:
    spec = parse_interface_spec("mode=cni,cni=mynet,name=lan")
    assert spec == {"mode": "cni", "cni": {"network": "mynet"}, "name": "lan"}
    assert config(interfaces=[spec]).interfaces is not None


# ---- the plan -------------------------------------------------------------------------------


def test_a_cni_network_plans_a_tap_in_the_vms_namespace_and_no_ipam() -> None:
    plan = plan_network(resolve_network(manifest(CNI_NET), config(), DEFAULT), "v")
    assert (plan.tap, plan.attach, plan.ipam, plan.nic, plan.vsock) == (
        True,
        Attachment.CNI,
        IPAM.NONE,
        True,
        True,
    )
    assert (plan.antispoof, plan.observe_ip, plan.kernel_ip_arg, plan.netns) == (
        AntiSpoof.NONE,
        False,
        None,
        True,
    )
    assert plan.to_json()["netns"] is True


@pytest.mark.parametrize("mode", ["bridged", "dhcp", "vsock"])
def test_no_other_mode_runs_in_a_namespace_and_its_plan_json_is_unchanged(mode: str) -> None:
    plan = plan_network(resolve_network(manifest({"mode": mode}), config(), DEFAULT), "v")
    assert not plan.netns and "netns" not in plan.to_json()


def test_a_vm_with_a_cni_interface_runs_in_its_namespace() -> None:
    assert single(CNI_NET).netns
    assert not single({"mode": "dhcp"}).netns


def test_before_a_start_a_cni_interface_has_no_addresses_and_no_boot_args() -> None:
    resolved = single(CNI_NET)
    interface = resolved.interfaces[0].with_mac("02:00:00:00:00:07")
    data = interface.to_json()
    assert (data["mode"], data["cni"], data["addresses"]) == (
        "cni",
        {"network": "mynet", "result": None},
        None,
    )
    assert data["ip"] is None and "policies" not in data
    assert resolved.replaced((interface,)).boot_args("v") is None


def test_a_started_cni_interface_takes_the_plugins_mac_and_every_address() -> None:
    interface = started(single(CNI_NET).interfaces[0])
    assert interface.mac == "0a:58:0a:58:00:05"
    assert interface.plan.kernel_ip_arg == "ip=10.88.0.5::10.88.0.1:255.255.0.0:v:eth0:off"
    data = interface.to_json()
    assert data["addresses"] == ["10.88.0.5/16", "fd00:88::5/64", "fd00:99::5/64"]
    assert data["cni"]["network"] == "mynet"
    assert data["cni"]["result"]["ips"][0]["address"] == "10.88.0.5/16"


def test_the_guest_gets_one_roost_nic_per_address_and_ip_for_a_single_interface() -> None:
    resolved = single(CNI_NET)
    args = resolved.replaced((started(resolved.interfaces[0]),)).boot_args("v")
    assert args is not None
    mac = "0a:58:0a:58:00:05"
    assert args.split() == [
        "ip=10.88.0.5::10.88.0.1:255.255.0.0:v:eth0:off",
        f"roost.nic={mac},10.88.0.5/16,10.88.0.1,name=eth0",
        f"roost.nic={mac},fd00:88::5/64,fd00:88::1",
        f"roost.nic={mac},fd00:99::5/64",
        f"roost.default={mac}",
    ]


def test_several_cni_interfaces_get_no_classic_ip() -> None:
    vm = config(interfaces=[CNI_NET, {"mode": "cni", "cni": {"network": "other"}}])
    resolved = resolve_interfaces(manifest(), vm, DEFAULT, None, vm_name="v")
    first, second = resolved.interfaces
    other = {
        **RESULT,
        "interfaces": [{"name": "eth1", "mac": "0a:58:0a:59:00:06", "sandbox": NETNS}],
        "ips": [{"address": "10.89.0.6/16", "interface": 0}],
    }
    second = second.with_mac("02:00:00:00:00:08").with_cni_result(parse_result(other), 0, "v")
    args = resolved.replaced((started(first), second)).boot_args("v")
    assert args is not None
    assert not args.startswith("ip=")
    assert "roost.nic=0a:58:0a:59:00:06,10.89.0.6/16,name=eth1" in args.split()


def test_a_cni_network_round_trips_through_json_before_and_after_a_start() -> None:
    written = {"mode": "cni", "cni": {"network": "mynet", "args": {"A": "1"}}}
    effective = resolve_network(manifest(written), config(), DEFAULT)
    before = effective.to_json()
    assert before["cni"] == {"network": "mynet", "args": {"A": "1"}, "result": None}
    assert EffectiveNetwork.from_json(before) == effective
    after = effective.with_cni_result(result(), 2)
    data = json.loads(json.dumps(after.to_json()))
    assert data["cni"]["interface"] == 2
    assert EffectiveNetwork.from_json(data) == after
    assert after.cni is not None
    assert after.cni.ips[0].address == ipaddress.ip_interface("10.88.0.5/16")


def test_a_result_without_the_interface_is_refused() -> None:
    effective = resolve_network(manifest(CNI_NET), config(), DEFAULT)
    with pytest.raises(ValueError, match="no interface 3"):
        effective.with_cni_result(result(), 3)


# ---- restarts -------------------------------------------------------------------------------


def version(
    cni: dict[str, Any], started_with: CniResult | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    vm = config(network={"mode": "cni", "cni": cni})
    plan = plan_vm("v", manifest(), vm, DEFAULT)
    interfaces = plan.interfaces
    if started_with is not None:
        interface = interfaces.interfaces[0].with_cni_result(started_with, 2, "v")
        interfaces = interfaces.replaced((interface,))
    network = interfaces.network
    effective = effective_json(plan, network, "qemu", interfaces)
    return effective, vm.model_dump(mode="json", exclude_none=True)


def test_a_cni_result_or_its_mac_never_makes_a_restart_required() -> None:
    assert not needs_restart(*version(MYNET, result()), *version(MYNET))


def test_another_cni_network_or_args_make_a_restart_required() -> None:
    assert needs_restart(*version(MYNET), *version({"network": "other"}))
    assert needs_restart(*version(MYNET), *version({**MYNET, "args": {"A": "1"}}))


# ---- vm plan --------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


PLUGIN = {"name": "p", "version": "1", "initramfs": {"path": "i"}, "network": CNI_NET}


def test_vm_plan_shows_a_cni_networks_addresses_as_decided_by_its_conflist(
    tmp_path: Path,
) -> None:
    plugin = write(tmp_path, "plugin.json", PLUGIN)
    result = CliRunner().invoke(app, ["vm", "plan", "v", "--plugin", str(plugin)])
    assert result.exit_code == 0, result.output
    assert "addresses decided by mynet" in result.stdout
    assert "roost-vm-v" in result.stdout


def test_vm_plan_shows_each_cni_interface_as_decided_by_its_conflist(tmp_path: Path) -> None:
    plugin = write(tmp_path, "plugin.json", PLUGIN)
    result = CliRunner().invoke(
        app,
        [
            *("vm", "plan", "v", "--plugin", str(plugin)),
            *("--interface", "mode=cni,cni=mynet", "--interface", "mode=cni,cni=other"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "addresses decided by mynet" in result.stdout
    assert "addresses decided by other" in result.stdout


def test_vm_plan_json_has_the_cni_interface_with_a_null_result(tmp_path: Path) -> None:
    plugin = write(tmp_path, "plugin.json", PLUGIN)
    result = CliRunner().invoke(app, ["vm", "plan", "v", "--plugin", str(plugin), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    interface = plan["interfaces"][0]
    assert (interface["mode"], interface["cni"], interface["plan"]["attach"]) == (
        "cni",
        {"network": "mynet", "result": None},
        "cni",
    )
