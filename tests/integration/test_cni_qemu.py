"""cni interfaces end to end: a real daemon in a throwaway netns runs Debian's `bridge` and
`host-local` plugins for a QEMU guest (TCG) in the `cni` mode. The guest boots with the address
host-local gave it and answers HTTP from the daemon's namespace through the plugin's bridge,
the veth and roost's tc redirect; CHECK at a daemon restart finds a redirect cut by hand; a
Firecracker VM (paused: its guest cannot run here) runs in the VM's namespace with the plugins'
MAC; a removal, a daemon killed in the middle of ADD, and a conflist naming a missing plugin
leave no namespace, veth, tap or lease behind; a second daemon never touches the first's VM
namespace, which is host-wide, through a VM of the same name."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost.host.cni import vm_namespace
from roost.host.netns import netns_path
from tests.harness import (
    DEMO,
    FIRECRACKER,
    Daemon,
    http_get,
    links,
    network_namespace,
    process_alive,
    run,
    short_tmp,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.root, pytest.mark.e2e]

BIN_DIR = Path("/usr/lib/cni")
NETWORK = "roostcni"
BRIDGE = "rcni0"
SUBNET = ipaddress.IPv4Network("10.89.0.0/24")
MTU = 1400

if not (BIN_DIR / "bridge").exists():
    pytest.skip("needs containernetworking-plugins (make setup)", allow_module_level=True)

# the real bridge plugin, then, for an ADD while the pause file exists, a wait the test kills
# the daemon in: the plugins have made the veth and taken the lease, the daemon has no result
SLOW_BRIDGE = """#!/bin/sh
out=$({bridge}); status=$?
printf '%s' "$out"
if [ "$CNI_COMMAND" = ADD ] && [ -e {pause} ]; then
    echo $$ > {pid}
    exec sleep 120
fi
exit $status
"""


@dataclass
class Cni:
    """The conf dir the daemon reads, a bin dir of test plugins, and host-local's leases."""

    conf_dir: Path
    bin_dir: Path
    data_dir: Path

    def conflist(self, name: str, bridge_type: str = "bridge") -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [
                {
                    "type": bridge_type,
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "mtu": MTU,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(SUBNET)}]],
                        "dataDir": str(self.data_dir),
                    },
                }
            ],
        }

    def leases(self) -> list[str]:
        """host-local's lease files (one per address, named by it)."""
        found = []
        for directory in self.data_dir.iterdir() if self.data_dir.exists() else []:
            found += [p.name for p in directory.iterdir() if p.name[0].isdigit()]
        return sorted(found)


@pytest.fixture
def cni() -> Iterator[Cni]:
    directory = short_tmp()
    setup = Cni(directory / "net.d", directory / "bin", directory / "leases")
    setup.conf_dir.mkdir()
    setup.bin_dir.mkdir()
    (setup.conf_dir / "10-roost.conflist").write_text(json.dumps(setup.conflist(NETWORK)))
    try:
        yield setup
    finally:
        run("rm", "-rf", str(directory))


def cni_daemon(netns: str, cni: Cni) -> Daemon:
    return Daemon(
        netns,
        "--vmm", "qemu",
        "--cni-conf-dir", str(cni.conf_dir),
        "--cni-bin-dir", str(cni.bin_dir),
        "--cni-bin-dir", str(BIN_DIR),
        firecracker=None,
    )  # fmt: skip


def create(
    daemon: Daemon, name: str, network: str = NETWORK, *, start: bool = True
) -> httpx.Response:
    body = {
        "name": name,
        "plugin": "roost-demo",
        "network": {"mode": "cni", "cni": {"network": network}},
        "start": start,
    }
    return daemon.http.post("/v1/vms", json=body)


def vm_name() -> str:
    return f"c{secrets.token_hex(3)}"


def assert_nothing_left(daemon: Daemon, cni: Cni, name: str) -> None:
    """No namespace, veth, tap or lease of the VM: only the plugin's bridge stays."""
    assert not netns_path(vm_namespace(name)).exists()
    left = [n for n in links(daemon.netns) if n.startswith(("veth", "rtap"))]
    assert left == []
    assert cni.leases() == []


def recovered(daemon: Daemon) -> None:
    wait_for(
        lambda: daemon.http.get("/healthz").json()["status"] == "ok",
        timeout=60,
        what="the daemon to finish recovering",
    )


def test_a_cni_guest_boots_with_host_locals_address_serves_http_and_leaves_nothing(
    netns: str, cni: Cni
) -> None:
    daemon = cni_daemon(netns, cni).start()
    name = vm_name()
    try:
        daemon.ok("plugin", "install", DEMO / "plugin.json")
        response = create(daemon, name)
        assert response.status_code == 201, response.text
        ready = wait_ready(daemon, name)  # a retry restarts it: read its address after
        vm = daemon.ok("vm", "show", name)
        network = vm["network"]
        assert network["mode"] == "cni"
        assert network["cni"]["network"] == NETWORK
        [address] = network["addresses"]
        ip = str(ipaddress.IPv4Interface(address).ip)
        assert ipaddress.IPv4Address(ip) in SUBNET
        assert cni.leases() == [ip]
        ips = [one["address"] for one in network["cni"]["result"]["ips"]]
        assert ips == [address]
        assert f"roost-ready: name={name} ip={ip}" in ready
        # the guest has the plugins' MAC: the veth's in the VM's namespace
        veth = links(vm_namespace(name))["eth0"]["address"]
        assert vm["interfaces"][0]["mac"] == veth
        assert http_get(netns, f"http://{ip}/") == f"{name} {ip}\n"

        # a redirect cut by hand: CHECK at the next daemon start says so, the VM runs on
        run("tc", "filter", "del", "dev", "eth0", "ingress", netns=vm_namespace(name))
        daemon.stop()
        daemon.start()
        recovered(daemon)
        vm = daemon.ok("vm", "show", name)
        assert vm["status"] == "running"
        assert "CNI CHECK failed" in vm["status_reason"]
        assert "no tc filter redirects frames from eth0" in vm["status_reason"]

        assert daemon.cli("vm", "rm", name).exit_code == 0
        assert_nothing_left(daemon, cni, name)
    finally:
        daemon.close()
    assert not netns_path(vm_namespace(name)).exists()


@pytest.mark.firecracker
@pytest.mark.parametrize("jailed", [False, True], ids=["plain", "jailed"])
def test_a_firecracker_vm_in_cni_mode_runs_in_its_namespace_with_the_plugins_mac(
    netns: str, cni: Cni, jailed: bool
) -> None:
    jailer = ["--jailer", str(FIRECRACKER.parent / "jailer"), "--uid", "65534", "--gid", "65534"]
    daemon = Daemon(
        netns,
        "--cni-conf-dir", str(cni.conf_dir),
        "--cni-bin-dir", str(BIN_DIR),
        *(jailer if jailed else []),
    ).start()  # fmt: skip
    name = vm_name()
    try:
        daemon.ok("plugin", "install", DEMO / "plugin.json")
        response = create(daemon, name)
        assert response.status_code == 201, response.text
        daemon.ok("vm", "pause", name)  # its guest cannot run here
        vm = response.json()
        tap = vm["network"]["tap"]
        [nic] = daemon.firecracker_config(vm)["network-interfaces"]
        assert (nic["host_dev_name"], nic["guest_mac"]) == (tap, vm["network"]["mac"])
        assert vm["network"]["mac"] == links(vm_namespace(name))["eth0"]["address"]
        assert os.readlink(f"/proc/{vm['vmm']['pid']}/ns/net") == _namespace_id(name)
        assert tap not in links(netns)  # the tap is in the VM's namespace only
        if jailed:  # opened by the jailed Firecracker as its uid
            tap_owner = Path(f"/sys/class/net/{tap}/owner")
            owner = run("cat", str(tap_owner), netns=vm_namespace(name)).stdout.strip()
            assert owner == "65534"

        assert daemon.cli("vm", "rm", name).exit_code == 0
        assert_nothing_left(daemon, cni, name)
    finally:
        daemon.close()


def _namespace_id(name: str) -> str:
    """`net:[inode]` of the VM's namespace, as /proc/<pid>/ns/net reads."""
    return f"net:[{netns_path(vm_namespace(name)).stat().st_ino}]"


def test_a_daemon_killed_in_the_middle_of_add_leaves_nothing_once_restarted(
    netns: str, cni: Cni
) -> None:
    pause, pid_file = cni.bin_dir / "pause", cni.bin_dir / "pid"
    slow = cni.bin_dir / "slowbridge"
    slow.write_text(SLOW_BRIDGE.format(bridge=BIN_DIR / "bridge", pause=pause, pid=pid_file))
    slow.chmod(0o755)
    (cni.conf_dir / "20-slow.conflist").write_text(json.dumps(cni.conflist("slow", "slowbridge")))
    pause.touch()
    daemon = cni_daemon(netns, cni).start()
    name = vm_name()
    try:
        daemon.ok("plugin", "install", DEMO / "plugin.json")
        answers: list[Any] = []
        creating = threading.Thread(
            target=lambda: answers.append(_quietly(lambda: create(daemon, name, "slow")))
        )
        creating.start()
        wait_for(pid_file.exists, timeout=30, what="the plugin to be in the middle of ADD")
        assert cni.leases() != []  # host-local has given the address
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        creating.join(30)
        assert isinstance(answers[0], httpx.TransportError)
        pause.unlink()
        plugin_pid = int(pid_file.read_text())
        _kill(plugin_pid)

        daemon.start()
        recovered(daemon)
        assert daemon.http.get(f"/v1/vms/{name}").status_code == 404  # the create rolled back
        assert_nothing_left(daemon, cni, name)
    finally:
        daemon.close()


def test_a_conflist_naming_a_missing_plugin_is_a_502_that_leaves_nothing(
    netns: str, cni: Cni, tmp_path: Path
) -> None:
    daemon = cni_daemon(netns, cni).start()
    name, stopped = vm_name(), vm_name()
    try:
        daemon.ok("plugin", "install", DEMO / "plugin.json")
        broken = tmp_path / "broken.json"
        broken.write_text(json.dumps(cni.conflist("broken", "nosuchplugin")))
        daemon.ok("network", "create", "broken", "--cni", broken)

        response = create(daemon, name, "broken")

        assert response.status_code == 502, response.text
        error = response.json()["error"]
        assert error["code"] == "host_error"
        assert "'nosuchplugin'" in error["message"] and "--cni-bin-dir" in error["message"]
        assert daemon.http.get(f"/v1/vms/{name}").status_code == 404
        assert_nothing_left(daemon, cni, name)
        # nothing recorded either: the name is free, and fails again for the same reason only
        again = create(daemon, name, "broken")
        assert again.status_code == 502, again.text
        assert again.json()["error"]["message"] == error["message"]

        # a start that fails the same way leaves the VM `error`, and nothing else
        assert create(daemon, stopped, "broken", start=False).status_code == 201
        started = daemon.http.post(f"/v1/vms/{stopped}/start")
        assert started.status_code == 502, started.text
        vm = daemon.ok("vm", "show", stopped)
        assert vm["status"] == "error"
        assert "'nosuchplugin'" in vm["status_reason"]
        assert_nothing_left(daemon, cni, stopped)
    finally:
        daemon.close()


def test_a_second_daemons_vm_of_the_same_name_never_touches_the_first_daemons_namespace(
    netns: str, cni: Cni
) -> None:
    """/run/netns is the host's: daemon B's cni VM of A's VM's name is refused with a 409
    (before any plugin runs in A's namespace), and B's VM of that name without a cni interface
    leaves A's namespace be when B restarts (its reap) and when the VM is removed."""
    first = cni_daemon(netns, cni).start()
    name = vm_name()
    try:
        first.ok("plugin", "install", DEMO / "plugin.json")
        assert create(first, name).status_code == 201
        namespace = netns_path(vm_namespace(name))
        [lease] = cni.leases()
        with network_namespace() as other_netns:
            second = cni_daemon(other_netns, cni).start()
            try:
                second.ok("plugin", "install", DEMO / "plugin.json")
                refused = create(second, name)
                assert refused.status_code == 409, refused.text
                message = refused.json()["error"]["message"]
                assert f"network namespace {vm_namespace(name)} exists" in message
                assert f"'ip netns delete {vm_namespace(name)}'" in message
                assert second.http.get(f"/v1/vms/{name}").status_code == 404

                plain = {"name": name, "plugin": "roost-demo", "start": False}
                assert second.http.post("/v1/vms", json=plain).status_code == 201
                second.stop()
                second.start()
                recovered(second)
                assert second.cli("vm", "rm", name).exit_code == 0
            finally:
                second.close()
        assert namespace.exists()
        assert cni.leases() == [lease]
        assert first.ok("vm", "show", name)["status"] == "running"
        assert first.cli("vm", "rm", name).exit_code == 0
        assert_nothing_left(first, cni, name)
    finally:
        first.close()


def _quietly(call: Any) -> Any:
    try:
        return call()
    except httpx.HTTPError as error:
        return error


def _kill(pid: int) -> None:
    """End the paused plugin (a child of the daemon it outlived, so not ours to reap)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_for(lambda: not process_alive(pid), timeout=10, what="the plugin to end")
