"""The benchmarks' pure helpers: the figures they print are only as right as these."""

from __future__ import annotations

import ipaddress

import pytest

from bench._common import percentile
from bench.create import VMS, Round, _summary, ip_boot_arg
from bench.ipam import allocatable


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([3.0, 1.0, 2.0, 4.0], 50, 2.0),
        ([float(v) for v in range(1, 1001)], 99, 990.0),
        ([float(v) for v in range(1, 1001)], 100, 1000.0),
        ([7.0], 1, 7.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], 0), ([1.0], 101)])
def test_percentile_refuses_nonsense(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, q)


def test_allocatable_leaves_out_network_broadcast_and_gateway() -> None:
    assert allocatable(ipaddress.IPv4Network("10.200.0.0/16")) == 65_533
    assert allocatable(ipaddress.IPv4Network("10.200.0.0/24")) == 253


def test_ip_boot_arg_matches_the_kernels_format() -> None:
    arg = ip_boot_arg(
        ipaddress.IPv4Address("10.211.0.7"), ipaddress.IPv4Network("10.211.0.0/24"), "b0-5"
    )
    assert arg == "ip=10.211.0.7::10.211.0.1:255.255.255.0:b0-5:eth0:off"


def test_summary_takes_the_best_round_and_per_phase_medians() -> None:
    slow, fast = Round(seconds=4.0, cpu_seconds=0.8), Round(seconds=2.0)
    for value in (0.1, 0.3):
        slow.add("create", value)
    fast.add("create", 0.2)
    summary = _summary([slow, fast])
    assert summary["vms_per_second"] == VMS / 2.0
    assert summary["median_vms_per_second"] == (VMS / 4.0 + VMS / 2.0) / 2
    assert summary["phase_median_ms"] == {"create": 200.0}
    assert summary["cpu_ms_per_vm"] == round(0.4 / VMS * 1000, 1)
