"""The QEMU driver's pure parts: its command lines, the KVM probe's verdict, the TSC rate, the
accelerator decision and the QMP client (against a fake monitor). No root, no real QEMU."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from roost.errors import InvalidError, VMMFailedError, VMMUnavailableError
from roost.host.netns import NetnsWorker
from roost.vmm import qemu
from roost.vmm.base import NIC, LaunchSpec, RunDir, Vsock, VsockBackend
from roost.vmm.qemu import QemuDriver, guest_cmdline, kvm_verdict, qemu_argv, tsc_khz_from
from roost.vmm.qmp import qmp
from tests.harness import serve_unix

QEMU = Path("/usr/bin/qemu-system-x86_64")
RUN = RunDir(Path("/run/roost/vms/g1"))
HEAD = [
    *("-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none"),
    *("-no-reboot", "-kernel", "/k/vmlinux", "-initrd", "/k/initrd.gz"),
]
CONSOLE = [
    *("-chardev", "file,id=ser,path=/run/roost/vms/g1/console.log,append=on"),
    *("-serial", "chardev:ser", "-qmp", "unix:/run/roost/vms/g1/qmp.sock,server=on,wait=off"),
]


def spec(
    *,
    nic: bool = False,
    vsock: VsockBackend | None = None,
    rootfs: bool = False,
    initrd: bool = True,
    boot_args: str = "console=ttyS0",
) -> LaunchSpec:
    return LaunchSpec(
        name="g1",
        run_dir=RUN,
        kernel=Path("/k/vmlinux"),
        initrd=Path("/k/initrd.gz") if initrd else None,
        rootfs=Path("/k/root.img") if rootfs else None,
        boot_args=boot_args,
        vcpus=1,
        memory_mib=256,
        nics=(NIC(tap="rtap1", mac="06:00:0a:00:00:05"),) if nic else (),
        vsock=Vsock(cid=7, uds_path=RUN.vsock_socket, backend=vsock) if vsock else None,
    )


def argv(launch: LaunchSpec, machine: qemu.Machine = "microvm", **options: Any) -> list[str]:
    settings: dict[str, Any] = {"accel": "tcg", "tsc_khz": 2_600_000} | options
    return qemu_argv(QEMU, launch, machine=machine, **settings)


def test_microvm_tcg_without_nic_is_the_measured_command_line() -> None:
    assert argv(spec()) == [
        str(QEMU),
        *("-name", "g1", "-M", "microvm", "-accel", "tcg", *HEAD),
        *("-append", "console=ttyS0 tsc_early_khz=2600000", *CONSOLE),
    ]


def test_microvm_tcg_with_nic_rootfs_and_kernel_vsock() -> None:
    assert argv(spec(nic=True, vsock=VsockBackend.KERNEL, rootfs=True)) == [
        str(QEMU),
        *("-name", "g1", "-M", "microvm", "-accel", "tcg", *HEAD),
        *("-append", "console=ttyS0 tsc_early_khz=2600000", *CONSOLE),
        *("-drive", "file=/k/root.img,format=raw,if=none,id=rootfs"),
        *("-device", "virtio-blk-device,drive=rootfs"),
        *("-netdev", "tap,id=n0,ifname=rtap1,script=no,downscript=no,vhost=off"),
        *("-device", "virtio-net-device,netdev=n0,mac=06:00:0a:00:00:05"),
        *("-device", "vhost-vsock-device,guest-cid=7"),
    ]


@pytest.mark.parametrize(("machine", "virtio"), [("microvm", "device"), ("q35", "pci")])
def test_every_nic_gets_its_own_tap_netdev_and_device_with_its_mac_in_list_order(
    machine: qemu.Machine, virtio: str
) -> None:
    nics = (NIC("rtap-b", "06:00:00:00:00:0b"), NIC("rtap-a", "06:00:00:00:00:0a"))
    words = argv(replace(spec(), nics=nics), machine)
    start = words.index("-netdev")
    assert words[start:] == [
        *("-netdev", "tap,id=n0,ifname=rtap-b,script=no,downscript=no,vhost=off"),
        *("-device", f"virtio-net-{virtio},netdev=n0,mac=06:00:00:00:00:0b"),
        *("-netdev", "tap,id=n1,ifname=rtap-a,script=no,downscript=no,vhost=off"),
        *("-device", f"virtio-net-{virtio},netdev=n1,mac=06:00:00:00:00:0a"),
    ]


def test_vhost_net_where_the_host_has_it() -> None:
    args = argv(spec(nic=True), vhost_net=True)
    assert "tap,id=n0,ifname=rtap1,script=no,downscript=no,vhost=on" in args


def test_q35_uses_pci_devices_and_no_tsc_hint() -> None:
    assert argv(spec(nic=True, vsock=VsockBackend.KERNEL, rootfs=True), "q35") == [
        str(QEMU),
        *("-name", "g1", "-M", "q35", "-accel", "tcg", *HEAD),
        *("-append", "console=ttyS0", *CONSOLE),
        *("-drive", "file=/k/root.img,format=raw,if=none,id=rootfs"),
        *("-device", "virtio-blk-pci,drive=rootfs"),
        *("-netdev", "tap,id=n0,ifname=rtap1,script=no,downscript=no,vhost=off"),
        *("-device", "virtio-net-pci,netdev=n0,mac=06:00:0a:00:00:05"),
        *("-device", "vhost-vsock-pci,guest-cid=7"),
    ]


@pytest.mark.parametrize("machine", ["microvm", "q35"])
def test_the_user_vsock_backend_gets_shared_guest_memory_and_a_vhost_user_device(
    machine: qemu.Machine,
) -> None:
    words = argv(spec(vsock=VsockBackend.USER), machine)
    virtio = "device" if machine == "microvm" else "pci"
    assert words[words.index("-M") + 1] == f"{machine},memory-backend=mem"
    assert words[-6:] == [
        *("-object", "memory-backend-memfd,id=mem,size=256M,share=on"),
        *("-chardev", "socket,id=vu,path=/run/roost/vms/g1/vhost-user.sock"),
        *("-device", f"vhost-user-vsock-{virtio},chardev=vu"),
    ]
    assert "guest-cid" not in " ".join(words)  # QEMU 7.2 reads it from the backend


def test_the_vsock_backend_names_the_run_dir_and_the_cid() -> None:
    words = qemu.device_argv(spec(vsock=VsockBackend.USER))
    assert words[1:4] == ["-I", "-m", "roost.vmm.vsock"]
    assert words[4:] == [
        *("--vhost-user", "/run/roost/vms/g1/vhost-user.sock"),
        *("--uds", "/run/roost/vms/g1/vsock.sock"),
        *("--cid", "7"),
    ]


@pytest.mark.parametrize("machine", ["microvm", "q35"])
@pytest.mark.parametrize("nic", [False, True])
@pytest.mark.parametrize("vsock", [None, VsockBackend.KERNEL, VsockBackend.USER])
@pytest.mark.parametrize("rootfs", [False, True])
def test_devices_follow_the_spec(
    machine: qemu.Machine, nic: bool, vsock: VsockBackend | None, rootfs: bool
) -> None:
    words = argv(spec(nic=nic, vsock=vsock, rootfs=rootfs), machine)
    line = " ".join(words)
    assert ("-netdev tap," in line) == nic
    assert ("vhost-vsock" in line) == (vsock is VsockBackend.KERNEL)
    assert ("vhost-user-vsock" in line) == (vsock is VsockBackend.USER)
    assert ("memory-backend" in line) == (vsock is VsockBackend.USER)
    assert ("-drive file=/k/root.img" in line) == rootfs
    assert words.count("-device") == nic + (vsock is not None) + rootfs


@pytest.mark.parametrize(
    ("machine", "accel", "hinted"),
    [("microvm", "tcg", True), ("microvm", "kvm", False), ("q35", "tcg", False)],
)
def test_tsc_early_khz_only_for_microvm_under_tcg(
    machine: qemu.Machine, accel: str, hinted: bool
) -> None:
    assert ("tsc_early_khz=2600000" in guest_cmdline(spec(), machine, accel, 2_600_000)) is hinted


def test_no_tsc_hint_when_the_rate_is_unknown_or_already_given() -> None:
    assert guest_cmdline(spec(), "microvm", "tcg", None) == "console=ttyS0"
    given = spec(boot_args="console=ttyS0 tsc_early_khz=1000")
    assert guest_cmdline(given, "microvm", "tcg", 2_600_000) == "console=ttyS0 tsc_early_khz=1000"


def test_kvm_runs_on_the_host_cpu() -> None:
    line = argv(spec(), accel="kvm")
    assert line[5:9] == ["-accel", "kvm", "-cpu", "host"]


def test_a_root_disk_without_initrd_is_the_root_device_as_firecracker_makes_it() -> None:
    assert guest_cmdline(spec(rootfs=True, initrd=False), "q35", "tcg", None) == (
        "console=ttyS0 root=/dev/vda rw"
    )
    assert guest_cmdline(spec(rootfs=True), "q35", "tcg", None) == "console=ttyS0"
    own = spec(rootfs=True, initrd=False, boot_args="root=/dev/vda1 ro")
    assert guest_cmdline(own, "q35", "tcg", None) == "root=/dev/vda1 ro"


def test_commas_in_option_values_are_doubled_but_boot_args_keep_theirs() -> None:
    launch = replace(
        spec(rootfs=True), run_dir=RunDir(Path("/run/a,b")), boot_args="console=ttyS0,115200"
    )
    line = argv(launch, "q35")
    assert "file,id=ser,path=/run/a,,b/console.log,append=on" in line
    assert "unix:/run/a,,b/qmp.sock,server=on,wait=off" in line
    assert line[line.index("-append") + 1] == "console=ttyS0,115200"


BOOT_LOG = """\
[    0.000000] Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org)
[    0.000000] Command line: console=ttyS0 panic=-1
[    0.834654] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)
"""


@pytest.mark.parametrize(
    ("console", "exit_code", "stderr", "works", "why"),
    [
        (BOOT_LOG, 0, "", True, "whole init"),
        (BOOT_LOG, None, "", True, "whole init"),
        ("", 1, "error: kvm run failed\nKVM: unhandled MSR 0x10a\n", False, "MSR 0x10a"),
        ("", None, "", False, "printed nothing under KVM within 3s"),
        ("", 0, "", False, "without the kernel printing anything"),
        (BOOT_LOG.splitlines()[0], None, "", False, "did not finish booting"),
        (BOOT_LOG.splitlines()[0], -6, "qemu: aborted\n", False, "exit code -6"),
    ],
)
def test_kvm_verdict_on_canned_probe_outputs(
    console: str, exit_code: int | None, stderr: str, works: bool, why: str
) -> None:
    verdict, reason = kvm_verdict(console, exit_code, stderr)
    assert verdict is works
    assert why in reason


CPUINFO = "processor\t: 0\ncpu MHz\t\t: 2600.000\nflags\t\t: fpu tsc constant_tsc{}\n"


def test_tsc_rate_from_the_kernels_calibration_on_a_host_without_cpufreq(tmp_path: Path) -> None:
    khz, source = tsc_khz_from(CPUINFO.format(""), tmp_path / "none")
    assert (khz, source) == (2_600_000, "the host kernel's TSC calibration (cpu MHz)")


def test_tsc_rate_from_intel_pstates_base_frequency(tmp_path: Path) -> None:
    (tmp_path / "base_frequency").write_text("2100000\n")
    assert tsc_khz_from(CPUINFO.format(" aperfmperf"), tmp_path)[0] == 2_100_000


def test_tsc_rate_falls_back_to_the_current_clock(tmp_path: Path) -> None:
    khz, source = tsc_khz_from(CPUINFO.format(" aperfmperf"), tmp_path / "none")
    assert khz == 2_600_000
    assert "approximate" in source
    assert tsc_khz_from("processor\t: 0\n", tmp_path / "none")[0] is None


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    """An executable that passes for QEMU in `check_available`."""
    binary = tmp_path / "qemu-system-x86_64"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return binary


def test_check_available_names_what_is_missing(tmp_path: Path, fake_qemu: Path) -> None:
    with pytest.raises(VMMUnavailableError, match="does not exist"):
        QemuDriver(tmp_path / "nope").check_available()
    QemuDriver(fake_qemu).check_available()
    with pytest.raises(ValueError, match="machine"):
        QemuDriver(fake_qemu, machine="pc")  # type: ignore[arg-type]


def test_asking_for_kvm_without_dev_kvm_is_refused(
    fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu, "KVM_DEVICE", tmp_path / "kvm")
    with pytest.raises(VMMUnavailableError, match="/dev/kvm"):
        QemuDriver(fake_qemu, accel="kvm").check_available()


@pytest.mark.parametrize(
    ("choice", "device", "backend"),
    [
        ("auto", False, VsockBackend.USER),
        ("auto", True, VsockBackend.KERNEL),
        ("user", True, VsockBackend.USER),
        ("user", False, VsockBackend.USER),
        ("kernel", True, VsockBackend.KERNEL),
    ],
)
def test_the_vsock_backend_follows_the_choice_and_the_host(
    choice: qemu.VsockChoice,
    device: bool,
    backend: VsockBackend,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qemu, "VHOST_VSOCK_DEVICE", tmp_path / "vhost-vsock")
    if device:
        (tmp_path / "vhost-vsock").touch()
    qemu.check_vsock_choice(choice)
    driver = QemuDriver(QEMU, vsock=choice)
    assert driver.vsock_backend() is backend
    assert driver.vsock_unavailable() is None


def test_kernel_vsock_without_dev_vhost_vsock_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu, "VHOST_VSOCK_DEVICE", tmp_path / "vhost-vsock")
    with pytest.raises(InvalidError, match=r"vhost-vsock.*--qemu-vsock auto") as refused:
        qemu.check_vsock_choice("kernel")
    assert refused.value.exit_code == 1
    assert QemuDriver(QEMU, vsock="kernel").vsock_unavailable() is not None


def test_api_socket_is_qmp() -> None:
    assert QemuDriver(QEMU).api_socket(RUN) == Path("/run/roost/vms/g1/qmp.sock")


def test_no_dev_kvm_means_tcg_without_probing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(qemu, "KVM_DEVICE", tmp_path / "kvm")
    driver = QemuDriver(QEMU)
    monkeypatch.setattr(driver, "_probe_kvm", lambda *_: pytest.fail("probed"))
    caplog.set_level("INFO", logger="roost.vmm.qemu")
    assert driver.accel_for(Path("/k/vmlinux"), NetnsWorker(None)) == "tcg"
    assert driver.accel_in_use == "tcg"
    assert "does not exist" in caplog.text


def test_a_fixed_accelerator_is_never_probed() -> None:
    assert QemuDriver(QEMU, accel="tcg").accel_in_use == "tcg"
    assert QemuDriver(QEMU, accel="kvm").accel_in_use == "kvm"


def test_auto_probes_once_however_many_launches_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu, "KVM_DEVICE", tmp_path)  # exists
    driver = QemuDriver(QEMU)
    probes: list[Path] = []

    def probe(kernel: Path, _: NetnsWorker) -> tuple[bool, str]:
        probes.append(kernel)
        return False, "canned"

    monkeypatch.setattr(driver, "_probe_kvm", probe)
    worker = NetnsWorker(None)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(driver.accel_for(Path("/k"), worker)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["tcg"] * 8
    assert probes == [Path("/k")]


def probe_stand_in(tmp_path: Path, script: str) -> Path:
    """A fake QEMU for the probe: runs `script` with the console file as $CONSOLE."""
    binary = tmp_path / "fake-qemu"
    binary.write_text(
        f"#!{sys.executable}\nimport sys, time\n"
        "CONSOLE = [a for a in sys.argv if a.startswith('file:')][0][5:]\n" + script
    )
    binary.chmod(0o755)
    return binary


@pytest.mark.parametrize(
    ("script", "works"),
    [
        (f"open(CONSOLE, 'w').write({BOOT_LOG!r})\ntime.sleep(60)\n", True),
        ("time.sleep(60)\n", False),
        ("sys.stderr.write('KVM: unhandled MSR 0x10a\\n')\nsys.exit(1)\n", False),
    ],
)
def test_the_probe_boots_judges_and_reaps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, works: bool
) -> None:
    monkeypatch.setattr(qemu, "PROBE_BANNER_WAIT", 0.5)
    driver = QemuDriver(probe_stand_in(tmp_path, script))
    spawned: list[int] = []
    worker = NetnsWorker(None)
    real_spawn = worker.spawn

    def spawn(argv: list[str], **popen: Any) -> Any:
        child = real_spawn(argv, **popen)
        spawned.append(child.pid)
        return child

    monkeypatch.setattr(worker, "spawn", spawn)
    verdict, reason = driver._probe_kvm(Path("/k/vmlinux"), worker)
    assert verdict is works, reason
    with pytest.raises(ChildProcessError):  # reaped: no child left to wait for
        os.waitpid(spawned[0], os.WNOHANG)


class FakeMonitor:
    """A QMP server on a Unix socket that answers each connection from a script."""

    def __init__(self, path: Path, answers: dict[str, list[dict[str, Any]]]) -> None:
        self.path = path
        self.answers = answers
        self.received: list[dict[str, Any]] = []
        _, self._thread = serve_unix(path, self._serve)

    def _serve(self, listener: socket.socket) -> None:
        with listener:
            connection, _ = listener.accept()
            with connection, connection.makefile("rwb") as stream:
                stream.write(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
                stream.flush()
                for line in stream:
                    request = json.loads(line)
                    self.received.append(request)
                    for answer in self.answers.get(request["execute"], [{"return": {}}]):
                        if answer.get("close"):
                            return
                        stream.write(json.dumps(answer).encode() + b"\r\n")
                    stream.flush()

    def join(self) -> None:
        self._thread.join(5)


def test_qmp_negotiates_skips_events_and_returns_the_answer(tmp_path: Path) -> None:
    status = {"status": "running", "running": True}
    monitor = FakeMonitor(
        tmp_path / "qmp.sock",
        {"query-status": [{"event": "POWERDOWN", "timestamp": {}}, {"return": status}]},
    )
    assert qmp(tmp_path / "qmp.sock", "query-status") == status
    monitor.join()
    assert [r["execute"] for r in monitor.received] == ["qmp_capabilities", "query-status"]


def test_qmp_errors_and_silence_are_vmm_failures(tmp_path: Path) -> None:
    FakeMonitor(
        tmp_path / "qmp.sock", {"cont": [{"error": {"class": "GenericError", "desc": "nope"}}]}
    )
    with pytest.raises(VMMFailedError, match="QEMU refused cont: nope"):
        qmp(tmp_path / "qmp.sock", "cont")
    with pytest.raises(VMMFailedError, match="failed"):
        qmp(tmp_path / "absent.sock", "stop")


def test_qmp_quit_may_end_without_an_answer(tmp_path: Path) -> None:
    FakeMonitor(tmp_path / "qmp.sock", {"quit": [{"close": True}]})
    assert qmp(tmp_path / "qmp.sock", "quit") == {}
    other = tmp_path / "other.sock"
    FakeMonitor(other, {"stop": [{"close": True}]})
    with pytest.raises(VMMFailedError, match="without answering"):
        qmp(other, "stop")


class FakeDevice:
    """roost's vsock backend as `launch` handles it: killed, or not."""

    def __init__(self) -> None:
        self.killed = False

    def kill(self) -> int | None:
        self.killed = True
        return -9


def test_a_qemu_that_cannot_be_spawned_takes_its_vsock_device_with_it(
    tmp_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = FakeDevice()
    monkeypatch.setattr(qemu, "_start_device", lambda _spec, _worker: device)

    class Refused:
        def result(self) -> None:
            raise VMMFailedError(f"cannot run {fake_qemu}: Permission denied")

    monkeypatch.setattr(qemu.VMMProcess, "begin", lambda *_args, **_options: Refused())
    run_dir = RunDir(tmp_path / "g1")
    run_dir.prepare()
    launch = replace(spec(vsock=VsockBackend.USER), run_dir=run_dir)
    with pytest.raises(VMMFailedError, match="QEMU could not start VM g1: cannot run"):
        QemuDriver(fake_qemu, machine="q35", accel="tcg").launch(launch, NetnsWorker(None))
    assert device.killed  # else it would wait for a QEMU that never comes, for ever
