"""The engine's undo paths, with failing fakes for the host and the VMM (and a real SQLite
database): whatever fails, a create leaves nothing and a start leaves the VM `error` with its
leases and nothing of the host."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from roost.errors import HostError, RoostError, VMMFailedError
from roost.spec import VMConfig
from roost.state.db import Database
from tests.engine_fakes import SUBNET, World, failing_commit


def create(world: World, name: str = "vm", **kwargs: Any) -> dict[str, Any]:
    return world.engine.create_vm(name, VMConfig(plugin="p"), **kwargs)


def test_a_create_that_works_holds_its_tap_rules_lease_and_vmm(world: World) -> None:
    vm = create(world)
    assert vm["status"] == "running"
    assert world.links.links == {"rbr1": "bridge", vm["network"]["tap"]: "tap"}
    assert world.firewall.protected == {vm["network"]["tap"]}
    assert world.leases() == {SUBNET: [int(ipaddress.IPv4Address(vm["network"]["ip"]))]}
    world.engine.destroy_vm("vm")
    world.assert_nothing_left("vm")


def test_a_firewall_that_fails_after_the_tap_exists_leaves_nothing(world: World) -> None:
    world.firewall.fail = True
    with pytest.raises(HostError, match="fake failure"):
        create(world)
    world.assert_nothing_left("vm")


def test_a_commit_that_fails_after_the_host_work_leaves_nothing(world: World) -> None:
    with failing_commit(world.db) as failed, pytest.raises(OperationalError):
        create(world)
    assert failed == ["commit"]
    world.assert_nothing_left("vm")


def test_a_vmm_that_dies_during_boot_leaves_nothing(world: World) -> None:
    world.driver.die_during_boot = True
    with pytest.raises(VMMFailedError):
        create(world)
    assert len(world.driver.started) == 1
    world.assert_nothing_left("vm")


@pytest.mark.parametrize("failure", ["firewall", "commit", "boot"])
def test_a_start_that_fails_leaves_the_vm_in_error_with_its_lease_and_nothing_else(
    world: World, failure: str
) -> None:
    created = create(world, start=False)
    leases = world.leases()
    world.firewall.fail = failure == "firewall"
    world.driver.die_during_boot = failure == "boot"
    with contextlib_for(failure, world.db), pytest.raises((RoostError, OperationalError)):
        world.engine.start_vm("vm")
    vm = world.engine.show_vm("vm")
    assert vm["status"] == "error"
    assert vm["status_reason"]
    assert vm["network"]["ip"] == created["network"]["ip"]
    assert world.leases() == leases
    assert world.links.links.keys() <= {"rbr1"}  # at most the bridge its lease keeps
    assert world.firewall.protected == set()
    assert world.engine.live == {}
    assert all(process.child.poll() is not None for process in world.driver.started)


def contextlib_for(failure: str, db: Database) -> Any:
    from contextlib import nullcontext

    return failing_commit(db) if failure == "commit" else nullcontext()
