"""IPv6 end to end: a real guest under QEMU/TCG on a named managed network with an IPv6 prefix
configures itself by SLAAC from roost's router advertisements, at exactly the address roost
predicted from its MAC, and answers ping6 and HTTP over IPv6 from the daemon's namespace."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from tests.harness import (
    Daemon,
    http_get,
    links,
    namespace_pids,
    process_alive,
    run,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.root, pytest.mark.e2e]

PREFIX = "fd66::/64"
SUBNET = "10.66.0.0/24"


def eui64_address(prefix: str, mac: str) -> str:
    """The SLAAC address a guest with `mac` forms in `prefix` (RFC 4291 appendix A: ff:fe in
    the MAC's middle, the universal/local bit flipped), worked out here, not by roost."""
    octets = [int(part, 16) for part in mac.split(":")]
    octets[0] ^= 0x02
    identifier = int.from_bytes(bytes([*octets[:3], 0xFF, 0xFE, *octets[3:]]), "big")
    return str(ipaddress.IPv6Network(prefix)[identifier])


def dnsmasq_pids(netns: str) -> list[int]:
    """Every dnsmasq in the namespace (the test starts none, so they are roost's)."""
    pids = []
    for pid in namespace_pids(netns):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq":
                pids.append(pid)
        except OSError:
            continue
    return pids


def answers_ping6(netns: str, address: str) -> bool:
    return run("ping", "-6", "-c1", "-W1", address, netns=netns, check=False).returncode == 0


def test_a_guest_on_an_ipv6_network_takes_its_predicted_slaac_address_and_serves_http_on_it(
    netns: str, demo_plugin: Path, tmp_path: Path
) -> None:
    daemon = Daemon(netns, "--vmm", "qemu").start()
    try:
        daemon.ok("plugin", "install", demo_plugin)
        network = daemon.ok(
            "network", "create", "lan6", "--subnet", SUBNET, "--ipv6-prefix", PREFIX
        )
        assert network["ipv6_prefix"] == PREFIX
        bridge = network["bridge"]
        advertisers = dnsmasq_pids(netns)
        assert len(advertisers) == 1, advertisers  # the network's router advertisements

        config = tmp_path / "v6-1.json"
        config.write_text(
            json.dumps(
                {
                    "plugin": "roost-demo",
                    "network": {"mode": "bridged", "network": "lan6", "auto_assign": True},
                }
            )
        )
        vm = daemon.ok("vm", "create", "v6-1", "--plugin", "roost-demo", "--config", config)
        [interface] = vm["interfaces"]
        predicted = eui64_address(PREFIX, interface["mac"])
        assert interface["ipv6"] == {
            "ip": predicted,
            "prefix": PREFIX,
            "gateway": "fd66::1",
            "source": "slaac",
        }
        assert (interface["network"], interface["bridge"]) == ("lan6", bridge)
        ipv4 = interface["ip"]
        assert ipaddress.IPv4Address(ipv4) in ipaddress.IPv4Network(SUBNET)
        assert vm["network"]["ip"] == ipv4  # a single NIC keeps its network JSON

        wait_ready(daemon, "v6-1")
        wait_for(
            lambda: answers_ping6(netns, predicted),
            timeout=60,
            what=f"the guest to answer ping6 at its predicted address {predicted}",
        )
        assert http_get(netns, f"http://[{predicted}]/") == f"v6-1 {ipv4}\n"

        daemon.ok("vm", "rm", "v6-1")
        assert interface["tap"] not in links(netns)
        removed = daemon.cli("network", "rm", "lan6")
        assert removed.exit_code == 0, removed.stdout + removed.stderr
        assert not [pid for pid in advertisers if process_alive(pid)]
        assert dnsmasq_pids(netns) == []
        assert bridge not in links(netns)
    finally:
        daemon.close()
