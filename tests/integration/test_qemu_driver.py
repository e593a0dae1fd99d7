"""The QEMU driver against real QEMU and the demo guest, inside a test network namespace:
boot, network, pause/resume, every way of stopping, the accelerator choice, launch failures.

Every guest has a deadline and one retry (TCG boots hang now and then); every QEMU is ended
by PID and reaped, and the namespace goes with all its links.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from roost.errors import VMMFailedError
from roost.host.netns import NetnsWorker
from roost.plan.nic_args import GuestNIC, nic_args
from roost.vmm.base import NIC, LaunchSpec, RunDir
from roost.vmm.process import VMMProcess
from roost.vmm.qemu import Machine, QemuDriver
from roost.vmm.qmp import qmp
from tests import harness
from tests.harness import (
    INITRAMFS,
    KERNEL,
    bridged_tap,
    missing,
    namespace_pids,
    process_alive,
    run,
    short_tmp,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.e2e,
    pytest.mark.skipif(
        bool(missing([KERNEL, INITRAMFS])),
        reason=f"needs the demo guest ({', '.join(missing([KERNEL, INITRAMFS]))}); run make setup",
    ),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="needs qemu-system-x86_64 (apt-get install --no-install-recommends qemu-system-x86)",
    ),
]
MACHINES = ["microvm", "q35"]
READY_WAIT = 60.0
GUEST_IP = "10.0.0.5"
BRIDGED_ARGS = f"console=ttyS0 ip={GUEST_IP}::10.0.0.1:255.255.255.0:g1:eth0:off roost.name=g1"
HTTP_GET = (
    "import sys, urllib.request\n"
    "print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode(), end='')"
)


class Guests:
    """Boots one test's guests; afterwards kills (by PID) and reaps whatever still runs."""

    def __init__(self, worker: NetnsWorker, root: Path) -> None:
        self.worker = worker
        self.root = root
        self.started: list[tuple[QemuDriver, VMMProcess]] = []

    def spec(self, name: str, boot_args: str, *nics: NIC) -> LaunchSpec:
        run_dir = RunDir(self.root / name)
        run_dir.prepare()
        return LaunchSpec(
            name=name,
            run_dir=run_dir,
            kernel=KERNEL,
            initrd=INITRAMFS,
            rootfs=None,
            boot_args=boot_args,
            vcpus=1,
            memory_mib=256,
            nics=nics,
            vsock=None,
        )

    def launch(self, driver: QemuDriver, spec: LaunchSpec) -> VMMProcess:
        process = driver.launch(spec, self.worker)
        self.started.append((driver, process))
        return process

    def boot(self, driver: QemuDriver, spec: LaunchSpec) -> tuple[VMMProcess, str]:
        """Launch and wait for `roost-ready:` on the console; one retry if the guest hangs.
        Returns the process and this boot's console output."""
        for attempt in (1, 2):
            console = spec.run_dir.console_log
            offset = console.stat().st_size if console.exists() else 0
            started = time.monotonic()
            process = self.launch(driver, spec)
            deadline = started + READY_WAIT
            while time.monotonic() < deadline:
                text = console_since(spec.run_dir, offset)
                if "\nroost-ready:" in text and text.endswith("\n"):
                    print(f"{spec.name}: launch -> ready {time.monotonic() - started:.2f}s")
                    return process, text
                assert not process.exited(), f"QEMU ended during boot:\n{text[-2000:]}"
                time.sleep(0.05)
            driver.stop(process, 0, force=True)
            print(f"{spec.name}: no roost-ready within {READY_WAIT:g}s (attempt {attempt})")
        raise AssertionError(f"{spec.name} never became ready")

    def close(self) -> None:
        for driver, process in self.started:
            driver.stop(process, 0, force=True)


def console_since(run_dir: RunDir, offset: int) -> str:
    """The console from `offset` on, with the serial line's CRLFs as plain newlines."""
    with run_dir.console_log.open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace").replace("\r\n", "\n")


def http_get(netns: str, timeout: float) -> str | None:
    result = run(
        sys.executable,
        "-c",
        HTTP_GET,
        f"http://{GUEST_IP}/",
        str(timeout),
        netns=netns,
        check=False,
    )
    return result.stdout if result.returncode == 0 else None


def gone(process: VMMProcess) -> bool:
    """Ended and reaped: the supervisor has written its exit status."""
    return not process_alive(process.pid) and process.exit_file.exists()


def status(driver: QemuDriver, spec: LaunchSpec) -> str:
    return str(qmp(driver.api_socket(spec.run_dir), "query-status")["status"])


@pytest.fixture
def guests(netns: str, tmp_short: Path) -> Iterator[Guests]:
    worker = NetnsWorker(netns)
    instance = Guests(worker, tmp_short)
    try:
        yield instance
    finally:
        instance.close()
        worker.close()
        assert namespace_pids(netns) == []


@pytest.fixture
def tap(netns: str) -> str:
    """A tap on bridge br0 inside the test's namespace."""
    return bridged_tap(netns)


@pytest.mark.parametrize("machine", MACHINES)
def test_a_guest_without_nic_boots_and_powers_off(guests: Guests, machine: Machine) -> None:
    driver = QemuDriver(machine=machine, accel="tcg")
    spec = guests.spec("g0", "console=ttyS0 roost.name=g0")
    process, console = guests.boot(driver, spec)
    assert "roost-guest: interfaces lo\n" in console
    assert "roost-ready: name=g0 ip=none" in console
    assert status(driver, spec) == "running"
    assert driver.stop(process, 10, force=False) == 0  # the ACPI power button
    assert "roost-guest: poweroff" in spec.run_dir.console_log.read_text()
    assert gone(process)


@pytest.mark.parametrize("machine", MACHINES)
def test_a_bridged_guest_serves_http_pauses_resumes_and_dies_on_force(
    guests: Guests, netns: str, tap: str, machine: Machine
) -> None:
    driver = QemuDriver(machine=machine, accel="tcg")
    spec = guests.spec("g1", BRIDGED_ARGS, NIC(tap=tap, mac="06:00:0a:00:00:05"))
    process, console = guests.boot(driver, spec)
    assert "roost-guest: interfaces lo eth0\n" in console
    assert f"roost-net: eth0 static {GUEST_IP}/24 gw 10.0.0.1\n" in console
    assert http_get(netns, 5) == f"g1 {GUEST_IP}\n"

    driver.pause(process)
    assert status(driver, spec) == "paused"
    assert http_get(netns, 1) is None  # a paused guest answers nothing
    driver.resume(process)
    assert status(driver, spec) == "running"
    assert http_get(netns, 5) == f"g1 {GUEST_IP}\n"

    assert driver.stop(process, 10, force=True) == -9
    assert gone(process)


def test_auto_accel_settles_on_tcg_here_and_says_why(
    guests: Guests, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="roost.vmm.qemu")
    driver = QemuDriver()
    assert driver.accel_in_use is None
    process, _ = guests.boot(driver, guests.spec("g2", "console=ttyS0 roost.name=g2"))
    assert driver.accel_in_use == "tcg"
    [why] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("QEMU will use")]
    assert why.startswith("QEMU will use tcg: ")
    print(why)
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    assert any(b"tsc_early_khz=" in arg for arg in cmdline)
    assert driver.stop(process, 10, force=False) == 0


@pytest.mark.parametrize("machine", MACHINES)
def test_a_qmp_quit_behind_the_drivers_back_ends_with_exit_code_0(
    guests: Guests, machine: Machine
) -> None:
    driver = QemuDriver(machine=machine, accel="tcg")
    spec = guests.spec("g3", "console=ttyS0 roost.name=g3")
    process = guests.launch(driver, spec)
    qmp(driver.api_socket(spec.run_dir), "quit")
    assert process.wait(10)
    assert process.exit_code() == 0
    assert driver.stop(process, 10, force=False) == 0  # nothing left to do but report
    assert gone(process)


def test_a_stop_before_the_guest_heeds_the_power_button_falls_back_to_quit(
    guests: Guests,
) -> None:
    driver = QemuDriver(accel="tcg")
    process = guests.launch(driver, guests.spec("g6", "console=ttyS0 roost.name=g6"))
    started = time.monotonic()
    assert driver.stop(process, 0.5, force=False) == 0  # powerdown lost in early boot: quit
    assert time.monotonic() - started < 0.5 + 3
    assert gone(process)


def test_a_missing_tap_is_refused_before_qemu_starts(guests: Guests, netns: str) -> None:
    driver = QemuDriver(accel="tcg")
    spec = guests.spec("g4", BRIDGED_ARGS, NIC(tap="rtap-none", mac="06:00:0a:00:00:05"))
    with pytest.raises(VMMFailedError, match="tap rtap-none does not exist"):
        guests.launch(driver, spec)
    assert not (spec.run_dir.path / "vmm.pid").exists()
    assert "rtap-none" not in run("ip", "link", netns=netns).stdout


def test_a_kernel_qemu_cannot_load_fails_with_its_words_and_leaves_nothing(
    guests: Guests, tmp_short: Path
) -> None:
    bogus = tmp_short / "not-a-kernel"
    bogus.write_bytes(b"\0" * 4096)
    driver = QemuDriver(accel="tcg")
    spec = replace(guests.spec("g5", "console=ttyS0"), kernel=bogus)
    with pytest.raises(VMMFailedError, match="QEMU said") as failure:
        guests.launch(driver, spec)
    print(failure.value)
    pid = int((spec.run_dir.path / "vmm.pid").read_text())
    assert not process_alive(pid)


def bridge_with_tap(netns: str, bridge: str, tap: str, *addresses: str) -> None:
    """`bridge` with `addresses` (IPv6 ones without duplicate address detection, so usable at
    once) and `tap` on it, inside the test's namespace."""
    run("ip", "link", "add", bridge, "type", "bridge", netns=netns)
    for address in addresses:
        run(
            "ip",
            "addr",
            "add",
            address,
            "dev",
            bridge,
            *(["nodad"] * (":" in address)),
            netns=netns,
        )
    run("ip", "link", "set", bridge, "up", netns=netns)
    run("ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr", netns=netns)
    run("ip", "link", "set", tap, "master", bridge, "up", netns=netns)


@contextlib.contextmanager
def dnsmasq(netns: str, *options: str) -> Iterator[None]:
    """dnsmasq in the test's namespace serving 10.3.0.100-150 on br3 (its own address offered
    as the router), with `options` on top; ended by PID and reaped afterwards."""
    leases = short_tmp()
    server = subprocess.Popen(
        [
            *("ip", "netns", "exec", netns, "dnsmasq", "--no-daemon", "--no-ping"),
            *("--bind-interfaces", "--port=0", "--interface=br3", "--conf-file=/dev/null"),
            "--dhcp-range=10.3.0.100,10.3.0.150,255.255.255.0,1h",
            f"--dhcp-leasefile={leases / 'leases'}",
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(leases, ignore_errors=True)


@pytest.fixture
def dhcp_bridge(netns: str) -> Iterator[str]:
    """Bridge br3 (10.3.0.1/24) with tap rtap3 on it and dnsmasq serving addresses there."""
    bridge_with_tap(netns, "br3", "rtap3", "10.3.0.1/24")
    with dnsmasq(netns):
        yield "rtap3"


@pytest.mark.parametrize("machine", MACHINES)
def test_a_guest_with_three_nics_configures_each_by_its_mac_and_routes_by_roost_default(
    guests: Guests, netns: str, dhcp_bridge: str, machine: Machine
) -> None:
    """The NICs are given out of their MACs' order, with names the kernel's probe order may
    swap; the default route (IPv4 and IPv6) is the last one's, not the dhcp server's router."""
    bridge_with_tap(netns, "br1", "rtap1", "10.1.0.1/24", "fd01::1/64")
    bridge_with_tap(netns, "br2", "rtap2", "10.2.0.1/24")
    lan, dhcp, wan = "06:00:0a:01:00:0a", "06:00:0a:03:00:0c", "06:00:0a:02:00:0b"
    interfaces = (
        GuestNIC(
            wan,
            name="eth1",
            ipv4=ipaddress.IPv4Interface("10.2.0.5/24"),
            gateway=ipaddress.IPv4Address("10.2.0.1"),
        ),
        GuestNIC(dhcp, name="dhcp0", dhcp=True, mtu=1400),
        GuestNIC(
            lan,
            name="eth0",
            ipv4=ipaddress.IPv4Interface("10.1.0.5/24"),
            gateway=ipaddress.IPv4Address("10.1.0.1"),
            ipv6=ipaddress.IPv6Interface("fd01::5/64"),
            ipv6_gateway=ipaddress.IPv6Address("fd01::1"),
            default_route=True,
        ),
    )
    boot_args = " ".join(["console=ttyS0 roost.name=g7", *nic_args(interfaces, "g7")])
    nics = (NIC("rtap2", wan), NIC(dhcp_bridge, dhcp), NIC("rtap1", lan))
    driver = QemuDriver(machine=machine, accel="tcg")
    _, console = guests.boot(driver, guests.spec("g7", boot_args, *nics))
    print(console)

    reported = {
        line.split()[1]: line.split()[2:]
        for line in console.splitlines()
        if line.startswith("roost-nic: ")
    }
    assert reported["eth0"] == [lan, "10.1.0.5/24", "fd01::5/64"]
    assert reported["eth1"] == [wan, "10.2.0.5/24"]
    [mac, leased] = reported["dhcp0"]
    assert mac == dhcp and leased.startswith("10.3.0.") and leased.endswith("/24")
    assert "roost-route: ipv4 default via 10.1.0.1 dev eth0\n" in console
    assert "roost-route: ipv6 default via fd01::1 dev eth0\n" in console
    assert "roost-ready: name=g7 ip=10.1.0.5 " in console
    for url in ("http://10.1.0.5/", "http://10.2.0.5/", f"http://{leased.split('/')[0]}/"):
        assert harness.http_get(netns, url, timeout=10) == "g7 10.1.0.5\n"
    assert harness.http_get(netns, "http://[fd01::5]/", timeout=10) == "g7 10.1.0.5\n"


def test_a_guest_with_a_static_ipv6_address_forms_no_slaac_one_beside_it(
    guests: Guests, netns: str
) -> None:
    """Router advertisements for its prefix reach the guest (dnsmasq answers its solicitation
    at once) before it reports (its dhcp NIC's offer is held back 3 s): the static address is
    its only global one, as anti-spoofing lets no other out."""
    bridge_with_tap(netns, "br1", "rtap1", "10.1.0.1/24", "fd01::1/64")
    bridge_with_tap(netns, "br3", "rtap3", "10.3.0.1/24")
    lan, dhcp = "06:00:0a:01:00:0a", "06:00:0a:03:00:0c"
    interfaces = (
        GuestNIC(
            lan,
            ipv4=ipaddress.IPv4Interface("10.1.0.5/24"),
            gateway=ipaddress.IPv4Address("10.1.0.1"),
            ipv6=ipaddress.IPv6Interface("fd01::5/64"),
            ipv6_gateway=ipaddress.IPv6Address("fd01::1"),
            default_route=True,
        ),
        GuestNIC(dhcp, dhcp=True),
    )
    boot_args = " ".join(["console=ttyS0 roost.name=g8", *nic_args(interfaces, "g8")])
    spec = guests.spec("g8", boot_args, NIC("rtap1", lan), NIC("rtap3", dhcp))
    advertising = ("--interface=br1", "--enable-ra", "--dhcp-range=fd01::,ra-only,64")
    with dnsmasq(netns, *advertising, "--dhcp-reply-delay=3"):
        _, console = guests.boot(QemuDriver(accel="tcg"), spec)
    print(console)
    reported = {
        line.split()[2]: line.split()[3:]
        for line in console.splitlines()
        if line.startswith("roost-nic: ")
    }
    assert reported[lan] == ["10.1.0.5/24", "fd01::5/64"]
