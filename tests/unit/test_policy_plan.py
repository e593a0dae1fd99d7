"""Policies compiled to nftables statements: the order of evaluation, one address family per
rule, `@network` expansion, logging and counters, and where the chains sit against
anti-spoofing."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.errors import InvalidError
from roost.host.firewall import BASE as ANTISPOOF_BASE
from roost.plan.policy import (
    ANTISPOOF_PRIORITY,
    BR_NETFILTER_PRIORITY,
    BRIDGE_TABLE,
    NetworkAddresses,
    TapPolicies,
    attachment_name,
    base_ruleset,
    compile_rule,
    compile_tap,
    parse_comment,
    parse_default_comment,
    rule_comment,
    transaction,
)
from roost.spec.policy import Direction, Policy, PolicyDefaults, parse_policy

NETWORKS: dict[str, NetworkAddresses] = {
    "lan": (ipaddress.IPv4Network("10.9.0.0/24"), ipaddress.IPv6Network("fd09::/64")),
    "v4only": (ipaddress.IPv4Network("10.8.0.0/24"), None),
}


def lookup(name: str) -> NetworkAddresses | None:
    return NETWORKS.get(name)


def web(**fields: Any) -> Policy:
    return parse_policy({"name": "web", **fields})


def rules_of(lines: list[str], chain: str) -> list[str]:
    prefix = f"add rule {BRIDGE_TABLE} {chain} "
    return [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]


def base_chains(lines: list[str]) -> dict[str, tuple[str, str, int]]:
    """name → (family, hook, priority) of every base chain the statements make."""
    found = {}
    for line in lines:
        made = re.match(
            r"add chain (\w+) \w+ ([\w-]+) \{ type filter hook (\w+) priority (-?\d+);", line
        )
        if made:
            found[made.group(2)] = (made.group(1), made.group(3), int(made.group(4)))
    return found


def test_an_attachment_runs_drop_then_reject_then_allow_of_every_policy_then_the_default() -> None:
    defaults = PolicyDefaults(ingress="drop")
    lines = compile_tap(
        "tap1",
        [web(ingress=[{"action": "allow"}]), parse_policy({"name": "ops"})],
        defaults,
        lookup,
    )
    attachment = attachment_name(("web", "ops"), defaults)
    assert rules_of(lines, f"{attachment}-in") == [
        "jump p-web-in-drop",
        "jump p-ops-in-drop",
        "jump p-web-in-reject",
        "jump p-ops-in-reject",
        "jump p-web-in-allow",
        "jump p-ops-in-allow",
        f'ether type ip counter drop comment "default ingress {attachment}"',
        f'ether type ip6 counter drop comment "default ingress {attachment}"',
    ]
    assert rules_of(lines, f"{attachment}-out")[-1] == (
        f'ether type ip6 counter accept comment "default egress {attachment}"'
    )
    assert f'add element {BRIDGE_TABLE} ingress_taps {{ "tap1" : jump {attachment}-in }}' in lines
    assert f'add element {BRIDGE_TABLE} egress_taps {{ "tap1" : jump {attachment}-out }}' in lines


def test_the_attachment_depends_on_the_order_of_policies_and_on_the_defaults() -> None:
    names = {
        attachment_name(("a", "b"), PolicyDefaults()),
        attachment_name(("b", "a"), PolicyDefaults()),
        attachment_name(("a", "b"), PolicyDefaults(egress="drop")),
        attachment_name(("a",), PolicyDefaults()),
    }
    assert len(names) == 4


def test_established_traffic_is_accepted_before_any_tap_is_dispatched() -> None:
    lines = base_ruleset()
    for chain, dispatch in (("egress", "iifname vmap"), ("ingress_forward", "oifname vmap")):
        rules = rules_of(lines, chain)
        established = next(i for i, rule in enumerate(rules) if "0x80000000 accept" in rule)
        assert established < next(i for i, rule in enumerate(rules) if rule.startswith(dispatch))


def test_each_action_compiles_to_its_verdict_with_a_counter_named_by_the_rule() -> None:
    policy = web(
        ingress=[
            {"action": "allow", "protocol": "tcp", "destination_port": "80"},
            {"action": "drop", "protocol": "udp", "source_port": "1000-2000"},
            {"action": "reject", "protocol": "icmp4", "icmp_type": 8},
        ]
    )
    lines = compile_tap("tap1", [policy], PolicyDefaults(), lookup)
    assert rules_of(lines, "p-web-in-allow") == [
        'ether type ip meta l4proto tcp tcp dport 80 counter accept comment "web ingress 0"',
        'ether type ip6 meta l4proto tcp tcp dport 80 counter accept comment "web ingress 0"',
    ]
    assert rules_of(lines, "p-web-in-drop") == [
        'ether type ip meta l4proto udp udp sport 1000-2000 counter drop comment "web ingress 1"',
        'ether type ip6 meta l4proto udp udp sport 1000-2000 counter drop comment "web ingress 1"',
    ]
    assert rules_of(lines, "p-web-in-reject") == [
        "ether type ip meta l4proto icmp icmp type 8 counter "
        'meta mark set meta mark | 0x40000000 accept comment "web ingress 2"'
    ]


def test_a_rule_with_only_ipv4_addresses_matches_no_ipv6_traffic() -> None:
    rule = web(ingress=[{"action": "allow", "source": ["10.0.0.0/8"]}]).ingress[0]
    assert compile_rule("web", Direction.INGRESS, 0, rule, lookup) == [
        'ether type ip ip saddr { 10.0.0.0/8 } counter accept comment "web ingress 0"'
    ]


def test_a_network_reference_expands_per_family_and_merges_with_cidrs_it_overlaps() -> None:
    rule = web(egress=[{"action": "drop", "destination": ["@lan", "10.9.0.128/25"]}]).egress[0]
    assert compile_rule("web", Direction.EGRESS, 0, rule, lookup) == [
        'ether type ip ip daddr { 10.9.0.0/24 } counter drop comment "web egress 0"',
        'ether type ip6 ip6 daddr { fd09::/64 } counter drop comment "web egress 0"',
    ]


def test_a_network_without_an_ipv6_prefix_adds_nothing_to_ipv6() -> None:
    rule = web(ingress=[{"action": "drop", "source": ["@v4only"]}]).ingress[0]
    assert [
        line.split(" ")[2] for line in compile_rule("web", Direction.INGRESS, 0, rule, lookup)
    ] == ["ip"]


def test_a_missing_network_is_refused_at_its_place_in_the_rule() -> None:
    rule = web(ingress=[{"action": "drop", "source": ["10.0.0.0/8", "@gone"]}]).ingress[0]
    with pytest.raises(InvalidError) as caught:
        compile_rule("web", Direction.INGRESS, 3, rule, lookup)
    assert [d.loc for d in caught.value.details] == ["ingress.3.source.1"]


def test_a_logged_rule_logs_through_nflog_with_a_rate_limit_before_its_verdict() -> None:
    rule = web(ingress=[{"action": "drop", "protocol": "icmp6", "log": True}]).ingress[0]
    logged, verdict = compile_rule("web", Direction.INGRESS, 0, rule, lookup, log_group=7)
    assert logged == (
        "ether type ip6 meta l4proto ipv6-icmp limit rate 10/second burst 20 packets "
        'log group 7 prefix "roost web ingress.0 drop: "'
    )
    assert verdict.endswith('counter drop comment "web ingress 0"')


def test_a_rule_comment_reads_back_as_policy_direction_and_index() -> None:
    assert parse_comment(rule_comment("web-in", Direction.EGRESS, 12)) == (
        "web-in",
        Direction.EGRESS,
        12,
    )
    assert parse_comment("default ingress a-1") is None
    assert parse_default_comment("default egress a-1") == ("a-1", Direction.EGRESS)


TAP1 = TapPolicies("tap1", ("web",), PolicyDefaults())
ATTACHMENT = TAP1.attachment


def test_a_tap_joining_an_attachment_in_use_is_one_map_element_per_direction() -> None:
    planned = transaction(current={"tap0": ATTACHMENT}, taps=[TAP1], lookup=lookup)
    assert planned.lines == [
        f'add element {BRIDGE_TABLE} ingress_taps {{ "tap1" : jump {ATTACHMENT}-in }}',
        f'add element {BRIDGE_TABLE} egress_taps {{ "tap1" : jump {ATTACHMENT}-out }}',
    ]
    assert planned.taps == {"tap0": ATTACHMENT, "tap1": ATTACHMENT}


def test_attaching_a_tap_as_it_is_changes_nothing() -> None:
    assert transaction(current={"tap1": ATTACHMENT}, taps=[TAP1], lookup=lookup).lines == []


COMMENT = '"web; default drop in, allow out"'


def test_a_tap_moving_to_another_attachment_replaces_its_elements_and_the_unused_one_goes() -> None:
    moved = TapPolicies("tap1", ("web",), PolicyDefaults(ingress="drop"))
    lines = transaction(current={"tap1": ATTACHMENT}, taps=[moved], lookup=lookup).lines
    delete = f'delete element {BRIDGE_TABLE} ingress_taps {{ "tap1" }}'
    add = f'add element {BRIDGE_TABLE} ingress_taps {{ "tap1" : jump {moved.attachment}-in }}'
    assert (
        lines.index(f"add chain {BRIDGE_TABLE} {moved.attachment}-in {{ comment {COMMENT}; }}")
        < lines.index(delete)
        < lines.index(add)
    )
    assert lines[-4:] == [
        f"flush chain {BRIDGE_TABLE} {ATTACHMENT}-in",
        f"delete chain {BRIDGE_TABLE} {ATTACHMENT}-in",
        f"flush chain {BRIDGE_TABLE} {ATTACHMENT}-out",
        f"delete chain {BRIDGE_TABLE} {ATTACHMENT}-out",
    ]


def test_removing_a_tap_keeps_an_attachment_others_use_and_ignores_unknown_taps() -> None:
    planned = transaction(
        current={"tap0": ATTACHMENT, "tap1": ATTACHMENT},
        removed_taps=["tap1", "tap9"],
        lookup=lookup,
    )
    assert planned.lines == [
        f'delete element {BRIDGE_TABLE} ingress_taps {{ "tap1" }}',
        f'delete element {BRIDGE_TABLE} egress_taps {{ "tap1" }}',
    ]
    assert planned.taps == {"tap0": ATTACHMENT}


def test_a_transaction_makes_policies_before_taps_and_removes_taps_before_policies() -> None:
    planned = transaction(
        current={"tap2": "a-old"},
        policies=[web()],
        taps=[TAP1],
        removed_taps=["tap2"],
        removed_policies=["old"],
        lookup=lookup,
    )
    lines = planned.lines
    made = lines.index(f"add chain {BRIDGE_TABLE} p-web-in-drop")
    jumped = lines.index(f"add rule {BRIDGE_TABLE} {ATTACHMENT}-in jump p-web-in-drop")
    removed_tap = lines.index(f'delete element {BRIDGE_TABLE} ingress_taps {{ "tap2" }}')
    removed_attachment = lines.index(f"delete chain {BRIDGE_TABLE} a-old-in")
    removed_policy = lines.index(f"delete chain {BRIDGE_TABLE} p-old-in-drop")
    assert made < jumped < removed_tap < removed_attachment < removed_policy
    assert planned.taps == {"tap1": ATTACHMENT}


def test_policy_chains_sit_after_anti_spoofing_and_after_conntrack_state() -> None:
    antispoof = base_chains(ANTISPOOF_BASE.splitlines())
    assert antispoof == {}  # firewall.BASE declares its chain inline; read its priority instead
    declared = re.search(r"hook prerouting priority (-?\d+)", ANTISPOOF_BASE)
    assert declared is not None and int(declared.group(1)) == ANTISPOOF_PRIORITY
    chains = base_chains(base_ruleset())
    family, hook, priority = chains["egress"]
    assert (family, hook) == ("bridge", "prerouting")
    assert priority > ANTISPOOF_PRIORITY and priority > BR_NETFILTER_PRIORITY
    assert chains["ingress_forward"][2] < BR_NETFILTER_PRIORITY  # marks before the inet reject
    assert chains["state_prerouting"][2] > -200  # after conntrack (NF_IP_PRI_CONNTRACK)


# -- properties over any policy -----------------------------------------------------------

V4 = st.builds(
    lambda a, p: str(ipaddress.IPv4Network((a, p), strict=False)),
    st.integers(0, 2**32 - 1),
    st.integers(8, 32),
)
V6 = st.builds(
    lambda a, p: str(ipaddress.IPv6Network((a, p), strict=False)),
    st.integers(0, 2**128 - 1),
    st.integers(16, 128),
)
REFERENCES = st.sampled_from(["@lan", "@v4only"])


def disjoint(cidrs: list[str]) -> list[str]:
    kept: list[str] = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr)
        if all(not net.overlaps(ipaddress.ip_network(k)) for k in kept):
            kept.append(cidr)
    return kept


@st.composite
def rules(draw: st.DrawFn, direction: str) -> dict[str, Any]:
    protocol = draw(st.sampled_from([None, "tcp", "udp", "icmp4", "icmp6"]))
    rule: dict[str, Any] = {
        "action": draw(st.sampled_from(["allow", "drop", "reject"])),
        "protocol": protocol,
        "log": draw(st.booleans()),
    }
    literals = {"icmp4": V4, "icmp6": V6}.get(protocol or "", draw(st.sampled_from([V4, V6])))
    peers = disjoint(draw(st.lists(literals, max_size=4))) + draw(
        st.lists(REFERENCES, max_size=2, unique=True)
    )
    if peers and draw(st.booleans()):
        rule["source" if direction == "ingress" else "destination"] = peers
    if protocol in ("tcp", "udp"):
        rule["destination_port"] = draw(st.sampled_from([None, "80", "1000-2000"]))
    if protocol in ("icmp4", "icmp6"):
        rule["icmp_type"] = draw(st.sampled_from([None, 0, 8, 128]))
    return rule


POLICIES = st.builds(
    lambda ingress, egress: parse_policy({"name": "p", "ingress": ingress, "egress": egress}),
    st.lists(rules("ingress"), max_size=5),
    st.lists(rules("egress"), max_size=5),
)
IPV4_LITERAL = re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}/\d+")
IPV6_LITERAL = re.compile(r"[0-9a-f]*:[0-9a-f:]*/\d+")


@settings(max_examples=150, deadline=None)
@given(POLICIES, st.sampled_from(["allow", "drop"]), st.sampled_from(["allow", "drop"]))
def test_no_generated_rule_mixes_address_families_and_all_sit_after_anti_spoofing(
    policy: Policy, ingress: str, egress: str
) -> None:
    compiled = compile_tap("tap1", [policy], PolicyDefaults(ingress=ingress, egress=egress), lookup)
    for line in base_ruleset() + compiled:
        if not line.startswith("add rule") or "ether type" not in line:
            continue
        families = re.findall(r"ether type (ip6|ip)\b", line)
        assert len(families) == 1, line
        if families == ["ip"]:
            assert not IPV6_LITERAL.search(line) and "ip6 " not in line and "icmpv6" not in line, (
                line
            )
        else:
            assert (
                not IPV4_LITERAL.search(line)
                and " ip saddr" not in line
                and " ip daddr" not in line
            )
            assert "l4proto icmp " not in line and "icmp type" not in line, line
    # the compiled statements make no base chain: every policy rule is reached from the base
    # chains above, which run after anti-spoofing
    assert not any("hook" in line for line in compiled)
    egress_priority = base_chains(base_ruleset())["egress"][2]
    assert egress_priority > ANTISPOOF_PRIORITY
