"""bench/policy.py's pure helpers: the policy it loads and the figures it prints."""

from __future__ import annotations

import ipaddress

import pytest

from bench.policy import SUBNET, cidr_policy, figures, policy_cidrs, tap_ip, tap_mac, tap_name
from roost.plan.policy import compile_rule
from roost.spec.policy import Direction


def test_policy_cidrs_are_as_many_as_asked_none_touching_another_and_allow_the_bridge() -> None:
    cidrs = policy_cidrs(1000, SUBNET)
    nets = [ipaddress.IPv4Network(cidr) for cidr in cidrs]
    assert len(set(nets)) == 1000
    assert nets[-1] == SUBNET
    assert len(list(ipaddress.collapse_addresses(nets))) == 1000  # nothing merges


def test_policy_cidrs_refuse_what_cannot_be_made() -> None:
    with pytest.raises(ValueError):
        policy_cidrs(0, SUBNET)
    with pytest.raises(ValueError):
        policy_cidrs(5000, SUBNET)


def test_the_cidr_policy_compiles_to_one_rule_with_every_cidr_in_one_set() -> None:
    policy = cidr_policy(1000)
    (body,) = compile_rule(policy.name, Direction.INGRESS, 0, policy.ingress[0], lambda _: None)
    assert body.count("/") == 1000
    assert "ip saddr {" in body


def test_other_taps_have_distinct_names_macs_and_addresses_in_the_subnet() -> None:
    count = 1000
    assert len({tap_name(i) for i in range(count)}) == count
    assert len({tap_mac(i) for i in range(count)}) == count
    addresses = {ipaddress.IPv4Address(tap_ip(i)) for i in range(count)}
    assert len(addresses) == count
    assert all(address in SUBNET for address in addresses)
    assert all(len(tap_name(i)) <= 15 for i in range(count))


def test_figures_compare_the_best_rounds_and_the_p95s() -> None:
    apply_s = {
        1: {"join": [0.001] * 19 + [0.002], "own": [0.002] * 20},
        1000: {"join": [0.002] * 19 + [0.003], "own": [0.005] * 20},
    }
    result = figures([100.0, 200.0], [190.0, 150.0], apply_s)
    assert result["throughput_ratio"] == 0.95
    assert result["apply_ms"]["1"]["join"] == {"p50": 1.0, "p95": 1.0}
    assert result["apply_ms"]["1000"]["own"]["p95"] == 5.0
    assert result["apply_p95_ratio"] == {"join": 2.0, "own": 2.5}
    assert result["meets_targets"] is False  # `own` grew 2.5 times
    assert result["apply_ms_without_antispoofing"] is None
    explained = figures([1.0], [1.0], apply_s, {1: {"join": [0.001]}, 1000: {"join": [0.001]}})
    assert explained["apply_ms_without_antispoofing"]["1000"]["join"]["p95"] == 1.0
    assert explained["apply_p95_ratio"] == {"join": 2.0, "own": 2.5}  # not what is judged
    within = {n: {"join": kinds["join"]} for n, kinds in apply_s.items()}
    assert figures([100.0], [90.0], within)["meets_targets"] is True
