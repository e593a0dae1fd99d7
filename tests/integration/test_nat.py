"""`roost serve --nat`: bridged guests reach the outside through the daemon namespace's default
route, masqueraded as that namespace's own address, and only with --nat.

A second namespace plays the internet: a veth pair joins it to the daemon's namespace, whose
default route points at it, and it counts the echo requests it gets by source address. Further
namespaces play guests: each a veth port on the VM network's bridge with an address from its
subnet (a paused QEMU VM keeps the bridge); one test boots a real QEMU guest instead. No packet
leaves the namespaces the tests create.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    DEMO,
    Daemon,
    console_of,
    links,
    network_namespace,
    run,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.root, pytest.mark.e2e]

UPLINK, ROUTER = "198.51.100.1", "198.51.100.2"  # the daemon namespace's side, the internet's
REMOTE = "203.0.113.10"  # an address out there
SUBNET, GATEWAY = "10.57.0.0/24", "10.57.0.1"  # the daemon's default network
GUEST, PEER = "10.57.0.250", "10.57.0.251"
DEMO_PLUGIN = DEMO / "plugin.json"  # the e2e mark skips these tests without it


def watch(netns: str, sources: dict[str, str]) -> None:
    """Count the echo requests `netns` receives from each source (counter name → address)."""
    counters = "".join(f"counter {name} {{ }}\n" for name in sources)
    rules = "".join(
        f'icmp type echo-request ip saddr {address} counter name "{name}"\n'
        for name, address in sources.items()
    )
    script = (
        f"table ip watch {{\n{counters}chain input {{\n"
        f"type filter hook input priority filter; policy accept;\n{rules}}}\n}}\n"
    )
    nft_script(netns, script)


def nft_script(netns: str, script: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script, text=True, check=True
    )


def received(netns: str, counter: str) -> int:
    listed = json.loads(
        run("nft", "-j", "list", "counter", "ip", "watch", counter, netns=netns).stdout
    )
    [found] = [item["counter"] for item in listed["nftables"] if "counter" in item]
    return int(found["packets"])


def veth(netns: str, name: str, peer_netns: str, peer: str) -> None:
    """A veth pair: `name` in `netns`, `peer` in `peer_netns`."""
    run(
        "ip", *f"link add {name} type veth peer name {peer} netns {peer_netns}".split(), netns=netns
    )


@contextlib.contextmanager
def internet(daemon_netns: str) -> Iterator[str]:
    """A namespace the daemon's namespace routes everything else to, with REMOTE on it."""
    with network_namespace() as name:
        veth(daemon_netns, "uplink0", name, "wan0")
        run("ip", "addr", "add", f"{UPLINK}/24", "dev", "uplink0", netns=daemon_netns)
        run("ip", "link", "set", "uplink0", "up", netns=daemon_netns)
        run("ip", "route", "add", "default", "via", ROUTER, netns=daemon_netns)
        run("ip", "addr", "add", f"{ROUTER}/24", "dev", "wan0", netns=name)
        run("ip", "link", "set", "wan0", "up", netns=name)
        run("ip", "addr", "add", f"{REMOTE}/32", "dev", "lo", netns=name)
        run("ip", "link", "set", "lo", "up", netns=name)
        watch(name, {"uplink": UPLINK, "inside": SUBNET})
        yield name


@contextlib.contextmanager
def fake_guest(daemon_netns: str, bridge: str, ip: str, port: str) -> Iterator[str]:
    """A namespace standing in for a guest: veth `port` on `bridge`, `ip` on its other end,
    the network's gateway as its default route."""
    with network_namespace() as name:
        veth(daemon_netns, port, name, "eth0")
        run("ip", "link", "set", port, "master", bridge, "up", netns=daemon_netns)
        run("ip", "addr", "add", f"{ip}/24", "dev", "eth0", netns=name)
        run("ip", "link", "set", "eth0", "up", netns=name)
        run("ip", "route", "add", "default", "via", GATEWAY, netns=name)
        yield name


def pings(netns: str, address: str, attempts: int = 3) -> bool:
    """Whether `address` answers a ping from `netns` (one second per attempt)."""
    return any(
        run("ping", "-c1", "-W1", address, netns=netns, check=False).returncode == 0
        for _ in range(attempts)
    )


def forwarding(netns: str) -> str:
    return run("cat", "/proc/sys/net/ipv4/ip_forward", netns=netns).stdout.strip()


def nat_table(netns: str) -> str | None:
    """roost's NAT table as `nft list` prints it; None when there is none."""
    listed = run("nft", "list", "table", "ip", "roost_nat", netns=netns, check=False)
    return listed.stdout if listed.returncode == 0 else None


def masquerade_rule(bridge: str) -> str:
    return f'ip saddr {SUBNET} oifname != "{bridge}" masquerade'


def healthy(daemon: Daemon) -> None:
    wait_for(
        lambda: daemon.http.get("/healthz").json()["status"] == "ok",
        timeout=60,
        what="the daemon to finish recovering",
    )


def anchor(daemon: Daemon) -> str:
    """A paused VM on the default network, which keeps its bridge; the bridge's name."""
    daemon.ok("plugin", "install", DEMO_PLUGIN)
    vm = daemon.ok("vm", "create", "anchor", "--plugin", "roost-demo")
    daemon.ok("vm", "pause", "anchor")
    return str(vm["network"]["bridge"])


def test_nat_masquerades_leaving_traffic_only_and_goes_with_the_network(netns: str) -> None:
    with internet(netns) as outside:
        assert forwarding(netns) == "0"
        daemon = Daemon(netns, "--vmm", "qemu", "--nat").start()
        try:
            assert forwarding(netns) == "1"
            assert "turned IPv4 forwarding on in network namespace" in daemon.logs()
            assert "chain net-" not in (nat_table(netns) or "no table")
            bridge = anchor(daemon)
            assert masquerade_rule(bridge) in (nat_table(netns) or "")
            with (
                fake_guest(netns, bridge, GUEST, "vguest0") as guest,
                fake_guest(netns, bridge, PEER, "vguest1") as peer,
            ):
                watch(peer, {"guest": GUEST, "gateway": GATEWAY})
                assert pings(guest, REMOTE)
                # it arrived from the daemon namespace's own address, not the guest's
                assert received(outside, "uplink") >= 1
                assert received(outside, "inside") == 0
                # inside the bridge (which br_netfilter shows to ip-family rules) nothing is
                # masqueraded: the peer sees the guest's own address
                assert pings(guest, PEER)
                assert received(peer, "guest") >= 1
                assert received(peer, "gateway") == 0
            assert daemon.cli("vm", "rm", "anchor").exit_code == 0
            assert bridge not in links(netns)
            assert "chain net-" not in (nat_table(netns) or "no table")
        finally:
            daemon.close()
        assert forwarding(netns) == "1"  # never turned off again


def test_without_nat_nothing_is_masqueraded_and_a_leftover_table_goes(netns: str) -> None:
    with internet(netns) as outside:
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=netns)  # as `roost host setup` does
        nft_script(  # what an earlier `serve --nat` left
            netns,
            "table ip roost_nat {\nchain net-roost0 {\n"
            "type nat hook postrouting priority srcnat; policy accept;\n"
            f"{masquerade_rule('roost0')}\n}}\n}}\n",
        )
        daemon = Daemon(netns, "--vmm", "qemu").start()
        try:
            assert nat_table(netns) is None
            assert "removed the NAT table ip roost_nat" in daemon.logs()
            bridge = anchor(daemon)
            with fake_guest(netns, bridge, GUEST, "vguest0") as guest:
                # forwarded with the guest's own address, which nothing out there routes back
                assert not pings(guest, REMOTE, attempts=2)
            assert received(outside, "inside") >= 1
            assert received(outside, "uplink") == 0
            assert nat_table(netns) is None
        finally:
            daemon.close()


def test_a_restarted_daemon_makes_the_rules_match_the_networks(netns: str) -> None:
    with internet(netns) as outside:
        daemon = Daemon(netns, "--vmm", "qemu").start("--nat")
        try:
            bridge = anchor(daemon)
            daemon.stop()  # the VM keeps running, and its network keeps its NAT
            assert masquerade_rule(bridge) in (nat_table(netns) or "")
            # what a crash could leave: the live network's chain gone, a gone network's kept
            chain = f"ip roost_nat net-{bridge}"
            run("nft", f"flush chain {chain}; delete chain {chain}", netns=netns)
            run(
                "nft",
                "add chain ip roost_nat net-rbr42 "
                "{ type nat hook postrouting priority srcnat; policy accept; }",
                netns=netns,
            )
            daemon.start("--nat")
            healthy(daemon)
            table = nat_table(netns) or ""
            assert masquerade_rule(bridge) in table
            assert "net-rbr42" not in table
            assert daemon.ok("vm", "show", "anchor")["status"] == "paused"
            with fake_guest(netns, bridge, GUEST, "vguest0") as guest:
                assert pings(guest, REMOTE)
            assert received(outside, "uplink") >= 1

            daemon.stop()
            daemon.start()  # without --nat: the table goes, forwarding stays on
            assert nat_table(netns) is None
            assert forwarding(netns) == "1"
        finally:
            daemon.close()


def test_a_real_guest_reaches_the_internet_masqueraded(netns: str, tmp_path: Path) -> None:
    with internet(netns) as outside:
        daemon = Daemon(netns, "--vmm", "qemu", "--nat").start()
        try:
            daemon.ok("plugin", "install", DEMO_PLUGIN)
            config = tmp_path / "prober.json"
            config.write_text(
                json.dumps({"plugin": "roost-demo", "boot_args": f"roost.probe={REMOTE}"})
            )
            daemon.ok("vm", "create", "prober", "--plugin", "roost-demo", "--config", config)
            wait_ready(daemon, "prober")
            wait_for(
                lambda: "roost-probe:" in console_of(daemon, "prober"),
                timeout=120,
                what="the guest's probe result",
            )
            assert f"roost-probe: {REMOTE} reachable" in console_of(daemon, "prober")
            assert received(outside, "uplink") >= 1
            assert received(outside, "inside") == 0
        finally:
            daemon.close()
