"""Creates issued together, through the engine on a real SQLite database (fake host and VMM):
their allocations commit before any tap is made, yet a name or a manual address still goes to
exactly one of them, and the others leave nothing behind."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from roost.errors import ConflictError
from roost.spec import VMConfig
from tests.engine_fakes import SUBNET, World

THREADS = 8
MANUAL_IP = "10.66.0.50"


def together(work: Callable[[int], dict[str, Any]], count: int = THREADS) -> dict[int, str]:
    """Run `work(i)` for each i on its own thread, all released at once: each one's outcome,
    `won` or the code of the conflict it got."""
    outcomes: dict[int, str] = {}
    barrier = threading.Barrier(count)

    def attempt(index: int) -> None:
        barrier.wait()
        try:
            work(index)
            outcomes[index] = "won"
        except ConflictError as error:
            outcomes[index] = error.code

    threads = [threading.Thread(target=attempt, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def assert_only(world: World, names: set[str]) -> None:
    """Exactly the VMs `names` exist, each running with its own tap, rules and lease, and
    nothing of any other create is left: no pending create, run dir, tap, lease or VMM."""
    engine = world.engine
    assert engine.records.names() == names
    assert engine.records.pending_creates() == set()
    taps = {engine.show_vm(name)["network"]["tap"] for name in names}
    assert {link for link, kind in world.links.links.items() if kind == "tap"} == taps
    assert world.firewall.protected == taps
    assert sum(len(ips) for ips in world.leases().values()) == len(names)
    assert {path.name for path in (world.root / "run" / "vms").iterdir()} == names
    running = [process for process in world.driver.started if process.child.poll() is None]
    assert len(running) == len(names)
    assert set(engine.live) == names


def test_parallel_creates_of_one_name_have_one_winner_and_leave_nothing_else(
    world: World,
) -> None:
    outcomes = together(lambda _: world.engine.create_vm("same", VMConfig(plugin="p")))
    assert sorted(outcomes.values()).count("won") == 1
    assert set(outcomes.values()) <= {"won", "vm_busy", "exists"}
    assert_only(world, {"same"})


def test_parallel_creates_of_one_manual_address_have_one_winner_and_leave_nothing_else(
    world: World,
) -> None:
    network = {"mode": "bridged", "subnet": SUBNET, "gateway": "10.66.0.1", "ip": MANUAL_IP}
    outcomes = together(
        lambda index: world.engine.create_vm(f"vm{index}", VMConfig(plugin="p", network=network))
    )
    assert sorted(outcomes.values()) == ["ip_taken"] * (THREADS - 1) + ["won"]
    [winner] = [f"vm{index}" for index, outcome in outcomes.items() if outcome == "won"]
    assert world.engine.show_vm(winner)["network"]["ip"] == MANUAL_IP
    assert_only(world, {winner})


def test_parallel_creates_of_different_names_all_start_and_parallel_removes_leave_nothing(
    world: World,
) -> None:
    names = {f"vm{index}" for index in range(THREADS)}
    outcomes = together(lambda index: world.engine.create_vm(f"vm{index}", VMConfig(plugin="p")))
    assert set(outcomes.values()) == {"won"}
    ips = {world.engine.show_vm(name)["network"]["ip"] for name in names}
    assert len(ips) == THREADS
    assert_only(world, names)

    def remove(index: int) -> dict[str, Any]:
        world.engine.destroy_vm(f"vm{index}")
        return {}

    assert set(together(remove).values()) == {"won"}
    world.assert_nothing_left("vm0")
