"""bench/scale.py's pure parts: the steps it creates in, and how its figures meet the targets."""

from __future__ import annotations

from typing import Any

from bench.scale import steps_to, verdict


def figures(rates: list[float], deletes: float, list_p50: float, page_p50: float) -> dict[str, Any]:
    steps = [100, 1_000, 10_000][: len(rates)]
    return {
        "steps": [
            {"vms": vms, "creates_per_second": rate, "daemon_rss_mib": 120.0}
            for vms, rate in zip(steps, rates, strict=True)
        ],
        "deletes_per_second": deletes,
        "at": {
            "1000": {"list_ms": {"p50": list_p50}},
            str(steps[-1]): {
                "list_ms": {"p50": list_p50},
                "first_page_p50_ms": page_p50,
                "middle_page_p50_ms": page_p50,
                "label_page_p50_ms": page_p50,
            },
        },
    }


def test_steps_end_at_the_maximum_and_keep_the_marks_below_it() -> None:
    assert steps_to(10_000) == [100, 1_000, 2_500, 5_000, 10_000]
    assert steps_to(2_000) == [100, 1_000, 2_000]
    assert steps_to(100) == [100]


def test_each_target_is_judged_on_its_own_figure() -> None:
    assert all(verdict(figures([100, 90, 80], 40, 90, 15), 10_000).values())
    failing = verdict(figures([100, 90, 79], 39, 101, 21), 10_000)
    assert failing == {
        "create_rate_ratio": False,
        "delete_rate": False,
        "list_p50_at_1000": False,
        "rss_at_1000": True,
        "page_p50_at_max": False,
    }
