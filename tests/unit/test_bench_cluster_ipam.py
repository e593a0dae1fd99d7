"""bench/cluster_ipam.py's pure helpers: how clients are dealt VMs and how a run's figures are
made."""

from __future__ import annotations

from bench.cluster_ipam import Run, split


def test_split_deals_every_item_once_round_robin() -> None:
    assert split(range(7), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert split([1, 2], 4) == [[1], [2], [], []]


def test_run_figures_count_allocations_per_second_of_wall_time() -> None:
    run = Run(8, seconds=[0.001 * n for n in range(1, 101)], wall=0.5)
    run.addresses = [f"10.0.0.{n}" for n in range(100)]
    figures = run.figures()
    assert figures["allocations"] == 100
    assert figures["allocations_per_second"] == 200.0
    assert (figures["p50_ms"], figures["p99_ms"], figures["max_ms"]) == (50.0, 99.0, 100.0)
    assert figures["distinct"] is True
    assert figures["errors"] == 0


def test_run_figures_say_when_an_address_was_handed_out_twice() -> None:
    run = Run(2, seconds=[0.01, 0.01], addresses=["10.0.0.2", "10.0.0.2"], wall=0.02)
    run.errors.append("network_full")
    figures = run.figures()
    assert figures["distinct"] is False
    assert figures["errors"] == 1
