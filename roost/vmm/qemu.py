"""The QEMU driver: the whole VM on QEMU's command line, then controlled through QMP.

QEMU runs where Firecracker cannot: with KVM when the host's KVM can run a standard guest, and
under software emulation (TCG) otherwise. With `accel="auto"` the driver finds out once, with a
short probe boot of the kernel it is about to launch (a nested KVM such as PVM may exist yet be
unable to run a normal guest, which only trying reveals).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Literal, get_args

from roost.errors import InvalidError, VMMFailedError, VMMUnavailableError
from roost.host.netns import NetnsWorker
from roost.vmm.base import (
    Early,
    LaunchSpec,
    RunDir,
    VsockBackend,
    check_binary,
    check_tap,
    end_vmm,
    stop_in_steps,
)
from roost.vmm.process import DEVICE_FILES, VMMProcess
from roost.vmm.qmp import qmp

log = logging.getLogger(__name__)

Machine = Literal["microvm", "q35"]
Accel = Literal["auto", "kvm", "tcg"]
# auto: the kernel's vhost-vsock where /dev/vhost-vsock exists, roost's own backend elsewhere
VsockChoice = Literal["auto", "user", "kernel"]

KVM_DEVICE = Path("/dev/kvm")
VHOST_VSOCK_DEVICE = Path("/dev/vhost-vsock")
VHOST_NET_DEVICE = Path("/dev/vhost-net")
CPUINFO = Path("/proc/cpuinfo")
CPUFREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq")
QMP_SOCKET = "qmp.sock"
VHOST_USER_SOCKET = "vhost-user.sock"  # roost's vsock backend serves QEMU here
VSOCK_LOG = "vsock.log"
GUEST_MEMORY = "mem"  # the id of the shared memory backend the vsock backend maps
DEVICE_READY_WAIT = 5.0  # until the vsock backend listens (Python starts in ~0.1 s)

QMP_WAIT = 5.0  # from start until QMP answers
QMP_CALL_TIMEOUT = 1.0  # one call while stopping or waiting for QMP
QUIT_WAIT = 3.0
TERM_WAIT = 3.0
PROBE_BANNER_WAIT = 3.0  # under working KVM the banner is out within a few hundred ms
PROBE_BOOT_WAIT = 10.0
PROBE_ARGS = "console=ttyS0 panic=-1"  # no root device: the kernel panics, -no-reboot ends QEMU
BANNER = "Linux version"
# Lines a kernel prints only once it has run all of its init: it has booted.
BOOTED = ("Unable to mount root fs", "Freeing unused kernel")

# Where virtio devices live: microvm has only virtio-mmio, q35 has PCI.
_VIRTIO_SUFFIX: dict[str, str] = {"microvm": "device", "q35": "pci"}


def _opt(value: object) -> str:
    """A value inside a QEMU `key=value,...` option, where a comma must be doubled."""
    return str(value).replace(",", ",,")


def check_vsock_choice(choice: str) -> None:
    """Refuse a vsock choice this host cannot honour (the daemon checks before it starts)."""
    if choice == "kernel" and not VHOST_VSOCK_DEVICE.exists():
        raise InvalidError.at(
            "qemu_vsock",
            f"kernel needs {VHOST_VSOCK_DEVICE} (kernel module vhost_vsock), which this host "
            "does not have; load the module, or use --qemu-vsock auto or user (roost's own "
            "vsock device)",
        )


def tsc_khz_from(cpuinfo: str, cpufreq: Path) -> tuple[int | None, str]:
    """The host's TSC rate in kHz and where it came from.

    Under TCG the guest's RDTSC reads the host's TSC, so the host's TSC rate is the guest's.
    Best is the host kernel's own TSC calibration, which /proc/cpuinfo's "cpu MHz" shows when
    no cpufreq driver and no APERF/MPERF replace it with a current clock (as on VM hosts like
    this one); else intel_pstate's base frequency (the nominal clock, which the TSC follows);
    else "cpu MHz" as the current clock, a rough guess."""
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    measured = flags is not None and "aperfmperf" in flags.group(1).split()
    if mhz is not None and not measured and not cpufreq.exists():
        return round(float(mhz.group(1)) * 1000), "the host kernel's TSC calibration (cpu MHz)"
    base = cpufreq / "base_frequency"
    if base.exists():
        return int(base.read_text()), f"the nominal CPU clock ({base})"
    if mhz is not None:
        return round(float(mhz.group(1)) * 1000), "the current CPU clock (cpu MHz; approximate)"
    return None, "no CPU clock in /proc/cpuinfo or cpufreq"


@cache
def host_tsc_khz() -> int | None:
    khz, source = tsc_khz_from(CPUINFO.read_text(), CPUFREQ)
    log.info("TCG microvm guests get tsc_early_khz=%s from %s", khz, source)
    return khz


def guest_cmdline(spec: LaunchSpec, machine: Machine, accel: str, tsc_khz: int | None) -> str:
    """The guest's command line: the spec's, plus what Firecracker would add (root=/dev/vda for
    a root disk) and what TCG microvm needs (its early TSC calibration hangs in ~9 % of boots
    unless told the rate)."""
    args = spec.boot_args.split()
    if spec.rootfs is not None and spec.initrd is None and not _has(args, "root"):
        args += ["root=/dev/vda", "rw"]
    if machine == "microvm" and accel == "tcg" and tsc_khz and not _has(args, "tsc_early_khz"):
        args.append(f"tsc_early_khz={tsc_khz}")
    return " ".join(args)


def _has(args: list[str], key: str) -> bool:
    return any(arg.startswith(f"{key}=") for arg in args)


def qemu_argv(
    binary: Path,
    spec: LaunchSpec,
    *,
    machine: Machine,
    accel: str,
    tsc_khz: int | None,
    vhost_net: bool = False,
) -> list[str]:
    """QEMU's whole command line for `spec` (pure, so tests can check every case).
    `vhost_net` says whether the host can move the NIC's data path into the kernel."""
    run_dir = spec.run_dir
    virtio = _VIRTIO_SUFFIX[machine]
    argv = [str(binary), "-name", _opt(spec.name), "-M", machine_option(machine, spec)]
    argv += ["-accel", accel]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    argv += ["-m", str(spec.memory_mib), "-smp", str(spec.vcpus)]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    argv += ["-kernel", str(spec.kernel)]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    argv += ["-append", guest_cmdline(spec, machine, accel, tsc_khz)]
    argv += [
        "-chardev",
        f"file,id=ser,path={_opt(run_dir.console_log)},append=on",
        "-serial",
        "chardev:ser",
        "-qmp",
        f"unix:{_opt(run_dir.path / QMP_SOCKET)},server=on,wait=off",
    ]
    if spec.rootfs is not None:
        argv += [
            "-drive",
            f"file={_opt(spec.rootfs)},format=raw,if=none,id=rootfs",
            "-device",
            f"virtio-blk-{virtio},drive=rootfs",
        ]
    for index, nic in enumerate(spec.nics):
        argv += [
            "-netdev",
            f"tap,id=n{index},ifname={_opt(nic.tap)},script=no,downscript=no,"
            f"vhost={'on' if vhost_net else 'off'}",
            "-device",
            f"virtio-net-{virtio},netdev=n{index},mac={nic.mac}",
        ]
    if spec.vsock is not None:
        argv += _vsock_args(spec, machine)
    return argv


def _vsock_args(spec: LaunchSpec, machine: Machine) -> list[str]:
    """The vsock device: the kernel's vhost-vsock with the VM's CID, or roost's vhost-user
    backend, which maps guest memory (so that becomes a shared memfd) and hands QEMU the CID
    through the device config."""
    assert spec.vsock is not None
    virtio = _VIRTIO_SUFFIX[machine]
    if spec.vsock.backend is VsockBackend.KERNEL:
        return ["-device", f"vhost-vsock-{virtio},guest-cid={spec.vsock.cid}"]
    socket_path = spec.run_dir.path / VHOST_USER_SOCKET
    size = f"{spec.memory_mib}M"
    return [
        *("-object", f"memory-backend-memfd,id={GUEST_MEMORY},size={size},share=on"),
        *("-chardev", f"socket,id=vu,path={_opt(socket_path)}"),
        *("-device", f"vhost-user-vsock-{virtio},chardev=vu"),
    ]


def machine_option(machine: Machine, spec: LaunchSpec) -> str:
    """`-M`'s value: the user-space vsock backend needs guest memory it can map."""
    user_vsock = spec.vsock is not None and spec.vsock.backend is VsockBackend.USER
    return f"{machine},memory-backend={GUEST_MEMORY}" if user_vsock else machine


def device_argv(spec: LaunchSpec) -> list[str]:
    """roost's vhost-user-vsock backend for `spec` (its command line names the word vsock and
    the VM's run dir, so a restarted daemon can tell it is this VM's)."""
    assert spec.vsock is not None
    run_dir = spec.run_dir.path
    return [
        *(sys.executable, "-I", "-m", "roost.vmm.vsock"),
        *("--vhost-user", str(run_dir / VHOST_USER_SOCKET)),
        *("--uds", str(spec.vsock.uds_path)),
        *("--cid", str(spec.vsock.cid)),
    ]


def probe_argv(binary: Path, machine: Machine, kernel: Path, console: Path) -> list[str]:
    """A throwaway KVM boot of `kernel` with no disk, initrd or NIC, just a serial console."""
    return [
        str(binary),
        *("-M", machine, "-accel", "kvm", "-cpu", "host", "-m", "128", "-smp", "1"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-kernel", str(kernel), "-append", PROBE_ARGS),
        *("-serial", f"file:{console}"),
    ]


def kvm_verdict(console: str, exit_code: int | None, stderr: str) -> tuple[bool, str]:
    """Whether a probe boot shows KVM running a standard guest, and why. `exit_code` is None
    when QEMU was still running at the deadline."""
    if any(line in console for line in BOOTED):
        return True, "a probe boot under KVM ran the kernel through its whole init"
    if exit_code is not None and exit_code != 0:
        return False, f"QEMU -accel kvm failed (exit code {exit_code}){_said(stderr)}"
    if BANNER in console:
        last = console.strip().splitlines()[-1]
        return False, f"the kernel started under KVM but did not finish booting (last: {last!r})"
    if exit_code == 0:
        return False, f"QEMU -accel kvm ended without the kernel printing anything{_said(stderr)}"
    return False, f"the kernel printed nothing under KVM within {PROBE_BANNER_WAIT:g}s"


def _said(text: str, lines: int = 10) -> str:
    """The tail of what QEMU wrote, ready to end an error message."""
    tail = text.strip().splitlines()[-lines:]
    return "; QEMU said:\n  " + "\n  ".join(tail) if tail else ""


def _read_from(path: Path, offset: int = 0) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _start_device(spec: LaunchSpec, worker: NetnsWorker) -> VMMProcess | None:
    """roost's vsock backend for `spec`, listening (QEMU connects to it at once, and exits if
    nobody listens); None when the VM's vsock needs none."""
    if spec.vsock is None or spec.vsock.backend is not VsockBackend.USER:
        return None
    run_dir = spec.run_dir
    ready = run_dir.path / VHOST_USER_SOCKET
    ready.unlink(missing_ok=True)  # the backend makes it once it listens: a stale one would lie
    log_path = run_dir.path / VSOCK_LOG
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    device = VMMProcess.begin(
        device_argv(spec), run_dir.path, worker, output=log_path, files=DEVICE_FILES
    ).result()
    deadline = time.monotonic() + DEVICE_READY_WAIT
    while not ready.exists():
        if device.exited() or time.monotonic() > deadline:
            device.kill()
            said = _said(_read_from(log_path, log_offset))
            raise VMMFailedError(
                f"the vsock device of VM {spec.name} did not come up within "
                f"{DEVICE_READY_WAIT:g}s (exit code {device.exit_code()}){said}"
            )
        time.sleep(0.005)
    return device


class QemuDriver:
    """QEMU as a roost VMM: `microvm` (virtio-mmio, fastest to boot) or `q35` (PCI), with KVM
    where it can run a guest and TCG elsewhere."""

    kind = "qemu"

    def __init__(
        self,
        binary: Path | None = None,
        machine: Machine = "microvm",
        accel: Accel = "auto",
        vsock: VsockChoice = "auto",
    ) -> None:
        if machine not in get_args(Machine):
            raise ValueError(f"QEMU machine {machine!r} is not one of {get_args(Machine)}")
        if accel not in get_args(Accel):
            raise ValueError(f"QEMU accelerator {accel!r} is not one of {get_args(Accel)}")
        if vsock not in get_args(VsockChoice):
            raise ValueError(f"QEMU vsock {vsock!r} is not one of {get_args(VsockChoice)}")
        self.vsock: VsockChoice = vsock
        if binary is None and (found := shutil.which("qemu-system-x86_64")) is not None:
            binary = Path(found)
        self.binary = binary
        self.machine: Machine = machine
        self.accel: Accel = accel
        # "kvm" or "tcg" once decided (at the first launch when `accel` is "auto").
        self.accel_in_use: str | None = None if accel == "auto" else accel
        self._accel_lock = threading.Lock()

    def check_available(self) -> None:
        check_binary(
            self.binary,
            "QEMU",
            missing="no qemu-system-x86_64 on PATH: install it (apt-get install "
            "--no-install-recommends qemu-system-x86) or give the driver its path",
        )
        if self.accel == "kvm" and not KVM_DEVICE.exists():
            raise VMMUnavailableError(
                "QEMU was asked for KVM but this host has no /dev/kvm; use accel auto or tcg"
            )

    def api_socket(self, run_dir: RunDir) -> Path:
        return run_dir.path / QMP_SOCKET

    def vsock_unavailable(self) -> str | None:
        if self.vsock_backend() is VsockBackend.KERNEL and not VHOST_VSOCK_DEVICE.exists():
            return f"{VHOST_VSOCK_DEVICE} has gone from this host (kernel module vhost_vsock)"
        return None

    def vsock_backend(self) -> VsockBackend:
        if self.vsock == "user" or (self.vsock == "auto" and not VHOST_VSOCK_DEVICE.exists()):
            return VsockBackend.USER
        return VsockBackend.KERNEL

    def start_early(
        self, name: str, run_dir: RunDir, worker: NetnsWorker, netns: Path | None = None
    ) -> None:
        """Nothing: QEMU takes the whole VM on its command line."""
        return None

    def launch(
        self,
        spec: LaunchSpec,
        worker: NetnsWorker,
        *,
        host_ready: Callable[[], object] | None = None,
        early: Early | None = None,
        while_booting: Callable[[VMMProcess], object] | None = None,
    ) -> VMMProcess:
        """Start QEMU (in `spec.netns` when given, where it opens its taps; its vsock device
        process stays in the worker's namespace: it speaks only Unix sockets) and return once
        QMP reports the VM running (not when the guest is ready: callers watch the console for
        that). The guest runs as soon as QEMU does, so `host_ready` is called before QEMU
        starts, and `while_booting` once it has."""
        self.check_available()
        assert self.binary is not None
        accel = self.accel_for(spec.kernel, worker)
        if host_ready is not None:
            host_ready()
        for nic in spec.nics:
            check_tap(nic.tap, worker, spec.netns)
        tsc_khz = host_tsc_khz() if self.machine == "microvm" and accel == "tcg" else None
        argv = qemu_argv(
            self.binary,
            spec,
            machine=self.machine,
            accel=accel,
            tsc_khz=tsc_khz,
            vhost_net=VHOST_NET_DEVICE.exists(),
        )
        run_dir = spec.run_dir
        qmp_socket = self.api_socket(run_dir)
        qmp_socket.unlink(missing_ok=True)  # so nobody mistakes a stale socket for this QEMU
        log_offset = run_dir.vmm_log.stat().st_size if run_dir.vmm_log.exists() else 0
        device = _start_device(spec, worker)
        try:
            try:
                starting = VMMProcess.begin(
                    argv, run_dir.path, worker, output=run_dir.vmm_log, netns=spec.netns
                )
                process = starting.result()
            except BaseException:  # no QEMU: its device would wait for one for ever
                if device is not None:
                    device.kill()
                raise
            process.device = device  # from here on, ending QEMU ends its device too
            try:
                if while_booting is not None:
                    while_booting(process)
                _wait_until_running(process, qmp_socket)
            except BaseException:
                end_vmm(process, TERM_WAIT)
                raise
        except VMMFailedError as error:
            said = _said(_read_from(run_dir.vmm_log, log_offset))
            raise VMMFailedError(f"QEMU could not start VM {spec.name}: {error}{said}") from None
        return process

    def stop(self, process: VMMProcess, timeout: float, force: bool) -> int | None:
        """Power button, wait `timeout`; QMP quit, wait; SIGTERM, wait; SIGKILL. Always reaped,
        its vsock device after it."""
        graceful = [
            (lambda: self._ask(process, "system_powerdown"), timeout),
            (lambda: self._ask(process, "quit"), QUIT_WAIT),
        ]
        return stop_in_steps(process, graceful, force=force, term_wait=TERM_WAIT)

    def pause(self, process: VMMProcess, meanwhile: Callable[[], object] | None = None) -> None:
        self._command(process, "stop", "pause", meanwhile)

    def resume(self, process: VMMProcess, meanwhile: Callable[[], object] | None = None) -> None:
        self._command(process, "cont", "resume", meanwhile)

    def _command(
        self, process: VMMProcess, command: str, what: str, after: Callable[[], object] | None
    ) -> None:
        try:
            qmp(self.api_socket(RunDir(process.run_dir)), command)
        except VMMFailedError as error:
            raise VMMFailedError(f"cannot {what} QEMU {process.pid}: {error}") from None
        if after is not None:
            after()

    def _ask(self, process: VMMProcess, command: str) -> None:
        qmp(self.api_socket(RunDir(process.run_dir)), command, timeout=QMP_CALL_TIMEOUT)

    def accel_for(self, kernel: Path, worker: NetnsWorker) -> str:
        """The accelerator to use, decided once per driver (the first launch probes)."""
        with self._accel_lock:
            if self.accel_in_use is None:
                self.accel_in_use, why = self._choose_accel(kernel, worker)
                log.info("QEMU will use %s: %s", self.accel_in_use, why)
            return self.accel_in_use

    def _choose_accel(self, kernel: Path, worker: NetnsWorker) -> tuple[str, str]:
        if not KVM_DEVICE.exists():
            return "tcg", f"{KVM_DEVICE} does not exist"
        works, why = self._probe_kvm(kernel, worker)
        return ("kvm" if works else "tcg"), why

    def _probe_kvm(self, kernel: Path, worker: NetnsWorker) -> tuple[bool, str]:
        """Boot `kernel` under KVM for a few seconds in the worker's namespace, then judge."""
        assert self.binary is not None
        with tempfile.TemporaryDirectory(prefix="roost-kvm-probe-") as tmp:
            console, errors = Path(tmp) / "console.log", Path(tmp) / "qemu.log"
            with errors.open("wb") as sink:
                child = worker.spawn(
                    probe_argv(self.binary, self.machine, kernel, console),
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=sink,
                    start_new_session=True,
                    close_fds=True,
                )
            try:
                exit_code = _watch_probe(child, console)
            finally:
                if child.poll() is None:
                    child.kill()  # by PID
                child.wait()
            return kvm_verdict(_read_from(console), exit_code, _read_from(errors))


def _watch_probe(child: subprocess.Popen[bytes], console: Path) -> int | None:
    """Until the probe kernel has booted, QEMU has ended, or a deadline has passed (a short one
    while the console stays silent); QEMU's exit code, or None if it still runs."""
    start = time.monotonic()
    while True:
        text = _read_from(console)
        if any(line in text for line in BOOTED):
            return child.poll()
        if child.poll() is not None:
            return child.returncode
        elapsed = time.monotonic() - start
        if elapsed > PROBE_BOOT_WAIT or (elapsed > PROBE_BANNER_WAIT and BANNER not in text):
            return None
        time.sleep(0.05)


def _wait_until_running(process: VMMProcess, qmp_socket: Path) -> None:
    """Until QMP answers and says the VM runs (QEMU serves QMP only once it has built the machine,
    so an answer also means it accepted the whole command line)."""
    deadline = time.monotonic() + QMP_WAIT
    while True:
        if process.exited():
            process.wait(TERM_WAIT)
            raise VMMFailedError(f"QEMU exited with code {process.exit_code()}")
        try:
            status = qmp(qmp_socket, "query-status", timeout=QMP_CALL_TIMEOUT)
        except VMMFailedError as error:
            if time.monotonic() > deadline:
                raise VMMFailedError(f"QMP did not answer within {QMP_WAIT:g}s ({error})") from None
            time.sleep(0.005)
            continue
        if status.get("status") != "running":
            raise VMMFailedError(f"QEMU reports the VM {status.get('status')!r}, not running")
        return
