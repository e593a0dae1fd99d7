"""What every VMM driver takes and gives: a `LaunchSpec` in, a running `VMMProcess` out."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from roost.errors import InvalidError, VMMFailedError, VMMUnavailableError
from roost.host.netns import NetnsWorker, run_in
from roost.vmm.process import VMMProcess

log = logging.getLogger(__name__)

# sun_path holds 108 bytes; Firecracker adds "_<port>" (up to 11 bytes) to the vsock path.
MAX_SOCKET_PATH = 107 - 11


@dataclass(frozen=True)
class NIC:
    """One guest network device: the host tap behind it and the MAC the guest sees."""

    tap: str
    mac: str


class VsockBackend(StrEnum):
    """What backs a VM's vsock device, chosen when its VMM starts and recorded with the VM."""

    FIRECRACKER = "firecracker"  # Firecracker's own hybrid vsock (a Unix socket)
    CLOUD_HYPERVISOR = "cloud-hypervisor"  # Cloud Hypervisor's, the same hybrid vsock
    USER = "user"  # roost's vhost-user-vsock process for QEMU, with the same hybrid socket
    KERNEL = "kernel"  # the host kernel's vhost-vsock: the host reaches the guest by its CID


@dataclass(frozen=True)
class Vsock:
    cid: int
    uds_path: Path
    backend: VsockBackend


@dataclass(frozen=True)
class HybridVsock:
    """A guest reached through a hybrid vsock socket: connect, send `CONNECT <port>\\n`, read
    `OK <hostport>\\n`; the guest reaches host port P by dialling `<uds_path>_<P>`."""

    uds_path: Path


@dataclass(frozen=True)
class KernelVsock:
    """A guest reached with AF_VSOCK at its CID (the host kernel's vhost-vsock)."""

    cid: int


VsockTarget = HybridVsock | KernelVsock


@dataclass(frozen=True)
class RunDir:
    """One VM's run dir: every socket, log and status file of its VMM, so cleanup is one
    `rm -r` and VMs never collide."""

    path: Path
    # under the jailer, the VM's chroot (as the host sees it): its VMM's sockets, logs and
    # console live there, the supervisor's files in `path`
    chroot: Path | None = None

    @property
    def home(self) -> Path:
        """Where the VMM's own files are: the chroot, if any, else the run dir."""
        return self.chroot or self.path

    @property
    def api_socket(self) -> Path:
        return self.home / "api.sock"

    @property
    def vsock_socket(self) -> Path:
        return self.home / "vsock.sock"

    @property
    def console_log(self) -> Path:
        return self.home / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.home / "vmm.log"

    @property
    def metrics(self) -> Path:
        return self.home / "metrics.json"

    def check_length(self) -> None:
        if len(str(self.vsock_socket)) > MAX_SOCKET_PATH:
            raise InvalidError.at(
                "run_dir",
                f"{self.vsock_socket} is too long for a Unix socket path; start the daemon "
                f"with a shorter {'--run-dir' if self.chroot is None else '--state-dir'}",
            )

    def prepare(self) -> None:
        """A fresh run dir for a new VMM process: no stale socket, PID or exit file."""
        self.check_length()
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.path.iterdir():
            if leftover.name != "console.log" and not leftover.is_dir():
                leftover.unlink(missing_ok=True)
        if self.chroot is not None:
            self.chroot.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._empty_chroot()

    def _empty_chroot(self) -> None:
        """Everything in the chroot but the console log: the jailer refuses to start in a
        chroot where its device nodes already are. The chroot is the jailed uid's: a console
        log it replaced by a symlink or a hard link goes too, or the supervisor (root) would
        append the next boot's console to whatever that names, and so does one it replaced by
        anything but a regular file (a FIFO, which nobody reads, would hold the supervisor's
        open for ever; the supervisor refuses those too)."""
        assert self.chroot is not None
        for leftover in self.chroot.iterdir() if self.chroot.is_dir() else ():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.name != "console.log" or not _own_file(leftover):
                leftover.unlink(missing_ok=True)

    def remove_sockets(self) -> None:
        """What the VMM leaves when it ends: its sockets (and under the jailer, all the chroot
        holds but the console log)."""
        for stale in self.path.glob("*.sock*"):
            stale.unlink(missing_ok=True)
        if self.chroot is not None:
            self._empty_chroot()

    def remove(self) -> None:
        """The chroot first: a run dir left by a crash in between is found, with its chroot."""
        if self.chroot is not None:
            shutil.rmtree(self.chroot.parent, ignore_errors=True)  # the jailer's `<id>` dir
        shutil.rmtree(self.path, ignore_errors=True)


class Early(Protocol):
    """A VMM started ahead of its launch (see `Driver.start_early`)."""

    def result(self) -> VMMProcess:
        """The VMM once it is up; raises (leaving no process) if it never came up."""
        ...


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a driver needs to boot one VM. `nics` in the guest's device order (empty for
    a vsock-only VM); `vsock` is None when the plan has none. `netns`: the network namespace
    file the VMM runs in, where its taps are (a cni VM's `/run/netns/roost-vm-<name>`); None
    for the worker's, the daemon's `--netns`."""

    name: str
    run_dir: RunDir
    kernel: Path
    initrd: Path | None
    rootfs: Path | None
    boot_args: str
    vcpus: int
    memory_mib: int
    nics: tuple[NIC, ...]
    vsock: Vsock | None
    netns: Path | None = None


class Driver(Protocol):
    """A VMM: boots a `LaunchSpec`, then stops, pauses and resumes what it booted."""

    kind: str

    def check_available(self) -> None:
        """Raise `VMMUnavailableError` when this VMM cannot run here at all."""

    def api_socket(self, run_dir: RunDir) -> Path:
        """The VMM's control socket in `run_dir` (Firecracker's API, QEMU's QMP)."""
        ...

    def vsock_unavailable(self) -> str | None:
        """Why VMs of this driver get no vsock device on this host, or None when they do."""
        ...

    def vsock_backend(self) -> VsockBackend:
        """What backs the vsock device of the VMs it starts now (when `vsock_unavailable` says
        they get one)."""
        ...

    def start_early(
        self, name: str, run_dir: RunDir, worker: NetnsWorker, netns: Path | None = None
    ) -> Early | None:
        """Start whatever of the VMM needs nothing the engine is still preparing (addresses,
        tap), without waiting for it, in the network namespace file `netns` when given (the
        launch spec's, which must then exist already); None when the driver has nothing to
        start early."""
        ...

    def launch(
        self,
        spec: LaunchSpec,
        worker: NetnsWorker,
        *,
        host_ready: Callable[[], object] | None = None,
        early: Early | None = None,
        while_booting: Callable[[VMMProcess], object] | None = None,
    ) -> VMMProcess:
        """Finish what `start_early` began (or start the VMM in `spec.netns`, else the
        worker's namespace), configure it and boot the guest. `host_ready` completes the host
        side (the VM's disk); the driver calls it before it touches the disk and before the
        guest runs. `while_booting` runs once for every boot, after it has been asked of the
        VMM and before it is known to be done (the engine records the VM as running
        meanwhile). On failure leave no process behind and raise."""
        ...

    def stop(self, process: VMMProcess, timeout: float, force: bool) -> int | None:
        """Stop gracefully within `timeout` (or kill at once when `force`); reap; return the
        exit code."""
        ...

    def pause(self, process: VMMProcess, meanwhile: Callable[[], object] | None = None) -> None:
        """Pause the guest; `meanwhile` runs once, while the VMM does it (or after: the
        driver's choice), so the engine's bookkeeping overlaps the VMM's work."""
        ...

    def resume(self, process: VMMProcess, meanwhile: Callable[[], object] | None = None) -> None:
        """Resume the guest; `meanwhile` as for `pause`."""
        ...


def _own_file(path: Path) -> bool:
    """Whether `path` is a regular file, not a symlink, and its inode's only name."""
    try:
        status = path.lstat()
    except OSError:
        return False
    return stat.S_ISREG(status.st_mode) and status.st_nlink == 1


def check_binary(binary: Path | None, what: str, *, missing: str, hint: str = "") -> Path:
    """The VMM's `binary`, if it is an executable file, else `VMMUnavailableError`: `missing`
    says how to name one when there is none, `hint` how to name another."""
    if binary is None:
        raise VMMUnavailableError(missing)
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise VMMUnavailableError(
            f"{what} binary {binary} does not exist or is not executable{hint}"
        )
    return binary


def check_tap(tap: str, worker: NetnsWorker, netns: Path | None = None) -> None:
    """That `tap` exists in the VMM's network namespace (`netns`, else the worker's): a VMM run
    as root (QEMU, Cloud Hypervisor) would create a missing tap itself, connected to
    nothing."""
    try:
        if netns is None:
            worker.run(socket.if_nametoindex, tap)
        else:
            run_in(netns, socket.if_nametoindex, tap)
    except OSError:
        where = "" if netns is None else f" ({netns})"
        raise VMMFailedError(
            f"tap {tap} does not exist in the VMM's network namespace{where}; create it (on "
            "its bridge) before launching"
        ) from None


def check_namespace(process: VMMProcess, netns: Path | None) -> None:
    """That a VMM started early runs in the launch spec's network namespace `netns` (when it
    names one), where its taps are: one started elsewhere would not find them (or, as root,
    would make new ones there, connected to nothing)."""
    if netns is None:
        return
    try:
        ours, wanted = Path(f"/proc/{process.pid}/ns/net").stat(), netns.stat()
    except OSError as error:
        raise VMMFailedError(
            f"cannot tell whether VMM {process.pid} runs in network namespace {netns}: "
            f"{error.strerror}"
        ) from None
    if (ours.st_dev, ours.st_ino) != (wanted.st_dev, wanted.st_ino):
        raise VMMFailedError(
            f"VMM {process.pid} runs outside network namespace {netns}, where its taps are: "
            "start it early with that namespace (start_early(..., netns=spec.netns))"
        )


# A graceful step of a stop: ask the VMM to end (a call that raises `VMMFailedError` if it
# cannot be asked), then how long to wait for it to exit.
StopStep = tuple[Callable[[], object], float]


def stop_in_steps(
    process: VMMProcess, graceful: Iterable[StopStep], *, force: bool, term_wait: float
) -> int | None:
    """Stop a VMM the gentlest way that works: each graceful step in turn (its request skipped
    once the VMM has exited; one that fails is logged, and the wait still made), then SIGTERM
    and `term_wait`, then SIGKILL; `force` goes straight to SIGKILL. Always reaped, its device
    process after it; the VMM's exit code."""
    if not force:
        for ask, wait in graceful:
            if not process.exited():
                try:
                    ask()
                except VMMFailedError as error:
                    log.info("stopping VMM %d: %s", process.pid, error)
            if process.wait(wait):
                process.end_device()
                return process.exit_code()
        process.signal(signal.SIGTERM)
        if process.wait(term_wait):
            process.end_device()
            return process.exit_code()
    return end_vmm(process, term_wait)


def end_vmm(process: VMMProcess, reap_wait: float) -> int | None:
    """Kill the VMM by PID and reap it (its device process too); one that has already exited
    is only reaped, given `reap_wait` for it (its PID may be someone else's by now)."""
    if process.exited() and process.wait(reap_wait):
        process.end_device()
        return process.exit_code()
    return process.kill()


class Closable(Protocol):
    def close(self) -> None: ...


Client = TypeVar("Client", bound=Closable)


class ClientPerProcess(Generic[Client]):
    """One API client per VMM, made at its first call and kept to its last (a VMM serves few
    connections); closed when the driver stops the VMM, or when the engine lets go of the
    process (it ended on its own, or never booted)."""

    def __init__(self, connect: Callable[[VMMProcess], Client]) -> None:
        self._connect = connect
        self._clients: weakref.WeakKeyDictionary[VMMProcess, Client] = weakref.WeakKeyDictionary()

    def of(self, process: VMMProcess) -> Client:
        client = self._clients.get(process)
        if client is None:
            client = self._clients[process] = self._connect(process)
            weakref.finalize(process, client.close)
        return client

    def close(self, process: VMMProcess) -> None:
        client = self._clients.pop(process, None)
        if client is not None:
            client.close()
