"""The benchmarks' pure helpers: the figures they print are only as right as these."""

from __future__ import annotations

import ipaddress
import os
import time

import httpx
import pytest

from bench._common import cpu_seconds, expect, latency_ms, percentile, schedstat_ns
from bench.create import VMS, Round, _summary, ip_boot_arg
from bench.ipam import allocatable
from bench.memory import memory_fields, per_vm_kib, rss_kib, spread_mib, vmm_memory_kib
from bench.vsock import Sample, figures


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
    slow, fast = Round(VMS, seconds=4.0, cpu_seconds=0.8), Round(VMS, seconds=2.0)
    for value in (0.1, 0.3):
        slow.add("create", value)
    fast.add("create", 0.2)
    summary = _summary([slow, fast])
    assert summary["vms_per_second"] == VMS / 2.0
    assert summary["median_vms_per_second"] == (VMS / 4.0 + VMS / 2.0) / 2
    assert summary["phase_median_ms"] == {"create": 200.0}
    assert summary["cpu_ms_per_vm"] == round(0.4 / VMS * 1000, 1)
    assert "remove_vms_per_second" not in summary  # the bare side's removal is not timed


def test_summary_takes_the_fastest_removal_of_rounds_that_timed_one() -> None:
    rounds = [Round(8, seconds=1.0, remove_seconds=0.5), Round(8, seconds=1.0, remove_seconds=0.4)]
    summary = _summary(rounds)
    assert summary["remove_vms_per_second"] == 20.0
    assert summary["remove_round_seconds"] == [0.5, 0.4]


def test_latency_ms_is_nearest_rank_in_milliseconds() -> None:
    samples = [i / 1000 for i in range(1, 201)]  # 1 ms .. 200 ms
    assert latency_ms(samples) == {"p50": 100.0, "p99": 198.0, "max": 200.0}


def test_schedstat_ns_reads_the_time_on_a_cpu() -> None:
    assert schedstat_ns("130889 2024 17\n") == 130889
    with pytest.raises(ValueError):
        schedstat_ns("")


def test_cpu_seconds_counts_this_process() -> None:
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.04


def test_vsock_figures_compare_the_best_transfers_and_judge_the_targets() -> None:
    mib = 1 << 20
    seconds = {
        ("vsock", "host_to_guest"): [2.0, 1.0],  # 64 MiB: best 64 MiB/s
        ("vsock", "guest_to_host"): [0.5],  # 128 MiB/s
        ("nic", "host_to_guest"): [0.8],  # 80 MiB/s
        ("nic", "guest_to_host"): [0.5, 1.0],  # 128 MiB/s
        ("api", "host_to_guest"): [4.0],
        ("api", "guest_to_host"): [4.0],
    }
    samples = {
        key: [Sample(value, {"backend": value / 2}) for value in values]
        for key, values in seconds.items()
    }
    result = figures(samples, 64 * mib, 2, [0.004] * 10, [0.009] * 10, "tcg", [])
    assert result["vsock_host_to_guest_mib_s"] == 64.0
    assert result["nic_host_to_guest_mib_s"] == 80.0
    assert result["throughput_ratio_host_to_guest"] == 0.8
    assert result["throughput_ratio_guest_to_host"] == 1.0
    assert result["round_mib_s"]["vsock_host_to_guest"] == [32.0, 64.0]
    assert result["cpu_share_of_best"]["vsock_host_to_guest"] == {"backend": 0.5}
    assert result["cpu_ms_per_mib_of_best"]["vsock_host_to_guest"] == {"backend": 7.81}
    assert result["connect_uds_ms"]["p50"] == 4.0
    assert result["meets_targets"] is True
    slow = figures(samples, 64 * mib, 2, [0.006] * 10, [0.009] * 10, "tcg", [])
    assert slow["meets_targets"] is False  # uds set-up p50 over 5 ms


def test_vsock_figures_without_the_api_are_null_there() -> None:
    samples = {
        (path, direction): [Sample(1.0)]
        for path in ("vsock", "nic")
        for direction in ("host_to_guest", "guest_to_host")
    }
    result = figures(samples, 1 << 20, 1, [0.001], [], "tcg", [])
    assert result["api_host_to_guest_mib_s"] is None
    assert result["connect_api_ms"] is None
    assert result["vsock_host_to_guest_mib_s"] == 1.0
    assert result["meets_targets"] is True


def test_expect_gives_the_json_body_of_the_status_asked_for_and_names_any_other() -> None:
    request = httpx.Request("POST", "http://roost/v1/vms")
    assert expect(httpx.Response(201, json={"name": "v1"}, request=request), 201) == {"name": "v1"}
    assert expect(httpx.Response(204, request=request), 204) == {}
    with pytest.raises(RuntimeError, match=r"POST /v1/vms: 409 .*conflict"):
        expect(httpx.Response(409, json={"error": {"code": "conflict"}}, request=request), 201)


def test_memory_fields_reads_the_kib_lines_of_a_rollup_and_leaves_out_the_rest() -> None:
    rollup = (
        "56427f3ef000-7fff0e5a5000 ---p 00000000 00:00 0                          [rollup]\n"
        "Rss:                1688 kB\n"
        "Pss:                 267 kB\n"
        "Private_Dirty:        84 kB\n"
        "THPeligible:           0\n"
    )
    assert memory_fields(rollup) == {"Rss": 1688, "Pss": 267, "Private_Dirty": 84}


def test_rss_kib_and_vmm_memory_kib_read_this_process() -> None:
    assert rss_kib(os.getpid()) > 0
    mine = vmm_memory_kib(os.getpid())  # a process may always read its own smaps_rollup
    assert 0 < mine["private"] <= mine["pss"] <= mine["rss"]


def test_per_vm_kib_spreads_the_growth_over_the_vms_added() -> None:
    assert per_vm_kib(100_000, 100_500, 20) == 25.0
    assert per_vm_kib(100_000, 99_000, 50) == -20.0  # a process can shrink meanwhile


def test_spread_mib_gives_median_extremes_and_sum_in_mib() -> None:
    assert spread_mib([1024, 2048, 4096]) == {"median": 2.0, "min": 1.0, "max": 4.0, "sum": 7.0}
