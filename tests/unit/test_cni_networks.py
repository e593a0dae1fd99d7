"""cni networks in the engine's registry, on fakes and a real SQLite database: a conflist
registered under a name, with no bridge made; what planning sees of it; and its removal, refused
while a VM's config names it."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from roost.engine.networks import lookup_in
from roost.errors import ConflictError
from roost.plan.registration import parse_network_create
from roost.plan.registry import NetworkKind
from roost.spec import VMConfig
from roost.state.models import VMConfigVersion
from tests.engine_fakes import World

CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "cninet",
    "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}],
}


def create(world: World, name: str = "cninet") -> dict[str, Any]:
    return world.engine.networks.create(parse_network_create({"name": name, "cni": CONFLIST}))


def events(world: World) -> list[tuple[str, Any]]:
    taken, _, _ = world.engine.events._since(0)
    return [(event.type, event.data.get("network")) for event in taken]


def test_a_cni_network_is_its_conflist_and_no_bridge(world: World) -> None:
    links_before = dict(world.links.links)
    created = create(world)
    assert created == {
        "name": "cninet",
        "kind": "cni",
        "managed": False,
        "bridge": None,
        "subnet": None,
        "gateway": None,
        "ipv6_prefix": None,
        "conflist": CONFLIST,
        "vni": None,
        "mtu": None,
        "leases": [],
    }
    assert world.links.links == links_before
    assert world.engine.networks.show("cninet") == created
    assert created in world.engine.list_networks()
    with pytest.raises(ConflictError, match="already exists"):
        create(world)


def test_planning_finds_a_cni_network_with_its_conflist(world: World) -> None:
    create(world)
    with world.db.read() as session:
        found = lookup_in(session)("cninet")
    assert found is not None
    assert (found.kind, found.managed, found.bridge, found.subnet) == (
        NetworkKind.CNI,
        False,
        None,
        None,
    )
    assert found.conflist is not None and found.conflist.to_json() == CONFLIST


def test_a_cni_network_a_vm_names_is_in_use_until_it_names_it_no_more(world: World) -> None:
    create(world)
    world.engine.create_vm("a", VMConfig(plugin="p"), start=False)

    def name_it(network: str | None) -> None:
        def work(session: Any) -> None:
            version = session.scalar(select(VMConfigVersion))
            effective = dict(version.effective)
            interface = dict(effective["interfaces"][0])
            interface["cni"] = None if network is None else {"network": network, "result": None}
            effective["interfaces"] = [interface]
            version.effective = effective

        world.db.transact(work)

    name_it("cninet")  # as a cni interface's effective JSON names its network
    with pytest.raises(ConflictError) as caught:
        world.engine.networks.remove("cninet")
    assert caught.value.code == "network_in_use"
    assert "a" in caught.value.message
    name_it(None)
    world.engine.networks.remove("cninet")
    assert [e for e in events(world) if e[1] == "cninet"] == [
        ("network.created", "cninet"),
        ("network.removed", "cninet"),
    ]
