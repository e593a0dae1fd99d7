"""VMs with several interfaces in the engine, on fakes and a real SQLite database: what each
interface holds (address, MAC, tap, rules, IPv6), what the VMM and the guest are given, what a
failed create, a patch and a removal leave, and how the VM shows."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from roost.engine.metrics import MULTI
from roost.engine.recovery import Recovery
from roost.engine.settings import Orphans
from roost.errors import ConflictError, HostError, VMMFailedError
from roost.plan.ipv6 import slaac_address
from roost.plan.registration import parse_network_create
from roost.spec import VMConfig, VMConfigPatch
from tests.engine_fakes import FakeFirewall, World, failing_commit

EXTERNAL_BRIDGE = "br-ext"
LAN = "10.70.0.0/24"
LAN_PREFIX = "fd12:3456:789a:1::/64"


class RecordingFirewall(FakeFirewall):
    """Rules in memory, with what each tap may send; `fail_on` makes that tap's rules fail."""

    def __init__(self) -> None:
        super().__init__()
        self.rules: dict[str, tuple[str, str | None, tuple[str, ...] | None]] = {}
        self.fail_on: str | None = None

    def protect(
        self, tap: str, mac: str, ip: str | None, ipv6: Sequence[str] | None = None
    ) -> None:
        if tap == self.fail_on:
            raise HostError(f"nftables refused the rules of {tap}: a fake failure")
        super().protect(tap, mac, ip)
        self.rules[tap] = (mac, ip, None if ipv6 is None else tuple(ipv6))

    def release(self, tap: str) -> None:
        super().release(tap)
        self.rules.pop(tap, None)


@pytest.fixture
def net_world(world: World) -> World:
    """The world with a managed network `lan` (IPv6 prefix too) and an external one, `ext`,
    on the operator's bridge, and a firewall that says what it was asked."""
    firewall = RecordingFirewall()
    world.firewall = firewall
    world.engine.host.firewall = firewall
    world.links.links[EXTERNAL_BRIDGE] = "bridge"
    networks = world.engine.networks
    networks.create(parse_network_create({"name": "lan", "subnet": LAN, "ipv6_prefix": LAN_PREFIX}))
    networks.create(
        parse_network_create({"name": "ext", "external": True, "bridge": EXTERNAL_BRIDGE})
    )
    return world


TWO = [
    {"mode": "bridged", "network": "lan", "ip": "10.70.0.5"},
    {"mode": "dhcp", "network": "ext", "name": "wan"},
]


def with_interfaces(interfaces: list[dict[str, Any]]) -> VMConfig:
    return VMConfig.model_validate({"plugin": "p", "interfaces": interfaces})


def taps_of(world: World) -> dict[str, str]:
    return {name: kind for name, kind in world.links.links.items() if kind == "tap"}


def lan_bridge(world: World) -> str:
    return str(world.engine.networks.show("lan")["bridge"])


def test_a_vm_with_two_interfaces_has_a_tap_rules_and_a_nic_for_each_in_order(
    net_world: World,
) -> None:
    world = net_world
    vm = world.engine.create_vm("a", with_interfaces(TWO))
    first, second = vm["interfaces"]
    assert vm["network"] is None
    assert (first["name"], first["mode"], first["network"], first["bridge"]) == (
        "eth0",
        "bridged",
        "lan",
        lan_bridge(world),
    )
    assert (first["ip"], first["subnet"], first["gateway"], first["default_route"]) == (
        "10.70.0.5",
        LAN,
        "10.70.0.1",
        True,
    )
    assert (second["name"], second["mode"], second["network"], second["bridge"]) == (
        "wan",
        "dhcp",
        "ext",
        EXTERNAL_BRIDGE,
    )
    assert (second["ip"], second["observed_ip"], second["ipv6"], second["default_route"]) == (
        None,
        None,
        None,
        False,
    )
    assert (first["tap"], second["tap"]) == ("rtap1", "rtap1n1")
    assert set(taps_of(world)) == {"rtap1", "rtap1n1"}
    slaac = str(slaac_address(ipaddress.IPv6Network(LAN_PREFIX), first["mac"]))
    assert first["ipv6"] == {
        "ip": slaac,
        "prefix": LAN_PREFIX,
        "gateway": "fd12:3456:789a:1::1",
        "source": "slaac",
    }
    assert world.firewall.rules == {  # type: ignore[attr-defined]
        "rtap1": (first["mac"], "10.70.0.5", (slaac,)),
        "rtap1n1": (second["mac"], None, None),
    }
    [spec] = world.driver.launched
    assert [(nic.tap, nic.mac) for nic in spec.nics] == [
        ("rtap1", first["mac"]),
        ("rtap1n1", second["mac"]),
    ]
    assert spec.boot_args.endswith(
        f"roost.name=a roost.nic={first['mac']},10.70.0.5/24,10.70.0.1,name=eth0 "
        f"roost.nic={second['mac']},dhcp,name=wan roost.default={first['mac']}"
    )
    assert " ip=" not in spec.boot_args
    effective = world.engine.config("a")["effective"]
    assert effective["network"] is None
    assert [i["mac"] for i in effective["interfaces"]] == [first["mac"], second["mac"]]
    assert world.engine.networks.show("lan")["leases"] == ["10.70.0.5"]


def test_a_single_network_vm_lists_its_one_interface_and_a_vsock_vm_none(world: World) -> None:
    vm = world.engine.create_vm("a", VMConfig(plugin="p"))
    [interface] = vm["interfaces"]
    network = vm["network"]
    for key in ("mode", "ip", "subnet", "gateway", "mac", "tap", "bridge", "observed_ip"):
        assert interface[key] == network[key]
    assert (interface["name"], interface["default_route"], interface["ipv6"]) == (
        "eth0",
        True,
        None,
    )
    assert "roost.nic=" not in world.driver.launched[0].boot_args
    quiet = world.engine.create_vm(
        "q", VMConfig.model_validate({"plugin": "p", "network": {"mode": "vsock"}})
    )
    assert quiet["interfaces"] == []
    assert quiet["network"]["mode"] == "vsock" and quiet["network"]["tap"] is None


def test_a_one_element_interfaces_list_shows_its_network_and_boots_with_roost_nic(
    net_world: World,
) -> None:
    vm = net_world.engine.create_vm("a", with_interfaces(TWO[:1]))
    [interface] = vm["interfaces"]
    assert vm["network"]["ip"] == interface["ip"] == "10.70.0.5"
    args = net_world.driver.launched[0].boot_args
    assert "ip=10.70.0.5::10.70.0.1:255.255.255.0:a:eth0:off" in args  # a lone static one
    assert f"roost.nic={interface['mac']},10.70.0.5/24,10.70.0.1" in args


def test_a_create_whose_second_interface_fails_leaves_nothing(net_world: World) -> None:
    world = net_world
    world.firewall.fail_on = "rtap1n1"  # type: ignore[attr-defined]
    with pytest.raises(HostError):
        world.engine.create_vm("a", with_interfaces(TWO))
    assert taps_of(world) == {}
    assert world.firewall.protected == set()
    assert world.engine.records.names() == set()
    assert world.engine.networks.show("lan")["leases"] == []
    assert world.engine.live == {}


@pytest.mark.parametrize("failure", ["commit", "boot"])
def test_a_create_with_two_interfaces_whose_commit_or_boot_fails_leaves_nothing(
    net_world: World, failure: str
) -> None:
    world = net_world
    world.driver.die_during_boot = failure == "boot"
    failing = failing_commit(world.db) if failure == "commit" else nullcontext([])
    with failing as failed, pytest.raises((OperationalError, VMMFailedError)):
        world.engine.create_vm("a", with_interfaces(TWO))
    assert failed == (["commit"] if failure == "commit" else [])
    assert taps_of(world) == {}
    assert world.firewall.protected == set()
    assert world.engine.records.names() == set()
    assert world.engine.networks.show("lan")["leases"] == []
    assert world.engine.live == {}
    assert not (world.root / "run" / "vms" / "a").exists()
    assert all(process.child.poll() is not None for process in world.driver.started)


def test_a_manual_address_taken_on_the_second_interface_is_refused_and_leaves_nothing(
    net_world: World,
) -> None:
    world = net_world
    world.engine.create_vm("a", with_interfaces(TWO[:1]))
    config = with_interfaces(
        [
            {"mode": "bridged", "subnet": "10.80.0.0/24", "auto_assign": True},
            {"mode": "bridged", "network": "lan", "ip": "10.70.0.5"},
        ]
    )
    with pytest.raises(ConflictError) as caught:
        world.engine.create_vm("b", config)
    assert caught.value.code == "ip_taken"
    assert world.engine.records.names() == {"a"}
    assert set(taps_of(world)) == {"rtap1"}
    assert "10.80.0.0/24" not in world.leases()  # the first interface's on-demand network went


def test_a_mac_another_interface_has_is_refused_naming_its_holder(net_world: World) -> None:
    world = net_world
    mac = world.engine.create_vm("a", with_interfaces(TWO))["interfaces"][1]["mac"]
    config = with_interfaces([{"mode": "dhcp", "network": "ext", "mac": mac}])
    with pytest.raises(ConflictError, match=f"MAC {mac} is already held by interface 1 of VM 'a'"):
        world.engine.create_vm("b", config)
    assert world.engine.records.names() == {"a"}


def test_an_ipv6_address_another_interface_holds_is_refused(net_world: World) -> None:
    world = net_world
    vm = world.engine.create_vm("a", with_interfaces(TWO))
    slaac = vm["interfaces"][0]["ipv6"]["ip"]
    config = with_interfaces([{"mode": "bridged", "network": "lan", "ipv6": slaac}])
    with pytest.raises(ConflictError, match=f"IPv6 address {slaac} is already held"):
        world.engine.create_vm("b", config)
    static = world.engine.create_vm(
        "c",
        with_interfaces([{"mode": "bridged", "network": "lan", "ipv6": "fd12:3456:789a:1::50"}]),
    )
    assert static["interfaces"][0]["ipv6"]["source"] == "static"
    tap = static["interfaces"][0]["tap"]
    assert world.firewall.rules[tap][2] == ("fd12:3456:789a:1::50",)  # type: ignore[attr-defined]


def test_a_patch_of_a_stopped_vm_drops_an_interface_at_once_and_macs_stay_with_their_index(
    net_world: World,
) -> None:
    world = net_world
    vm = world.engine.create_vm("a", with_interfaces(TWO[::-1]), start=False)
    macs = [interface["mac"] for interface in vm["interfaces"]]
    assert world.engine.networks.show("lan")["leases"] == ["10.70.0.5"]
    world.engine.patch_config("a", VMConfigPatch.model_validate({"interfaces": TWO[1:]}))
    assert world.engine.networks.show("lan")["leases"] == []  # interface 1 dropped at once
    world.engine.patch_config("a", VMConfigPatch.model_validate({"interfaces": TWO[::-1]}))
    vm = world.engine.show_vm("a")
    assert [interface["mac"] for interface in vm["interfaces"]] == macs
    started = world.engine.start_vm("a")
    assert [i["tap"] for i in started["interfaces"]] == ["rtap1", "rtap1n1"]


def test_a_patch_of_a_running_vm_applies_its_interfaces_at_the_next_start(
    net_world: World,
) -> None:
    world = net_world
    world.engine.create_vm("a", with_interfaces(TWO))
    moved = [{**TWO[0], "ip": "10.70.0.9"}]
    world.engine.patch_config("a", VMConfigPatch.model_validate({"interfaces": moved}))
    assert world.engine.show_vm("a")["restart_required"] is True
    # the new address is reserved; the running one and the dropped interface's tap stay
    assert world.engine.networks.show("lan")["leases"] == ["10.70.0.5", "10.70.0.9"]
    assert set(taps_of(world)) == {"rtap1", "rtap1n1"}
    world.engine.stop_vm("a")
    assert world.engine.networks.show("lan")["leases"] == ["10.70.0.9"]
    started = world.engine.start_vm("a")
    assert started["network"]["ip"] == "10.70.0.9"
    assert set(taps_of(world)) == {"rtap1"}
    assert len(world.driver.launched[-1].nics) == 1


def test_removing_a_vm_with_two_interfaces_leaves_only_the_networks(net_world: World) -> None:
    world = net_world
    world.engine.create_vm("a", with_interfaces(TWO))
    world.engine.destroy_vm("a")
    assert taps_of(world) == {}
    assert world.firewall.protected == set()
    assert world.engine.networks.show("lan")["leases"] == []
    world.engine.networks.remove("lan")  # no interface uses it any more


def test_a_network_only_a_second_interface_uses_is_in_use(net_world: World) -> None:
    world = net_world
    world.engine.create_vm("a", with_interfaces(TWO[::-1]), start=False)
    with pytest.raises(ConflictError) as caught:
        world.engine.networks.remove("lan")
    assert caught.value.code == "network_in_use"


def test_a_restart_keeps_every_tap_of_a_running_vm_and_watches_each_dhcp_interface(
    tmp_path: Path,
) -> None:
    first = World(tmp_path)
    try:
        first.links.links[EXTERNAL_BRIDGE] = "bridge"
        first.engine.networks.create(parse_network_create({"name": "lan", "subnet": LAN}))
        first.engine.networks.create(
            parse_network_create({"name": "ext", "external": True, "bridge": EXTERNAL_BRIDGE})
        )
        first.engine.create_vm("a", with_interfaces(TWO))
        first.engine.watcher.close()
        again = World(tmp_path, install=False)
        again.links.links.update(first.links.links)  # the same host
        again.links.links["rtap7n1"] = "tap"  # a second interface's tap no VM runs with
        watched: list[tuple[str, str, str]] = []
        again.engine.observer.watch = lambda key, tap, mac: watched.append((key, tap, mac))  # type: ignore[method-assign]
        recovery = Recovery(again.engine, Orphans.REFUSE)
        recovery.check()
        recovery.start().join(10)
        assert recovery.finished.is_set()
        assert set(again.engine.live) == {"a"}
        assert set(taps_of(again)) == {"rtap1", "rtap1n1"}
        mac = again.engine.show_vm("a")["interfaces"][1]["mac"]
        assert watched == [("a#1", "rtap1n1", mac)]
        again.engine.address_observed("a#1", "192.168.9.7")
        assert again.engine.show_vm("a")["interfaces"][1]["observed_ip"] == "192.168.9.7"
        again.close()
    finally:
        first.close()


def test_a_vm_with_several_interfaces_is_counted_as_multi(net_world: World) -> None:
    world = net_world
    world.engine.create_vm("a", with_interfaces(TWO))
    states = {
        (sample.labels["mode"], sample.labels["status"]): sample.value
        for metric in world.engine.metrics._state()
        for sample in metric.samples
        if metric.name == "roost_vms" and sample.labels["vmm"] == "fake"
    }
    assert states[(MULTI, "running")] == 1


def test_a_single_network_and_the_same_one_element_list_hold_the_same_on_the_host(
    net_world: World,
) -> None:
    world = net_world

    def held(vm: dict[str, Any]) -> tuple[Any, ...]:
        [interface] = vm["interfaces"]
        mac, ip, ipv6 = world.firewall.rules[interface["tap"]]  # type: ignore[attr-defined]
        shown = {k: v for k, v in interface.items() if k not in ("tap", "mac", "ipv6")}
        return (shown, vm["network"]["ip"], world.links.links[interface["tap"]], ip, ipv6, mac)

    single = world.engine.create_vm(
        "s", VMConfig.model_validate({"plugin": "p", "network": TWO[0]})
    )
    single_held = held(single)
    slaac = single["interfaces"][0]["ipv6"]["ip"]
    world.engine.destroy_vm("s")
    listed = world.engine.create_vm("l", with_interfaces(TWO[:1]))
    assert held(listed)[:4] == single_held[:4]
    assert single_held[4] == (slaac,)  # each with its own MAC's SLAAC address
    assert held(listed)[4] == (listed["interfaces"][0]["ipv6"]["ip"],)
