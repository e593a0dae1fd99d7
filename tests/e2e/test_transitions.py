"""A real guest (QEMU/TCG) walked through every network mode by config patches: after each
restart its console shows the interfaces and the address it got, and HTTP reaches it whenever
it has an IP."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.test_guests import DHCP_BRIDGE, DHCP_NET, DHCPServer
from tests.harness import Daemon, console_of, demo_plugin, http_get, wait_ready

pytestmark = [pytest.mark.root, pytest.mark.e2e]


def test_a_guest_walks_through_every_mode_and_says_what_it_got(netns: str, tmp_path: Path) -> None:
    plugin = demo_plugin(
        tmp_path, "web", network={"mode": "bridged", "subnet": "10.93.0.0/24", "auto_assign": True}
    )
    server = DHCPServer(netns)
    daemon = Daemon(netns, "--vmm", "qemu", "--dhcp-bridge", DHCP_BRIDGE)
    try:
        daemon.start()
        daemon.ok("plugin", "install", plugin)
        vm = daemon.ok("vm", "create", "walker", "--plugin", "web")
        console = wait_ready(daemon, "walker")
        assert "roost-guest: interfaces lo eth0\n" in console
        assert "roost-ready: name=walker ip=10.93.0.2" in console
        assert http_get(netns, "http://10.93.0.2/") == "walker 10.93.0.2\n"
        mac = vm["network"]["mac"]

        def step(*flags: str) -> tuple[dict[str, object], str]:
            offset = len(console_of(daemon, "walker"))
            daemon.ok("vm", "config", "patch", "walker", *flags, "--restart")
            console = wait_ready(daemon, "walker", since=offset)
            return daemon.ok("vm", "show", "walker"), console

        vm, console = step("--network-mode", "vsock")
        assert "roost-guest: interfaces lo\n" in console
        assert "roost-ready: name=walker ip=none" in console

        vm, console = step("--network-mode", "dhcp")
        assert "roost-guest: interfaces lo eth0\n" in console
        leased = re.search(rf"roost-ready: name=walker ip=({DHCP_NET}\.\d+)", console)
        assert leased, console
        assert server.lease_of(mac) == leased[1]  # the same MAC leased it
        assert http_get(netns, f"http://{leased[1]}/") == f"walker {leased[1]}\n"

        vm, console = step(
            "--network-mode",
            "bridged",
            "--network-subnet",
            "10.93.0.0/24",
            "--network-gateway",
            "10.93.0.1",
            "--network-ip",
            "10.93.0.50",
        )
        assert "roost-net: eth0 static 10.93.0.50/24 gw 10.93.0.1" in console
        assert http_get(netns, "http://10.93.0.50/") == "walker 10.93.0.50\n"

        vm, console = step(
            "--network-subnet",
            "10.94.0.0/24",
            "--network-gateway",
            "10.94.0.1",
            "--network-ip",
            "10.94.0.7",
        )
        assert "roost-net: eth0 static 10.94.0.7/24 gw 10.94.0.1" in console
        assert http_get(netns, "http://10.94.0.7/") == "walker 10.94.0.7\n"
        assert vm["network"]["mac"] == mac
        assert vm["config_version"] == vm["running_version"] == 5
    finally:
        daemon.close()
        server.close()
