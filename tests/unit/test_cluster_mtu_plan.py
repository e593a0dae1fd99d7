"""A cluster network's MTU in the plan: the default and on-demand networks take the overlay's
1450 in a cluster (none on a single host), a named network the MTU its lookup gives; it is kept
in the stored effective network only where set, and reaches the guest as `roost.nic=...,mtu=`
beside the classic `ip=` (a single-host guest's arguments stay `ip=` alone). `network show`
lists a cluster network's VNI and MTU, a single host's output is unchanged."""

from __future__ import annotations

import ipaddress

import pytest

from roost.cli.networks import show_network
from roost.plan.interfaces import ResolvedInterfaces, resolve_interfaces
from roost.plan.network import OVERLAY_MTU, DefaultNetwork, EffectiveNetwork
from roost.plan.registry import NetworkKind, RegisteredNetwork
from roost.spec import Manifest, VMConfig
from roost.spec.parse import parse

LAN = RegisteredNetwork(
    "lan",
    NetworkKind.MANAGED,
    "rbr2",
    ipaddress.IPv4Network("10.59.0.0/24"),
    ipaddress.IPv4Address("10.59.0.1"),
    None,
    mtu=1450,
)
MAC = "02:00:00:00:00:07"


def resolved(network: dict[str, object] | None, *, cluster: bool) -> ResolvedInterfaces:
    manifest = parse(Manifest, {"name": "p", "version": "1", "initramfs": {"path": "i"}})
    config = None if network is None else parse(VMConfig, {"plugin": "p", "network": network})
    default = DefaultNetwork.from_cidr(cluster=cluster)
    return resolve_interfaces(manifest, config, default, {"lan": LAN}.get, vm_name="vm1")


def allocated(interfaces: ResolvedInterfaces, ip: str) -> ResolvedInterfaces:
    [one] = interfaces.interfaces
    return interfaces.replaced((one.with_ip(ipaddress.IPv4Address(ip), "vm1").with_mac(MAC),))


def test_the_overlay_mtu_leaves_room_for_vxlan_on_a_1500_byte_underlay() -> None:
    assert OVERLAY_MTU + 50 == 1500
    assert DefaultNetwork.from_cidr(cluster=True).mtu == 1450
    assert DefaultNetwork.from_cidr().mtu is None


@pytest.mark.parametrize(
    ("network", "cluster", "mtu"),
    [
        (None, True, 1450),  # the default network
        (
            {"mode": "bridged", "subnet": "10.70.0.0/24", "auto_assign": True},
            True,
            1450,
        ),  # on demand
        ({"mode": "bridged", "network": "lan"}, False, 1450),  # as the lookup says
        (None, False, None),
        ({"mode": "bridged", "subnet": "10.70.0.0/24", "auto_assign": True}, False, None),
    ],
)
def test_a_bridged_interface_takes_its_networks_mtu(
    network: dict[str, object] | None, cluster: bool, mtu: int | None
) -> None:
    [interface] = resolved(network, cluster=cluster).interfaces
    assert interface.effective.mtu == mtu


def test_the_mtu_is_stored_only_where_set() -> None:
    [sized] = resolved(None, cluster=True).interfaces
    assert sized.effective.to_json()["mtu"] == 1450
    assert EffectiveNetwork.from_json(sized.effective.to_json()) == sized.effective
    [plain] = resolved(None, cluster=False).interfaces
    assert "mtu" not in plain.effective.to_json()
    assert EffectiveNetwork.from_json(plain.effective.to_json()).mtu is None


def test_a_cluster_guest_gets_its_mtu_on_roost_nic_beside_the_classic_ip() -> None:
    args = allocated(resolved(None, cluster=True), "10.57.0.9").boot_args("vm1")
    assert args is not None
    assert args.split() == [
        "ip=10.57.0.9::10.57.0.1:255.255.255.0:vm1:eth0:off",
        f"roost.nic={MAC},10.57.0.9/24,10.57.0.1,name=eth0,mtu=1450",
        f"roost.default={MAC}",
    ]
    single_host = allocated(resolved(None, cluster=False), "10.57.0.9").boot_args("vm1")
    assert single_host == "ip=10.57.0.9::10.57.0.1:255.255.255.0:vm1:eth0:off"


def network_json(**fields: object) -> dict[str, object]:
    return {
        "name": "lan",
        "kind": "managed",
        "managed": True,
        "bridge": "rbr2",
        "subnet": "10.59.0.0/24",
        "gateway": "10.59.0.1",
        "ipv6_prefix": None,
        "conflist": None,
        "leases": [],
        **fields,
    }


def test_network_show_lists_a_cluster_networks_vni_and_mtu_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    show_network(network_json(vni=2, mtu=1450))
    shown = capsys.readouterr().out.splitlines()
    assert "vni          2" in shown and "mtu          1450" in shown
    show_network(network_json(vni=None, mtu=None))
    assert not [line for line in capsys.readouterr().out.splitlines() if line[:3] in ("vni", "mtu")]
