"""Every rule of a network policy as a client writes it, with the exact `loc` of each error."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.errors import InvalidError
from roost.spec.policy import (
    MAX_ADDRESSES,
    MAX_RULES,
    Action,
    PolicyDefaults,
    Protocol,
    parse_policy,
    parse_policy_defaults,
)


def policy(**fields: Any) -> dict[str, Any]:
    return {"name": "web-in", **fields}


def errors_of(data: Any, name: str | None = None) -> dict[str, str]:
    with pytest.raises(InvalidError) as caught:
        parse_policy(data, name)
    return {detail.loc: detail.msg for detail in caught.value.details}


def test_a_policy_keeps_every_field_and_its_cidrs_as_written() -> None:
    parsed = parse_policy(
        policy(
            description="web servers",
            ingress=[
                {
                    "action": "Allow",
                    "protocol": "TCP",
                    "source": ["10.1.0.0/16", "@lan", "192.0.2.7"],
                    "source_port": "1000-2000",
                    "destination_port": 80,
                    "description": "http",
                    "log": True,
                }
            ],
            egress=[{"action": "reject", "protocol": "icmp6", "icmp_type": 128}],
        )
    )
    rule = parsed.ingress[0]
    assert (rule.action, rule.protocol) == (Action.ALLOW, Protocol.TCP)
    assert rule.source == ["10.1.0.0/16", "@lan", "192.0.2.7"]
    assert (rule.source_port, rule.destination_port, rule.log) == ("1000-2000", "80", True)
    assert parsed.egress[0].icmp_type == 128
    assert parsed.description == "web servers"


def test_an_ipv6_cidr_is_kept_as_written_not_normalised() -> None:
    parsed = parse_policy(policy(ingress=[{"action": "drop", "source": ["FD00:0::/8"]}]))
    assert parsed.ingress[0].source == ["FD00:0::/8"]


def test_the_name_of_the_url_fills_a_missing_name_and_must_equal_a_given_one() -> None:
    assert parse_policy({"ingress": []}, "web-in").name == "web-in"
    assert errors_of({"name": "other"}, "web-in") == {
        "name": "is 'other' but the policy being written is 'web-in'; make them equal"
    }


def test_a_policy_name_is_a_dns_label() -> None:
    assert "name" in errors_of({"name": "Web_In"})


@pytest.mark.parametrize(
    ("rule", "loc"),
    [
        ({"action": "allow", "destination": ["10.0.0.0/8"]}, "ingress.0.destination"),
        ({"action": "allow", "source": []}, "ingress.0.source"),
        ({"action": "allow", "source": ["10.0.0.0/8", "fd00::/8"]}, "ingress.0.source"),
        ({"action": "allow", "source_port": "80"}, "ingress.0.source_port"),
        (
            {"action": "allow", "protocol": "icmp4", "destination_port": "80"},
            "ingress.0.destination_port",
        ),
        ({"action": "allow", "protocol": "tcp", "icmp_type": 8}, "ingress.0.icmp_type"),
        ({"action": "allow", "icmp_type": 8}, "ingress.0.icmp_type"),
        ({"action": "allow", "protocol": "icmp4", "source": ["fd00::/8"]}, "ingress.0.source.0"),
        ({"action": "allow", "protocol": "icmp6", "source": ["10.0.0.0/8"]}, "ingress.0.source.0"),
        ({"action": "allow", "source": ["10.0.0.1/8"]}, "ingress.0.source.0"),
        ({"action": "allow", "source": ["10.0.0.0/33"]}, "ingress.0.source.0"),
        ({"action": "allow", "source": ["web"]}, "ingress.0.source.0"),
        ({"action": "allow", "source": ["@Web_1"]}, "ingress.0.source.0"),
        ({"action": "allow", "source": ["10.0.0.0/8", "10.1.0.0/16"]}, "ingress.0.source.1"),
        ({"action": "allow", "source": ["@lan", "@lan"]}, "ingress.0.source.1"),
        ({"action": "allow", "source": [7]}, "ingress.0.source.0"),
        ({"action": "accept"}, "ingress.0.action"),
        ({"action": "allow", "protocol": "sctp"}, "ingress.0.protocol"),
        (
            {"action": "allow", "protocol": "tcp", "destination_port": "70000"},
            "ingress.0.destination_port",
        ),
        (
            {"action": "allow", "protocol": "tcp", "destination_port": "90-80"},
            "ingress.0.destination_port",
        ),
        (
            {"action": "allow", "protocol": "tcp", "destination_port": "080"},
            "ingress.0.destination_port",
        ),
        (
            {"action": "allow", "protocol": "tcp", "destination_port": True},
            "ingress.0.destination_port",
        ),
        ({"action": "allow", "protocol": "icmp4", "icmp_type": 256}, "ingress.0.icmp_type"),
        ({"action": "allow", "protocol": "icmp4", "icmp_type": "8"}, "ingress.0.icmp_type"),
        ({"action": "allow", "log": "yes"}, "ingress.0.log"),
        ({"action": "allow", "description": "x" * 257}, "ingress.0.description"),
        ({"action": "allow", "port": "80"}, "ingress.0.port"),
        ({}, "ingress.0.action"),
    ],
)
def test_an_ingress_rule_breaking_a_rule_is_refused_at_its_field(
    rule: dict[str, Any], loc: str
) -> None:
    assert loc in errors_of(policy(ingress=[rule]))


@pytest.mark.parametrize(
    ("rule", "loc"),
    [
        ({"action": "drop", "source": ["10.0.0.0/8"]}, "egress.1.source"),
        (
            {"action": "drop", "destination": ["192.0.2.0/24", "2001:db8::/32"]},
            "egress.1.destination",
        ),
        (
            {"action": "drop", "destination": ["2001:db8::/32", "2001:db8:1::/48"]},
            "egress.1.destination.1",
        ),
        ({"action": "drop", "protocol": "udp", "icmp_type": 3}, "egress.1.icmp_type"),
    ],
)
def test_an_egress_rule_breaking_a_rule_is_refused_at_its_field(
    rule: dict[str, Any], loc: str
) -> None:
    fine = {"action": "allow", "protocol": "udp", "destination_port": "53"}
    assert loc in errors_of(policy(egress=[fine, rule]))


def test_an_ingress_rule_naming_a_destination_is_told_to_use_source() -> None:
    errors = errors_of(policy(ingress=[{"action": "allow", "destination": ["10.0.0.0/8"]}]))
    assert "move these addresses to source" in errors["ingress.0.destination"]


def test_overlapping_cidrs_name_the_earlier_one() -> None:
    errors = errors_of(
        policy(ingress=[{"action": "drop", "source": ["10.0.0.0/8", "10.9.0.0/24"]}])
    )
    assert errors == {
        "ingress.0.source.1": "10.9.0.0/24 overlaps 10.0.0.0/8 (source.0); keep the wider one"
    }


def test_a_cidr_with_host_bits_suggests_the_network() -> None:
    errors = errors_of(policy(ingress=[{"action": "drop", "source": ["10.9.0.5/24"]}]))
    assert errors == {
        "ingress.0.source.0": "10.9.0.5/24 has host bits set; did you mean 10.9.0.0/24?"
    }


def test_an_ipv4_and_an_ipv6_cidr_of_the_same_bits_do_not_overlap_but_do_mix() -> None:
    errors = errors_of(policy(ingress=[{"action": "drop", "source": ["0.0.0.0/0", "::/0"]}]))
    assert list(errors) == ["ingress.0.source"]


def test_a_network_reference_goes_with_either_family() -> None:
    parsed = parse_policy(
        policy(
            ingress=[
                {"action": "drop", "source": ["@lan", "10.0.0.0/8"]},
                {"action": "drop", "source": ["@lan", "fd00::/8"]},
            ]
        )
    )
    assert len(parsed.ingress) == 2


def test_a_policy_holds_at_most_the_cap_of_rules() -> None:
    rules = [{"action": "allow"}] * (MAX_RULES + 1)
    assert "ingress" in errors_of(policy(ingress=rules))


def test_a_policy_holds_at_most_the_cap_of_addresses() -> None:
    addresses = [f"10.{n // 256}.{n % 256}.0/24" for n in range(MAX_ADDRESSES // 2 + 1)]
    rule = {"action": "drop", "source": addresses}
    errors = errors_of(policy(ingress=[rule, {**rule, "action": "allow"}]))
    assert list(errors) == ["-"]
    assert f"at most {MAX_ADDRESSES}" in errors["-"]


def test_a_policy_must_be_an_object() -> None:
    assert errors_of(["x"]) == {"-": "must be a JSON object"}


def test_defaults_allow_both_directions_and_take_drop() -> None:
    assert parse_policy_defaults({}) == PolicyDefaults(ingress="allow", egress="allow")
    assert parse_policy_defaults({"ingress": " Drop "}).ingress == "drop"


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"ingress": "reject"}, "policy_defaults.ingress"),
        ({"egress": "deny"}, "policy_defaults.egress"),
        ({"both": "drop"}, "policy_defaults.both"),
    ],
)
def test_defaults_breaking_a_rule_are_refused_at_their_field(
    data: dict[str, Any], loc: str
) -> None:
    with pytest.raises(InvalidError) as caught:
        parse_policy_defaults(data)
    assert [detail.loc for detail in caught.value.details] == [loc]


CIDRS = st.builds(
    lambda bits, length: str(ipaddress.ip_network(f"10.0.{bits}.0/{length}", strict=False)),
    st.integers(0, 255),
    st.integers(16, 26),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(CIDRS, max_size=12, unique=True))
def test_an_overlap_is_found_exactly_where_an_earlier_cidr_overlaps(cidrs: list[str]) -> None:
    """Against comparing each CIDR with every earlier one (what the index replaces)."""
    nets = [ipaddress.ip_network(cidr) for cidr in cidrs]
    expected = {i for i, net in enumerate(nets) if any(e.overlaps(net) for e in nets[:i])}
    rule = {"action": "allow", "source": cidrs}
    try:
        parse_policy({"ingress": [rule]}, "p")
        found: set[int] = set()
    except InvalidError as error:
        found = {int(d.loc.rsplit(".", 1)[1]) for d in error.details if "overlaps" in d.msg}
        for detail in error.details:
            if "overlaps" in detail.msg:
                other = int(detail.msg.split("(source.")[1].split(")")[0])
                here = int(detail.loc.rsplit(".", 1)[1])
                assert other < here and nets[other].overlaps(nets[here])
    assert found == expected
