"""Network policies enforced by real nftables between two stand-in VMs on one bridge.

The daemon's namespace is the test's `netns`, with a bridge roost's host code makes. Two more
namespaces play VMs A and B: each a veth whose bridge port is named like a tap and carries
roost's anti-spoofing rules, as a VM's tap does. B serves HTTP (python's http.server, ended by
its PID). Policies are applied by roost.host.policy; nftables' counters say what was dropped.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from roost.host.firewall import Firewall
from roost.host.links import Links
from roost.host.netns import NetnsWorker
from roost.host.policy import PolicyFirewall, kernel_gaps
from roost.plan.policy import NetworkAddresses, TapPolicies, base_ruleset, compile_tap
from roost.spec.policy import Direction, Policy, PolicyDefaults, parse_policy
from tests.harness import network_namespace, run, wait_for
from tests.unit.test_policy_plan import POLICIES
from tests.unit.test_policy_plan import lookup as plan_lookup

pytestmark = pytest.mark.root

BRIDGE = "rbr13"
GATEWAY = ipaddress.IPv4Interface("10.13.0.1/24")
PREFIX = ipaddress.IPv6Network("fd13::/64")
GATEWAY6 = "fd13::1"


@dataclass(frozen=True)
class Guest:
    netns: str
    tap: str
    mac: str
    ip: str
    ip6: str


@dataclass
class Host:
    netns: str
    worker: NetnsWorker
    policies: PolicyFirewall
    a: Guest
    b: Guest


def lookup(name: str) -> NetworkAddresses | None:
    return (GATEWAY.network, PREFIX) if name == "lan" else None


@contextlib.contextmanager
def guest(daemon: str, tap: str, mac: str, ip: str, ip6: str) -> Iterator[Guest]:
    """A namespace standing in for a VM: its `eth0` (with `mac`) is a veth whose other end,
    named `tap`, is a port of the bridge."""
    with network_namespace() as name:
        run("ip", *f"link add {tap} type veth peer name eth0 netns {name}".split(), netns=daemon)
        run("ip", "link", "set", tap, "master", BRIDGE, "up", netns=daemon)
        run("ip", "link", "set", "lo", "up", netns=name)
        run("ip", "link", "set", "eth0", "address", mac, "up", netns=name)
        run("ip", "addr", "add", f"{ip}/24", "dev", "eth0", netns=name)
        run("ip", "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad", netns=name)
        yield Guest(name, tap, mac, ip, ip6)


@contextlib.contextmanager
def http_server(netns: str, directory: Path) -> Iterator[None]:
    """python's http.server on port 80 (IPv4 and IPv6) in `netns`, killed by its PID after."""
    (directory / "index.html").write_text("hello from B\n")
    argv = [
        sys.executable,
        "-m",
        "http.server",
        "80",
        "--bind",
        "::",
        "--directory",
        str(directory),
    ]
    server = subprocess.Popen(
        ["ip", "netns", "exec", netns, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: connect(netns, "::1", 80) == "open", what="the HTTP server")
        yield
    finally:
        server.kill()
        server.wait()


CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("open")
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("silent")
"""
GET = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), end="")
"""


def connect(netns: str, address: str, port: int) -> str:
    """ "open", "refused" (an answer: RST) or "silent" (no answer within 2 s)."""
    return run(sys.executable, "-c", CONNECT, address, str(port), netns=netns).stdout.strip()


def http_get(netns: str, address: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return run(sys.executable, "-c", GET, f"http://{host}/", netns=netns).stdout


def pings(netns: str, address: str) -> bool:
    return run("ping", "-c1", "-W1", address, netns=netns, check=False).returncode == 0


def nft_list(netns: str) -> str:
    """The ruleset without its counters (-s), which the stand-in guests' traffic moves."""
    return run("nft", "-s", "list", "ruleset", netns=netns).stdout


@pytest.fixture
def host(netns: str, tmp_short: Path) -> Iterator[Host]:
    """The daemon's host parts in `netns` (bridge, anti-spoofing, policies), guests A and B
    protected as VMs are, and B serving HTTP."""
    worker = NetnsWorker(netns)
    links = Links(worker)
    try:
        links.ensure_bridge(BRIDGE, GATEWAY)
        run("ip", "-6", "addr", "add", f"{GATEWAY6}/64", "dev", BRIDGE, "nodad", netns=netns)
        firewall = Firewall(worker)
        policies = PolicyFirewall(worker)
        with (
            guest(netns, "rtapa13", "02:fc:00:00:13:02", "10.13.0.2", "fd13::2") as a,
            guest(netns, "rtapb13", "02:fc:00:00:13:03", "10.13.0.3", "fd13::3") as b,
        ):
            for vm in (a, b):
                firewall.protect(vm.tap, vm.mac, vm.ip, [vm.ip6])
            with http_server(b.netns, tmp_short):
                yield Host(netns, worker, policies, a, b)
    finally:
        links.close()
        worker.close()


WEB_IN = {
    "name": "web-in",
    "ingress": [
        {"action": "allow", "protocol": "tcp", "source": ["@lan"], "destination_port": "80"}
    ],
}
DROP_IN = PolicyDefaults(ingress="drop")


def attach(host: Host, tap: str, policies: list[Policy], defaults: PolicyDefaults) -> None:
    attached = TapPolicies(tap, tuple(policy.name for policy in policies), defaults)
    host.policies.apply(policies=policies, taps=[attached], lookup=lookup)


def test_the_kernel_here_has_everything_policies_need(netns: str) -> None:
    worker = NetnsWorker(netns)
    try:
        assert kernel_gaps(worker) == []
        run("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", netns=netns)
        (gap,) = kernel_gaps(worker)
        assert gap.startswith("net.bridge.bridge-nf-call-iptables is 0")
    finally:
        worker.close()


def test_allow_http_from_the_subnet_with_default_drop_lets_http_in_and_keeps_ping_out(
    host: Host,
) -> None:
    a, b = host.a, host.b
    attach(host, b.tap, [parse_policy(WEB_IN)], DROP_IN)
    assert http_get(a.netns, b.ip) == "hello from B\n"
    assert http_get(a.netns, b.ip6) == "hello from B\n"  # @lan is the IPv6 prefix too
    assert http_get(host.netns, b.ip) == "hello from B\n"  # from the daemon's namespace
    assert not pings(a.netns, b.ip) and not pings(a.netns, b.ip6)
    assert not pings(host.netns, b.ip)
    assert connect(a.netns, b.ip, 22) == "silent"
    # what B starts itself comes back: established traffic goes first
    assert pings(b.netns, a.ip) and pings(b.netns, GATEWAY.ip.compressed)
    counters = host.policies.counters()
    assert counters.rules[("web-in", Direction.INGRESS, 0)].packets >= 3
    attachment = host.policies.attachment_of(b.tap)
    assert attachment is not None
    assert counters.defaults[(attachment, Direction.INGRESS)].packets >= 4  # pings, the SYN
    assert counters.defaults[(attachment, Direction.EGRESS)].packets >= 2  # B's own pings


def test_default_egress_drop_keeps_a_from_reaching_b_at_all(host: Host) -> None:
    a, b = host.a, host.b
    attach(host, a.tap, [], PolicyDefaults(egress="drop"))
    assert connect(a.netns, b.ip, 80) == "silent"
    assert connect(a.netns, b.ip6, 80) == "silent"
    assert not pings(a.netns, b.ip)
    assert pings(b.netns, a.ip)  # A's replies are established traffic
    attachment = host.policies.attachment_of(a.tap)
    assert host.policies.counters().defaults[(attachment, Direction.EGRESS)].packets >= 3


def test_changing_a_policy_opens_ping_for_every_tap_in_one_transaction(host: Host) -> None:
    a, b = host.a, host.b
    attach(host, b.tap, [parse_policy(WEB_IN)], DROP_IN)
    chain = [
        "nft",
        "list",
        "chain",
        "bridge",
        "roost_policy",
        f"{host.policies.attachment_of(b.tap)}-in",
    ]
    tap_chain = run(*chain, netns=host.netns)
    assert not pings(a.netns, b.ip)
    ping = {"action": "allow", "protocol": "icmp4", "icmp_type": 8, "source": ["@lan"]}
    changed = parse_policy({**WEB_IN, "ingress": [*WEB_IN["ingress"], ping]})
    host.policies.apply(policies=[changed], lookup=lookup)
    assert pings(a.netns, b.ip)
    assert not pings(a.netns, b.ip6)  # the new rule is icmp4 only
    assert http_get(a.netns, b.ip) == "hello from B\n"
    after = run(*chain, netns=host.netns)
    assert after.stdout.split("counter")[0] == tap_chain.stdout.split("counter")[0]


def test_a_reject_rule_answers_a_guest_at_once_and_drops_for_the_namespace(host: Host) -> None:
    a, b = host.a, host.b
    refuse = {
        "name": "no-web",
        "ingress": [{"action": "reject", "protocol": "tcp", "destination_port": "80"}],
    }
    attach(host, b.tap, [parse_policy(refuse)], PolicyDefaults())
    assert connect(a.netns, b.ip, 80) == "refused"  # a TCP reset, though B listens
    assert connect(a.netns, b.ip6, 80) == "refused"
    assert connect(host.netns, b.ip, 80) == "silent"  # nothing rejects after bridge output
    assert pings(a.netns, b.ip)  # the default stays allow
    assert host.policies.counters().rules[("no-web", Direction.INGRESS, 0)].packets >= 3


def test_drop_rules_come_before_allow_rules_whatever_policy_holds_them(host: Host) -> None:
    a, b = host.a, host.b
    block_a = {"name": "block-a", "ingress": [{"action": "drop", "source": [f"{a.ip}/32"]}]}
    attach(host, b.tap, [parse_policy(WEB_IN), parse_policy(block_a)], DROP_IN)
    assert connect(a.netns, b.ip, 80) == "silent"
    assert http_get(host.netns, b.ip) == "hello from B\n"


def test_removing_a_tap_and_its_policies_leaves_no_trace(host: Host) -> None:
    a, b = host.a, host.b
    attach(host, b.tap, [parse_policy(WEB_IN)], DROP_IN)
    host.policies.release(b.tap)
    host.policies.release(b.tap)  # again: nothing left to remove is no error
    host.policies.apply(removed_policies=["web-in"], lookup=lookup)
    table = run("nft", "list", "table", "bridge", "roost_policy", netns=host.netns).stdout
    assert b.tap not in table and "web-in" not in table and "chain a-" not in table
    assert pings(a.netns, b.ip)
    host.policies.remove_tables()
    tables = run("nft", "-j", "list", "tables", netns=host.netns).stdout
    names = {t["table"]["name"] for t in json.loads(tables)["nftables"] if "table" in t}
    assert names == {"roost"}  # anti-spoofing's own table is never touched


def test_a_new_firewall_adopts_the_taps_attached_and_drops_unused_attachments(
    host: Host,
) -> None:
    a, b = host.a, host.b
    attach(host, b.tap, [parse_policy(WEB_IN)], DROP_IN)
    unused = TapPolicies("gone", (), PolicyDefaults(egress="drop")).attachment
    run("nft", "add", "chain", "bridge", "roost_policy", f"{unused}-in", netns=host.netns)
    run("nft", "add", "chain", "bridge", "roost_policy", f"{unused}-out", netns=host.netns)
    again = PolicyFirewall(host.worker)  # as a restarted daemon makes it
    assert again.attachment_of(b.tap) == host.policies.attachment_of(b.tap)
    table = run("nft", "list", "table", "bridge", "roost_policy", netns=host.netns).stdout
    assert unused not in table
    assert not pings(a.netns, b.ip)  # still enforced
    again.release(b.tap)
    assert pings(a.netns, b.ip)


def test_a_new_firewall_lists_every_made_policy_so_one_never_stored_can_go(host: Host) -> None:
    web = parse_policy(WEB_IN)
    host.policies.apply(policies=[web, parse_policy({"name": "ghost-2"})], lookup=lookup)
    again = PolicyFirewall(host.worker)  # as a restarted daemon makes it
    assert again.made_policies() == {web.name, "ghost-2"}  # a '-' in a name is kept whole
    again.apply(removed_policies=["ghost-2"], lookup=lookup)
    assert again.made_policies() == {web.name}
    assert "ghost-2" not in nft_list(host.netns)


def test_a_refused_transaction_changes_nothing(host: Host) -> None:
    a, b = host.a, host.b
    attach(host, b.tap, [parse_policy(WEB_IN)], DROP_IN)
    before = nft_list(host.netns)
    # the tap names a policy that was never made: the whole batch is refused
    broken = TapPolicies(a.tap, ("missing",), DROP_IN)
    with pytest.raises(Exception, match="nftables refused the policy rules"):
        host.policies.apply(
            policies=[parse_policy({"name": "other"})], taps=[broken], lookup=lookup
        )
    assert nft_list(host.netns) == before


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(POLICIES)
def test_any_compiled_policy_is_accepted_by_nftables(netns: str, policy: Policy) -> None:
    lines = base_ruleset() + compile_tap("rtap0", [policy], DROP_IN, plan_lookup)
    checked = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-c", "-f", "-"],
        check=False,
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
