"""Network policy benchmark: TCP throughput between two stand-in VMs on one bridge without
policies, and with 1,000 other attached interfaces and a 1,000-CIDR policy on the receiver;
then the time to attach one VM's policies with 1 and with 1,000 other interfaces attached.

Each stand-in VM is a network namespace whose `eth0` is a veth; the other end, named like a
tap, is a port of a bridge roost's Links made, with roost's anti-spoofing (Firewall.protect),
as tests/integration/test_policy_host.py builds them. The other interfaces are real taps made
by Links.create_tap, each with its anti-spoofing chain, attached by roost.host.policy. Prints
one JSON line of figures on stdout; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

from bench._common import cleanup, log, main, namespace, netns_path, percentile
from roost.host.firewall import LIBRARY, Firewall
from roost.host.firewall import TABLE as ANTISPOOF_TABLE
from roost.host.links import Links
from roost.host.netns import NetnsWorker
from roost.host.policy import PolicyFirewall, kernel_gaps
from roost.plan.policy import NetworkAddresses, TapPolicies
from roost.spec.policy import Direction, Policy, PolicyDefaults, parse_policy
from tests.harness import process_alive, run

BRIDGE = "rbr-bench"
SUBNET = ipaddress.IPv4Network("10.131.0.0/16")
GATEWAY = ipaddress.IPv4Interface("10.131.0.1/16")
SENDER = ("rbtapa", "02:fb:00:00:00:02", "10.131.0.2")  # port name, guest MAC, guest IP
RECEIVER = ("rbtapb", "02:fb:00:00:00:03", "10.131.0.3")
PROBE_TAP = "rbprobe"
PORT = 5201
CHUNK = 1 << 20
CIDR_POOL = ipaddress.IPv4Network("172.16.0.0/12")  # where the policy's other CIDRs come from
RECEIVER_DEFAULTS = PolicyDefaults(ingress="drop")  # the policy must allow the traffic
TARGET_THROUGHPUT_RATIO = 0.9
TARGET_APPLY_RATIO = 2.0
KINDS = ("join", "own")  # attach to policies in use; attach with a policy of its own
TRANSFER_TIMEOUT = 60.0

RECEIVE = """
import json, socket, sys, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1])))
server.listen(1)
print("ready", flush=True)
connection, _ = server.accept()
started = time.perf_counter()
view = memoryview(bytearray(1 << 20))
total = 0
while True:
    n = connection.recv_into(view)
    if not n:
        break
    total += n
print(json.dumps({"bytes": total, "seconds": time.perf_counter() - started}), flush=True)
"""
SEND = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
payload = bytes(1 << 20)
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    sock.sendall(payload)
sock.close()
"""


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge, taps and nftables)"
    try:
        ctypes.CDLL(LIBRARY)
    except OSError:
        return f"no {LIBRARY} (apt-get install libnftables1)"
    return None


# ---- pure parts --------------------------------------------------------------------------


def policy_cidrs(count: int, allowed: ipaddress.IPv4Network) -> list[str]:
    """`count` CIDRs, `allowed` last, the others every second /24 of 172.16.0.0/12: none
    overlaps or touches another, so none is merged and the set holds `count` intervals."""
    if count < 1:
        raise ValueError("a policy needs at least one CIDR")
    others = list(CIDR_POOL.subnets(new_prefix=24))[::2][: count - 1]
    if len(others) < count - 1:
        raise ValueError(f"at most {len(others) + 1} CIDRs fit")
    return [*(str(net) for net in others), str(allowed)]


def cidr_policy(count: int) -> Policy:
    """The receiver's policy: TCP from `count` CIDRs, the bridge's subnet among them."""
    rule = {"action": "allow", "protocol": "tcp", "source": policy_cidrs(count, SUBNET)}
    return parse_policy({"name": "bench-cidrs", "ingress": [rule]})


OWN_POLICY = parse_policy(
    {
        "name": "bench-own",
        "ingress": [
            {"action": "allow", "protocol": "tcp", "source": ["@lan"], "destination_port": "80"}
        ],
    }
)


def lookup(name: str) -> NetworkAddresses | None:
    return (SUBNET, None) if name == "lan" else None


def tap_name(index: int) -> str:
    return f"rbo{index:05d}"


def tap_mac(index: int) -> str:
    return f"02:fc:{index >> 16 & 0xFF:02x}:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}:01"


def tap_ip(index: int) -> str:
    return str(SUBNET.network_address + 256 + index)


def figures(
    baseline_mib_s: Sequence[float],
    policy_mib_s: Sequence[float],
    apply_s: dict[int, dict[str, list[float]]],
    unprotected_apply_s: dict[int, dict[str, list[float]]] | None = None,
) -> dict[str, Any]:
    """Throughput by each side's best round, apply times by p50/p95 per N (nearest rank, ms),
    and whether the targets are met; `unprotected_apply_s`, the same apply times once the
    anti-spoofing table is gone, only as an explanation."""
    small, large = sorted(apply_s)
    best_base, best_policy = max(baseline_mib_s), max(policy_mib_s)
    throughput_ratio = round(best_policy / best_base, 3)
    apply_ratio = {
        kind: round(percentile(apply_s[large][kind], 95) / percentile(apply_s[small][kind], 95), 2)
        for kind in apply_s[small]
    }
    return {
        "baseline_mib_s": round(best_base, 1),
        "policy_mib_s": round(best_policy, 1),
        "throughput_ratio": throughput_ratio,
        "round_mib_s": {
            "baseline": [round(v, 1) for v in baseline_mib_s],
            "policy": [round(v, 1) for v in policy_mib_s],
        },
        "apply_ms": _apply_ms(apply_s),
        "apply_p95_ratio": apply_ratio,
        "apply_ms_without_antispoofing": (
            None if unprotected_apply_s is None else _apply_ms(unprotected_apply_s)
        ),
        "targets": {
            "throughput_ratio": TARGET_THROUGHPUT_RATIO,
            "apply_p95_ratio": TARGET_APPLY_RATIO,
        },
        "meets_targets": throughput_ratio >= TARGET_THROUGHPUT_RATIO
        and max(apply_ratio.values()) <= TARGET_APPLY_RATIO,
    }


def _apply_ms(apply_s: dict[int, dict[str, list[float]]]) -> dict[str, Any]:
    return {
        str(n): {
            kind: {
                "p50": round(percentile(samples, 50) * 1000, 3),
                "p95": round(percentile(samples, 95) * 1000, 3),
            }
            for kind, samples in kinds.items()
        }
        for n, kinds in apply_s.items()
    }


# ---- the stand-ins -------------------------------------------------------------------------


@dataclass
class Host:
    """One daemon namespace: a bridge, anti-spoofing, and (unless a baseline) policies."""

    netns: str
    worker: NetnsWorker
    links: Links
    firewall: Firewall
    policies: PolicyFirewall | None
    cidr_policy: Policy | None = None  # the policy every attached tap uses
    guests: dict[str, str] = field(default_factory=dict)  # role → guest namespace


def make_host(stack: contextlib.ExitStack, *, with_policies: bool) -> Host:
    netns = namespace(stack)
    worker = NetnsWorker(netns)
    stack.callback(worker.close)
    links = Links(worker)
    stack.callback(links.close)
    links.ensure_bridge(BRIDGE, GATEWAY)
    firewall = Firewall(worker)
    policies = PolicyFirewall(worker) if with_policies else None
    return Host(netns, worker, links, firewall, policies)


def add_guest(stack: contextlib.ExitStack, host: Host, role: str, port: tuple[str, ...]) -> None:
    """A namespace standing in for a VM: `eth0` a veth whose other end is a bridge port with
    roost's anti-spoofing for the guest's MAC and IP."""
    tap, mac, ip = port
    guest = namespace(stack)
    run("ip", *f"link add {tap} type veth peer name eth0 netns {guest}".split(), netns=host.netns)
    run("ip", "link", "set", tap, "master", BRIDGE, "up", netns=host.netns)
    run("ip", "link", "set", "lo", "up", netns=guest)
    run("ip", "link", "set", "eth0", "address", mac, "up", netns=guest)
    run("ip", "addr", "add", f"{ip}/{SUBNET.prefixlen}", "dev", "eth0", netns=guest)
    host.firewall.protect(tap, mac, ip)
    host.guests[role] = guest


def add_taps(host: Host, count: int) -> None:
    """`count` taps on the bridge, each with its anti-spoofing chain, as VMs' taps are."""
    for index in range(count):
        host.links.create_tap(tap_name(index), BRIDGE, tap_mac(index))
        host.firewall.protect(tap_name(index), tap_mac(index), tap_ip(index))
        if (index + 1) % 250 == 0:
            log(f"  {index + 1}/{count} taps in {host.netns}")


def attach_all(host: Host, policy: Policy, taps: Sequence[str]) -> None:
    assert host.policies is not None
    attached = [TapPolicies(tap, (policy.name,), RECEIVER_DEFAULTS) for tap in taps]
    host.policies.apply(policies=[policy], taps=attached, lookup=lookup)


# ---- throughput ----------------------------------------------------------------------------


def transfer(stack: contextlib.ExitStack, host: Host, seconds: float, pids: list[int]) -> float:
    """MiB/s of one TCP stream from the sender's namespace to the receiver's."""
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", host.guests["receiver"], sys.executable, "-c", RECEIVE, str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    stack.callback(_end, receiver)
    pids.append(receiver.pid)
    assert receiver.stdout is not None
    if receiver.stdout.readline().strip() != "ready":
        raise RuntimeError("the receiver did not start")
    sender = subprocess.Popen(
        [
            *("ip", "netns", "exec", host.guests["sender"], sys.executable, "-c", SEND),
            *(RECEIVER[2], str(PORT), str(seconds)),
        ]
    )
    stack.callback(_end, sender)
    pids.append(sender.pid)
    if sender.wait(timeout=seconds + TRANSFER_TIMEOUT) != 0:
        raise RuntimeError(f"the sender in {host.netns} failed ({sender.returncode})")
    out, _ = receiver.communicate(timeout=TRANSFER_TIMEOUT)
    result = json.loads(out)
    return float(result["bytes"]) / CHUNK / float(result["seconds"])


def _end(process: subprocess.Popen[Any]) -> None:
    """Kill `process` by its PID if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait()


# ---- apply ---------------------------------------------------------------------------------


def time_apply(host: Host, kind: str) -> float:
    """Seconds to attach the probe tap (one transaction), then detach it untimed: `join`
    attaches it to the policy the other taps use, `own` to a policy made in the same call."""
    assert host.policies is not None
    assert host.cidr_policy is not None
    policy = host.cidr_policy if kind == "join" else OWN_POLICY
    attached = TapPolicies(PROBE_TAP, (policy.name,), RECEIVER_DEFAULTS)
    made = [] if kind == "join" else [OWN_POLICY]
    started = time.perf_counter()
    host.policies.apply(policies=made, taps=[attached], lookup=lookup)
    elapsed = time.perf_counter() - started
    removed = [] if kind == "join" else [OWN_POLICY.name]
    host.policies.apply(removed_taps=[PROBE_TAP], removed_policies=removed, lookup=lookup)
    return elapsed


def sample_apply(small: Host, loaded: Host, options: Options) -> dict[int, dict[str, list[float]]]:
    """Apply times per N and kind, N = 1 and N = others taking turns sample by sample."""
    apply_s: dict[int, dict[str, list[float]]] = {1: {}, options.others: {}}
    for _ in range(options.samples):
        for n, host in ((1, small), (options.others, loaded)):
            for kind in KINDS:
                apply_s[n].setdefault(kind, []).append(time_apply(host, kind))
    return apply_s


def ruleset_size(host: Host) -> dict[str, int]:
    listing = run("nft", "-j", "list", "ruleset", netns=host.netns).stdout
    items = json.loads(listing)["nftables"]
    return {kind: sum(1 for item in items if kind in item) for kind in ("chain", "rule", "map")}


# ---- the benchmark -------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    others: int
    cidrs: int
    repeats: int
    seconds: float
    samples: int


def benchmark(options: Options) -> dict[str, Any]:
    reason = skip_reason()
    if reason is not None:
        return {"benchmark": "policy", "skipped": reason}
    namespaces: list[str] = []
    pids: list[int] = []
    policy = cidr_policy(options.cidrs)
    with cleanup() as stack:
        log("baseline: a bridge, two stand-in VMs with anti-spoofing, no policy")
        baseline = make_host(stack, with_policies=False)
        for role, port in (("sender", SENDER), ("receiver", RECEIVER)):
            add_guest(stack, baseline, role, port)
        log(f"loaded: the same, {options.others} other taps, a {options.cidrs}-CIDR policy")
        loaded = make_host(stack, with_policies=True)
        loaded.cidr_policy = policy
        for role, port in (("sender", SENDER), ("receiver", RECEIVER)):
            add_guest(stack, loaded, role, port)
        add_taps(loaded, options.others)
        attach_all(loaded, policy, [RECEIVER[0], *map(tap_name, range(options.others))])
        log("small: a bridge, 1 other tap with the same policy")
        small = make_host(stack, with_policies=True)
        small.cidr_policy = policy
        add_taps(small, 1)
        attach_all(small, policy, [tap_name(0)])
        for host in (small, loaded):
            host.links.create_tap(PROBE_TAP, BRIDGE, "02:fd:00:00:00:01")
        namespaces = [h.netns for h in (baseline, loaded, small)]
        namespaces += [g for h in (baseline, loaded) for g in h.guests.values()]
        gaps = kernel_gaps(loaded.worker)

        rounds: dict[str, list[float]] = {"baseline": [], "policy": []}
        for number in range(options.repeats):
            order = [("baseline", baseline), ("policy", loaded)]
            for side, host in order if number % 2 == 0 else order[::-1]:
                mib_s = transfer(stack, host, options.seconds, pids)
                rounds[side].append(mib_s)
                log(f"round {number + 1}/{options.repeats} {side}: {mib_s:.1f} MiB/s")
        assert loaded.policies is not None
        allowed = loaded.policies.counters().rules.get((policy.name, Direction.INGRESS, 0))
        if allowed is None or allowed.packets < options.repeats:
            raise RuntimeError(f"the policy's allow rule did not count the streams ({allowed})")

        sizes = {"1": small, str(options.others): loaded}
        sized = {n: ruleset_size(host) for n, host in sizes.items()}
        log(f"apply: {options.samples} samples per kind, N = 1 and N = {options.others}")
        apply_s = sample_apply(small, loaded, options)
        log("apply again without the anti-spoofing table (what libnftables reads grows less)")
        for host in (small, loaded):
            run("nft", "delete", "table", *ANTISPOOF_TABLE.split(), netns=host.netns)
        unprotected_apply_s = sample_apply(small, loaded, options)
    left = [f"netns {name}" for name in namespaces if netns_path(name).exists()]
    left += [f"pid {pid}" for pid in pids if process_alive(pid)]
    result: dict[str, Any] = {
        "benchmark": "policy",
        "transfer": "python sockets",  # one stream, 1 MiB sendall()s; see bench/README.md
        "other_interfaces": options.others,
        "policy_cidrs": options.cidrs,
        "seconds_per_round": options.seconds,
        "repeats": options.repeats,
        "apply_samples": options.samples,
    }
    result |= figures(rounds["baseline"], rounds["policy"], apply_s, unprotected_apply_s)
    result |= {
        "ruleset": sized,
        "allow_rule_packets": allowed.packets,
        "kernel_gaps": gaps,
        "leftovers": left,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    return result


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 20 taps, 100 CIDRs, 1 s, 20 samples"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="throughput rounds per side; the best counts"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per transfer")
    parser.add_argument("--samples", type=int, default=100, help="apply samples per N and kind")
    return parser.parse_args(argv)


def options_of(args: argparse.Namespace) -> Options:
    if args.quick:
        return Options(others=20, cidrs=100, repeats=1, seconds=1.0, samples=20)
    return Options(
        others=1000,
        cidrs=1000,
        repeats=max(1, args.repeats),
        seconds=max(0.5, args.seconds),
        samples=max(20, args.samples),
    )


if __name__ == "__main__":
    chosen = options_of(parse(sys.argv[1:]))
    sys.exit(main(lambda: benchmark(chosen)))
