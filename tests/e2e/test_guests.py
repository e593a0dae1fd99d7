"""Real guests under QEMU/TCG, one network namespace per test, the real daemon: what each
network mode means, seen from inside the guest and from the host."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Daemon,
    console_of,
    http_get,
    links,
    process_alive,
    run,
    short_tmp,
    wait_for,
    wait_ready,
)
from tests.harness import (
    demo_plugin as make_demo_plugin,
)

pytestmark = [pytest.mark.root, pytest.mark.e2e]

DHCP_BRIDGE = "brdhcp"
DHCP_NET = "10.58.0"


class DHCPServer:
    """dnsmasq on the operator's bridge (made here, with `<net>.1/24`): the external DHCP server
    dhcp VMs lease from; with `router`, it offers the bridge as their router."""

    def __init__(
        self, netns: str, bridge: str = DHCP_BRIDGE, net: str = DHCP_NET, *, router: bool = False
    ) -> None:
        self.dir = short_tmp()
        self.leases = self.dir / "dnsmasq.leases"
        run("ip", "link", "add", bridge, "type", "bridge", netns=netns)
        run("ip", "addr", "add", f"{net}.1/24", "dev", bridge, netns=netns)
        run("ip", "link", "set", bridge, "up", netns=netns)
        self.process = subprocess.Popen(
            [
                *("ip", "netns", "exec", netns, "dnsmasq", "--no-daemon", "--no-ping"),
                *("--bind-interfaces", "--port=0", f"--interface={bridge}"),
                f"--dhcp-range={net}.100,{net}.150,255.255.255.0,1h",
                *([f"--dhcp-option=option:router,{net}.1"] * router),
                f"--dhcp-leasefile={self.leases}",
                "--conf-file=/dev/null",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def lease_of(self, mac: str) -> str | None:
        if not self.leases.exists():
            return None
        for line in self.leases.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1].lower() == mac.lower():
                return fields[2]
        return None

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.leases.unlink(missing_ok=True)
        self.dir.rmdir()


@pytest.fixture
def dhcp_server(netns: str) -> Iterator[DHCPServer]:
    server = DHCPServer(netns)
    try:
        yield server
    finally:
        server.close()


def qemu_daemon(netns: str, *args: str) -> Daemon:
    return Daemon(netns, "--vmm", "qemu", *args).start()


def test_bridged_auto_and_manual_addresses_serve_http(netns: str, demo_plugin: Path) -> None:
    daemon = qemu_daemon(netns)
    try:
        daemon.ok("plugin", "install", demo_plugin)
        auto = daemon.ok("vm", "create", "auto-1", "--plugin", "roost-demo")
        manual = daemon.ok(
            "vm", "create", "manual-1", "--plugin", "roost-demo", "--network-ip", "10.57.0.77"
        )
        assert manual["network"]["ip"] == "10.57.0.77"
        for vm in (auto, manual):
            assert vm["vmm"]["kind"] == "qemu"
            ready = wait_ready(daemon, vm["name"])
            ip = vm["network"]["ip"]
            assert f"roost-ready: name={vm['name']} ip={ip}" in ready
            assert http_get(netns, f"http://{ip}/") == f"{vm['name']} {ip}\n"
        # the guest configured its NIC from the ip= roost wrote on its command line
        assert f"roost-net: eth0 static {manual['network']['ip']}/24" in console_of(
            daemon, "manual-1"
        )
    finally:
        daemon.close()


@pytest.mark.parametrize("source", ["lease-file", "packet-watch"])
def test_dhcp_guest_leases_from_the_external_server(
    netns: str, dhcp_server: DHCPServer, demo_plugin: Path, source: str
) -> None:
    extra = ["--dhcp-leases", str(dhcp_server.leases)] if source == "lease-file" else []
    daemon = qemu_daemon(netns, "--dhcp-bridge", DHCP_BRIDGE, *extra)
    try:
        daemon.ok("plugin", "install", demo_plugin)
        vm = daemon.ok("vm", "create", "dhcp-1", "--plugin", "roost-demo", "--network-mode", "dhcp")
        assert vm["network"]["ip"] is None
        wait_ready(daemon, "dhcp-1")
        lease = wait_for(lambda: dhcp_server.lease_of(vm["network"]["mac"]), what="a lease")
        observed = wait_for(
            lambda: daemon.ok("vm", "show", "dhcp-1")["network"]["observed_ip"],
            what="roost to observe the address",
        )
        assert observed == lease
        assert lease.startswith(f"{DHCP_NET}.")
        assert http_get(netns, f"http://{lease}/") == f"dhcp-1 {lease}\n"
    finally:
        daemon.close()


def test_vsock_guest_has_no_network_interface(netns: str, demo_plugin: Path) -> None:
    daemon = qemu_daemon(netns)
    try:
        daemon.ok("plugin", "install", demo_plugin)
        created = daemon.cli(
            "vm", "create", "iso-1", "--plugin", "roost-demo", "--network-mode", "vsock"
        )
        assert created.exit_code == 0
        vm = daemon.ok("vm", "show", "iso-1")
        console = wait_ready(daemon, "iso-1")
        assert "roost-guest: interfaces lo\n" in console
        assert "roost-ready: name=iso-1 ip=none" in console
        network = vm["network"]
        assert (network["ip"], network["mac"], network["tap"], network["bridge"]) == (
            None,
            None,
            None,
            None,
        )
        backend = "kernel" if Path("/dev/vhost-vsock").exists() else "user"
        assert (vm["vsock"]["available"], vm["vsock"]["backend"]) == (True, backend)
        assert "warning" not in created.stderr
        assert not [link for link in links(netns) if link.startswith("rtap")]
    finally:
        daemon.close()


def test_plugin_default_and_vm_override(
    netns: str, dhcp_server: DHCPServer, tmp_path: Path, demo_plugin: Path
) -> None:
    plugin = make_demo_plugin(
        tmp_path, "web", network={"mode": "bridged", "subnet": "10.100.0.0/24", "auto_assign": True}
    )
    daemon = qemu_daemon(netns, "--dhcp-bridge", DHCP_BRIDGE)
    try:
        daemon.ok("plugin", "install", plugin)
        default = daemon.ok("vm", "create", "web-1", "--plugin", "web")
        override = daemon.ok("vm", "create", "web-2", "--plugin", "web", "--network-mode", "dhcp")
        assert (default["network"]["source"], default["network"]["mode"]) == ("plugin", "bridged")
        assert (override["network"]["source"], override["network"]["mode"]) == ("vm", "dhcp")
        ip = default["network"]["ip"]
        assert ip.startswith("10.100.0.")
        wait_ready(daemon, "web-1")
        assert http_get(netns, f"http://{ip}/") == f"web-1 {ip}\n"
        console = wait_ready(daemon, "web-2")
        leased = re.search(rf"roost-ready: name=web-2 ip=({DHCP_NET}\.\d+)", console)
        assert leased, console
        assert http_get(netns, f"http://{leased[1]}/") == f"web-2 {leased[1]}\n"
    finally:
        daemon.close()


def test_two_guests_on_one_bridge_reach_each_other(
    netns: str, tmp_path: Path, demo_plugin: Path
) -> None:
    daemon = qemu_daemon(netns)
    try:
        daemon.ok("plugin", "install", demo_plugin)
        first = daemon.ok("vm", "create", "peer-1", "--plugin", "roost-demo")
        config = tmp_path / "prober.json"
        config.write_text(
            json.dumps(
                {"plugin": "roost-demo", "boot_args": f"roost.probe={first['network']['ip']}"}
            )
        )
        daemon.ok("vm", "create", "peer-2", "--plugin", "roost-demo", "--config", config)
        wait_ready(daemon, "peer-1")
        wait_for(
            lambda: "roost-probe:" in console_of(daemon, "peer-2"),
            timeout=90,
            what="peer-2's probe result",
        )
        assert f"roost-probe: {first['network']['ip']} reachable" in console_of(daemon, "peer-2")
    finally:
        daemon.close()


def test_a_guest_that_powers_off_is_stopped_with_exit_code_zero(
    netns: str, demo_plugin: Path
) -> None:
    daemon = qemu_daemon(netns)
    try:
        daemon.ok("plugin", "install", demo_plugin)
        vm = daemon.ok("vm", "create", "q-1", "--plugin", "roost-demo", "--network-mode", "vsock")
        wait_ready(daemon, "q-1")
        qmp(vm["vmm"]["api_socket"], "quit")  # behind roost's back
        stopped = wait_for(
            lambda: (v := daemon.ok("vm", "show", "q-1"))["status"] != "running" and v,
            what="roost to notice",
        )
        assert (stopped["status"], stopped["exit_code"], stopped["status_reason"]) == (
            "stopped",
            0,
            None,
        )
        assert not process_alive(vm["vmm"]["pid"])
        # a graceful stop powers the guest off: exit code 0 as well
        daemon.ok("vm", "start", "q-1")
        wait_ready(daemon, "q-1", fresh=True)
        assert daemon.ok("vm", "stop", "q-1", "--timeout", "20")["exit_code"] == 0
        assert daemon.cli("vm", "console", "q-1").stdout.count("roost-ready:") == 2
    finally:
        daemon.close()


def qmp(socket_path: str, command: str) -> dict[str, Any]:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(socket_path)
        reader = conn.makefile("rb")
        reader.readline()  # greeting
        for message in ({"execute": "qmp_capabilities"}, {"execute": command}):
            conn.sendall(json.dumps(message).encode() + b"\n")
            while True:
                reply = json.loads(reader.readline())
                if "return" in reply or "error" in reply:
                    break
        return dict(reply)


def test_a_vm_may_choose_qemu_and_its_console_can_be_followed(
    netns: str, demo_plugin: Path
) -> None:
    daemon = Daemon(netns).start()  # Firecracker by default
    try:
        daemon.ok("plugin", "install", demo_plugin)
        vm = daemon.ok(
            "vm",
            "create",
            "pick-1",
            "--plugin",
            "roost-demo",
            "--vmm",
            "qemu",
            "--network-mode",
            "vsock",
        )
        assert vm["vmm"]["kind"] == "qemu"
        assert vm["console_log"].endswith("/pick-1/console.log")
        wait_ready(daemon, "pick-1")
        follower = subprocess.Popen(  # the CLI itself, as a user runs it
            [
                sys.executable,
                "-m",
                "roost.cli.main",
                "--api",
                daemon.api,
                "vm",
                "console",
                "pick-1",
                "-f",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            daemon.ok("vm", "stop", "pick-1", "--timeout", "20")
            followed, _ = follower.communicate(timeout=30)  # ends once the VM has stopped
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        assert follower.returncode == 0
        assert "roost-ready: name=pick-1" in followed
        assert "roost-guest: poweroff" in followed
    finally:
        daemon.close()
