"""With --nat, a managed network is masqueraded while its bridge exists, and the operator's
dhcp bridge never is: the hooks in HostNetwork, on fake links."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from roost.engine.hostnet import HostNetwork, TapPlan
from roost.engine.steps import Steps
from roost.plan import AntiSpoof, Attachment
from tests.engine_fakes import FakeFirewall, FakeLinks

SUBNET = ipaddress.IPv4Network("10.66.0.0/24")


class FakeNat:
    def __init__(self) -> None:
        self.chains: dict[str, ipaddress.IPv4Network] = {}

    def add(self, bridge: str, subnet: ipaddress.IPv4Network) -> None:
        self.chains[bridge] = subnet

    def remove(self, bridge: str) -> None:
        self.chains.pop(bridge, None)

    def reconcile(self, networks: Mapping[str, ipaddress.IPv4Network]) -> None:
        self.chains = dict(networks)


def tap(name: str, bridge: str, attach: Attachment) -> TapPlan:
    managed = attach is Attachment.MANAGED
    return TapPlan(
        tap=name,
        mac="02:00:00:00:00:01",
        bridge=bridge,
        network_id=1 if managed else None,
        attach=attach,
        gateway=ipaddress.IPv4Interface("10.66.0.1/24") if managed else None,
        antispoof=AntiSpoof.NONE,
        ip=None,
    )


def host(leased: bool = False) -> tuple[HostNetwork, FakeLinks, FakeNat]:
    links, nat = FakeLinks(), FakeNat()
    return HostNetwork(links, FakeFirewall(), lambda _: leased, nat), links, nat


def test_a_managed_bridge_is_masqueraded_while_it_exists() -> None:
    network, links, nat = host()
    network.attach(Steps("create", "a"), tap("rtap1", "rbr1", Attachment.MANAGED))
    assert nat.chains == {"rbr1": SUBNET}
    network.release("rtap1")
    network.remove_bridges([(1, "rbr1")])
    assert nat.chains == {}
    assert "rbr1" not in links.links


def test_the_operators_dhcp_bridge_is_never_masqueraded() -> None:
    network, links, nat = host()
    links.links["brdhcp"] = "bridge"
    network.attach(Steps("create", "a"), tap("rtap1", "brdhcp", Attachment.EXTERNAL))
    network.reap(set, set)
    network.reconcile_nat(lambda: {})
    assert nat.chains == {}
    assert links.links == {"brdhcp": "bridge"}


def test_start_up_removes_the_rules_of_gone_bridges_and_restores_missing_ones() -> None:
    network, links, nat = host()
    links.links.update({"rbr1": "bridge", "rbr2": "bridge"})
    nat.chains = {"rbr1": SUBNET, "rbr3": ipaddress.IPv4Network("10.3.0.0/24")}
    network.reap(set, lambda: {"rbr2"})  # rbr1 holds no address: it goes
    assert nat.chains == {"rbr3": ipaddress.IPv4Network("10.3.0.0/24")}
    network.reconcile_nat(
        lambda: {
            "rbr2": ipaddress.IPv4Network("10.2.0.0/24"),
            "rbr3": ipaddress.IPv4Network("10.3.0.0/24"),  # its bridge is gone
        }
    )
    assert nat.chains == {"rbr2": ipaddress.IPv4Network("10.2.0.0/24")}
