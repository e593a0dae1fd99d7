"""Hosts as an operator steers them (roost.engine.hosts.HostAdmin), on an engine on fakes over
real databases, SQLite and PostgreSQL, with three hosts registered in its `hosts` table: cordon
and uncordon with their events, and drain, which cordons, moves the records of VMs with no VMM
and no disk copy to the emptiest other host (capacity taken there and given back here in one
transaction, a new CID there, addresses and MACs kept) and lists the others with the reason."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, select, text

from roost.engine.hosts import DISK_COPY, HostAdmin
from roost.engine.settings import ClusterSettings
from roost.errors import NotFoundError
from roost.spec import VMConfig
from roost.state import moves
from roost.state.hosts import HostRegistration, Hosts
from roost.state.models import VM, CIDLease
from tests.engine_fakes import World
from tests.harness import wait_for

FRESH = 3600.0  # every heartbeat of this test is fresher than that
BLOCKED = text(
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
)
CLUSTER = ClusterSettings(
    host_name="h1",
    vtep_address="192.0.2.1",
    advertise_api="unix:///run/roost-h1/roost.sock",
    labels={},
    capacity_vcpus=8,
    capacity_memory_mib=4096,
    offline_after=FRESH,
    lost_after=FRESH * 2,
)


@pytest.fixture
def world(tmp_short: Path, migrated_database_url: str) -> Iterator[World]:
    instance = World(tmp_short, database_url=migrated_database_url)
    yield instance
    instance.close()


@pytest.fixture
def hosts(world: World) -> dict[str, int]:
    """Hosts h1, h2 and h3 (8 vCPUs, 4096 MiB each, VMM `fake`): their ids."""
    registry = Hosts(world.db)
    return {
        name: registry.register(
            HostRegistration(
                name=name,
                vtep_address=f"192.0.2.{number}",
                api=f"unix:///run/roost-{name}/roost.sock",
                labels={},
                capacity_vcpus=8,
                capacity_memory_mib=4096,
                facts={"vmms": ["fake"]},
            )
        ).host_id
        for number, name in enumerate(["h1", "h2", "h3"], start=1)
    }


@pytest.fixture
def admin(world: World, hosts: dict[str, int]) -> HostAdmin:
    settings = dataclasses.replace(world.settings, cluster=CLUSTER)
    world.engine.allocator.settings = settings  # its creates reserve what they hold
    return HostAdmin(settings, world.db, world.engine.events, world.engine.allocator)


def create_on(world: World, host_id: int, name: str, *, start: bool) -> dict[str, Any]:
    """VM `name` created on host `host_id` (it holds its plan's resources there)."""
    world.engine.act_as_host(host_id)
    return world.engine.create_vm(name, VMConfig(plugin="p"), start=start)


def held(world: World, name: str) -> tuple[int, int]:
    """What VM `name` holds of its host."""
    with world.db.read() as session:
        vm = session.execute(
            select(VM.reserved_vcpus, VM.reserved_memory_mib).where(VM.name == name)
        ).one()
    assert vm.reserved_vcpus is not None and vm.reserved_memory_mib is not None
    return vm.reserved_vcpus, vm.reserved_memory_mib


def placed(world: World, name: str) -> tuple[int | None, int | None, int | None]:
    """The VM's host, and the host and CID of its CID lease."""
    with world.db.read() as session:
        vm = session.execute(select(VM.id, VM.host_id).where(VM.name == name)).one()
        lease = session.execute(
            select(CIDLease.host_id, CIDLease.cid).where(CIDLease.vm_id == vm.id)
        ).one()
    return vm.host_id, lease.host_id, lease.cid


def allocated(admin: HostAdmin, name: str) -> tuple[int, int]:
    shown = admin.show(name)["allocated"]
    return shown["vcpus"], shown["memory_mib"]


def addresses(vm: dict[str, Any]) -> tuple[Any, Any, Any]:
    network = vm["network"]
    return network["ip"], network["mac"], network["tap"]


def test_the_list_shows_each_host_as_the_issue_writes_it(admin: HostAdmin) -> None:
    listed = admin.list()
    assert [host["name"] for host in listed] == ["h1", "h2", "h3"]
    assert set(listed[0]) == {
        "name",
        "state",
        "vtep_address",
        "api",
        "labels",
        "capacity",
        "allocated",
        "heartbeat_at",
        "epoch",
    }
    assert listed[0]["state"] == "active"
    assert listed[0]["capacity"] == {"vcpus": 8, "memory_mib": 4096}
    assert admin.show("h2") == listed[1]
    with pytest.raises(NotFoundError, match="'h9' is not in the cluster"):
        admin.show("h9")


def test_cordon_and_uncordon_change_the_state_and_tell_it_once(
    admin: HostAdmin, world: World
) -> None:
    async def first_two_events_of(work: Any) -> list[tuple[str, Any]]:
        reader = world.engine.events.subscribe()
        work()
        seen: list[tuple[str, Any]] = []
        while len(seen) < 2:
            got = await reader.next(timeout=30)
            assert got is not None
            seen += [(event.type, event.data.get("host")) for event in got]
        return seen

    def steer() -> None:
        assert admin.cordon("h2", True)["state"] == "cordoned"
        assert admin.cordon("h2", True)["state"] == "cordoned"  # nothing changes, no event
        assert admin.cordon("h2", False)["state"] == "active"

    assert asyncio.run(first_two_events_of(steer)) == [
        ("host.cordoned", "h2"),
        ("host.uncordoned", "h2"),
    ]
    with pytest.raises(NotFoundError, match="'h9'"):
        admin.cordon("h9", True)


def test_a_drain_moves_a_vm_that_never_booted_to_the_emptiest_host_keeping_its_addresses(
    admin: HostAdmin, world: World, hosts: dict[str, int]
) -> None:
    create_on(world, hosts["h2"], "busy", start=False)  # h2 holds more: h3 is the emptiest
    before = create_on(world, hosts["h1"], "idle", start=False)
    _, _, old_cid = placed(world, "idle")

    drained = admin.drain("h1")

    assert drained["host"]["state"] == "cordoned"
    assert not world.db.transact_core(  # no create can take room on it any more
        lambda connection: Hosts.reserve(connection, hosts["h1"], 1, 1, FRESH)
    )
    assert drained["moved"] == [{"vm": "idle", "to": "h3"}]
    assert drained["stayed"] == []
    host_id, lease_host, cid = placed(world, "idle")
    assert (host_id, lease_host) == (hosts["h3"], hosts["h3"])  # its CID is h3's now
    assert cid is not None and old_cid is not None
    assert allocated(admin, "h1") == (0, 0)
    assert allocated(admin, "h3") == held(world, "idle")
    after = world.engine.show_vm("idle")
    assert after["host"] == "h3"
    assert addresses(before)[0] is not None
    assert addresses(after) == addresses(before)


def test_a_drain_leaves_running_vms_and_disk_copies_listed_with_the_reason(
    admin: HostAdmin, world: World, hosts: dict[str, int]
) -> None:
    create_on(world, hosts["h1"], "runs", start=True)
    create_on(world, hosts["h1"], "booted", start=True)  # its plugin has a rootfs: a disk copy
    world.engine.stop_vm("booted", force=True)
    create_on(world, hosts["h1"], "fresh", start=False)

    drained = admin.drain("h1")

    assert drained["moved"] == [{"vm": "fresh", "to": "h2"}]
    assert drained["stayed"] == [
        {"vm": "booted", "reason": DISK_COPY},
        {"vm": "runs", "reason": "running: stop it or remove it"},
    ]
    assert placed(world, "runs")[0] == hosts["h1"]
    vcpus, memory = held(world, "runs")
    assert allocated(admin, "h1") == (vcpus * 2, memory * 2)


def test_a_vm_started_and_stopped_while_the_drain_judged_it_stays_with_its_disk(
    admin: HostAdmin, world: World, hosts: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Judged `created` (no disk copy), then booted (its plugin has a rootfs: a disk copy on
    h1) and stopped before its move: the move judges the locked row again and leaves it on
    h1 with its disk; a second drain says why."""
    create_on(world, hosts["h1"], "fresh", start=False)
    judged = HostAdmin._need

    def judge_then_boot(self: HostAdmin, vm: moves.HostedVM) -> Any:
        need = judged(self, vm)
        world.engine.start_vm(vm.name)
        world.engine.stop_vm(vm.name, force=True)
        return need

    monkeypatch.setattr(HostAdmin, "_need", judge_then_boot)
    drained = admin.drain("h1")
    monkeypatch.undo()

    assert drained["moved"] == []
    assert drained["stayed"] == [
        {"vm": "fresh", "reason": "stopped: changed while the drain judged it; drain again"}
    ]
    assert placed(world, "fresh")[0] == hosts["h1"]
    assert allocated(admin, "h1") == held(world, "fresh")
    assert admin.drain("h1")["stayed"] == [{"vm": "fresh", "reason": DISK_COPY}]


def test_a_vm_no_other_host_has_room_for_stays_and_says_so(
    admin: HostAdmin, world: World, hosts: dict[str, int]
) -> None:
    create_on(world, hosts["h1"], "idle", start=False)
    admin.cordon("h2", True)

    def fill(connection: Connection) -> None:
        assert Hosts.reserve(connection, hosts["h3"], 8, 4096, FRESH)

    world.db.transact_core(fill)

    drained = admin.drain("h1")

    assert drained["moved"] == []
    [stayed] = drained["stayed"]
    assert stayed["vm"] == "idle"
    assert stayed["reason"].startswith("no other host can take it: no active host has room")
    assert placed(world, "idle")[0] == hosts["h1"]
    assert allocated(admin, "h1") == held(world, "idle")  # nothing taken or given back


def test_a_second_drain_moves_nothing_more(
    admin: HostAdmin, world: World, hosts: dict[str, int]
) -> None:
    create_on(world, hosts["h1"], "idle", start=False)
    assert admin.drain("h1")["moved"] == [{"vm": "idle", "to": "h2"}]
    assert admin.drain("h1") == {"host": admin.show("h1"), "moved": [], "stayed": []}


def test_two_drains_at_once_move_each_vm_once_and_keep_the_books(
    admin: HostAdmin, world: World, hosts: dict[str, int]
) -> None:
    names = [f"vm{index}" for index in range(6)]
    for name in names:
        create_on(world, hosts["h1"], name, start=False)
    results: list[dict[str, Any]] = []
    drains = [threading.Thread(target=lambda: results.append(admin.drain("h1"))) for _ in "ab"]
    for thread in drains:
        thread.start()
    for thread in drains:
        thread.join()

    moved = [item["vm"] for result in results for item in result["moved"]]
    assert sorted(moved) == names  # each by one drain or the other
    assert all(result["stayed"] == [] for result in results)
    assert allocated(admin, "h1") == (0, 0)
    sums = [sum(values) for values in zip(*(held(world, name) for name in names), strict=True)]
    shares = [allocated(admin, "h2"), allocated(admin, "h3")]
    assert [sum(values) for values in zip(*shares, strict=True)] == sums
    assert {placed(world, name)[0] for name in names} <= {hosts["h2"], hosts["h3"]}


def test_without_a_cluster_there_are_no_hosts(world: World, hosts: dict[str, int]) -> None:
    admin = HostAdmin(world.settings, world.db, world.engine.events, world.engine.allocator)
    assert admin.list() == []
    with pytest.raises(NotFoundError, match="not part of a cluster"):
        admin.show("h1")
    with pytest.raises(NotFoundError, match="not part of a cluster"):
        admin.drain("h1")


def test_a_removal_racing_a_drains_move_gives_back_what_the_vm_holds_where_it_holds_it(
    admin: HostAdmin, world: World, hosts: dict[str, int]
) -> None:
    """The move commits while the removal waits for the VM's row: the removal then gives back
    the new host's share, not the old host's a second time (which another VM's share there
    would hide from the CHECK)."""
    if not world.db.url.startswith("postgresql"):
        pytest.skip("SQLite's single writer runs them one after the other")
    create_on(world, hosts["h1"], "other", start=False)
    create_on(world, hosts["h1"], "idle", start=False)
    vcpus, memory_mib = held(world, "idle")

    def blocked() -> bool:
        with world.db.read() as session:
            return bool(session.execute(BLOCKED).scalar() == 1)

    removal = threading.Thread(target=world.engine.destroy_vm, args=("idle",))
    with world.db.write() as session:
        vm = next(vm for vm in moves.vms_on(session, hosts["h1"]) if vm.name == "idle")
        assert moves.move(session, vm, hosts["h1"], hosts["h2"], vcpus, memory_mib, FRESH) is None
        removal.start()  # on h1, where the VM was when its request was routed
        wait_for(blocked, what="the removal to wait for the move's locks")
    removal.join()
    assert world.engine.list_vm_names() == ["other"]
    assert allocated(admin, "h1") == held(world, "other")
    assert allocated(admin, "h2") == (0, 0)
