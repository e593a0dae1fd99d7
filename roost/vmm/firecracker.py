"""The Firecracker driver: one process per VM, configured through its API socket."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from roost.engine.settings import JAILED_EXEC_NAME, jail_chroot
from roost.errors import VMMFailedError, VMMUnavailableError
from roost.host.netns import NetnsWorker
from roost.vmm.base import (
    ClientPerProcess,
    Early,
    LaunchSpec,
    RunDir,
    VsockBackend,
    check_binary,
    check_namespace,
    stop_in_steps,
)
from roost.vmm.process import ReadyWhen, VMMProcess

SOCKET_TIMEOUT = 5.0
TERM_WAIT = 3.0
Request = tuple[str, str, dict[str, Any]]


def find_firecracker(explicit: str | None) -> Path | None:
    """`--firecracker`, else `$ROOST_FIRECRACKER`, else `firecracker` on PATH."""
    candidate = explicit or os.environ.get("ROOST_FIRECRACKER") or shutil.which("firecracker")
    return Path(candidate) if candidate else None


@dataclass(frozen=True)
class Jail:
    """Firecracker's jailer (`roost serve --jailer`), the uid and gid it runs VMs as, and the
    chroots' base (`<state dir>/jail`)."""

    jailer: Path
    uid: int
    gid: int
    base: Path


def firecracker_argv(name: str, run_dir: RunDir) -> list[str]:
    """Firecracker's own flags for VM `name`, its paths as Firecracker sees them (inside the
    chroot when jailed); the logger and metrics set up by flags: one API round trip fewer on
    every boot. The jailer gives Firecracker its `--id` itself."""
    named = ["--id", name] if run_dir.chroot is None else []
    return [
        "--api-sock",
        str(inside(run_dir, run_dir.api_socket)),
        *named,
        "--log-path",
        str(inside(run_dir, run_dir.vmm_log)),
        "--level",
        "Info",
        "--show-level",
        "--metrics-path",
        str(inside(run_dir, run_dir.metrics)),
    ]


def jailer_argv(
    jail: Jail, firecracker: Path, name: str, run_dir: RunDir, netns: Path | None = None
) -> list[str]:
    """The jailer's command line for VM `name`: no `--daemonize` and no `--new-pid-ns`, so it
    execs into Firecracker, which the supervisor then reaps; the chroot is
    `<chroot base>/<exec file name>/<name>/root`, the run dir's `chroot`. With `netns`, the
    jailer joins that network namespace file itself (`--netns`) before it execs."""
    assert run_dir.chroot is not None
    joined = [] if netns is None else ["--netns", str(netns)]
    return [
        str(jail.jailer),
        "--id",
        name,
        "--exec-file",
        str(firecracker),
        "--uid",
        str(jail.uid),
        "--gid",
        str(jail.gid),
        "--chroot-base-dir",
        str(run_dir.chroot.parents[2]),
        *joined,
        "--",
        *firecracker_argv(name, run_dir),
    ]


def inside(run_dir: RunDir, path: Path) -> Path:
    """`path` as the VMM sees it: from the chroot's root when jailed."""
    if run_dir.chroot is None:
        return path
    return Path("/") / path.relative_to(run_dir.chroot)


def jailed_spec(spec: LaunchSpec) -> LaunchSpec:
    """`spec` with its paths as the jailed Firecracker sees them: the kernel, initrd and disk
    at the chroot's root (see `_into_chroot`), the vsock socket inside it."""
    assert spec.run_dir.chroot is not None
    vsock = spec.vsock
    if vsock is not None:
        vsock = replace(vsock, uds_path=inside(spec.run_dir, vsock.uds_path))
    return replace(
        spec,
        kernel=Path("/kernel"),
        initrd=None if spec.initrd is None else Path("/initrd"),
        rootfs=None if spec.rootfs is None else Path("/rootfs"),
        vsock=vsock,
    )


def _into_chroot(source: Path, target: Path, jail: Jail, *, own: bool) -> None:
    """Hard-link `source` to `target` in the chroot (a copy across filesystems, or when the
    jailed uid could not read the shared inode); `own`: the VM's own file, given to the uid.

    The jailed VMM already runs and owns the chroot, so it may swap `target` for a symlink or
    a hard link to another file at any moment: the disk is given to the uid by its name in
    disks/ (never by `target`, which could by then be a shared artifact's link), and a copy is
    written only into a file this call created, never through a symlink."""
    target.unlink(missing_ok=True)
    readable = own or source.stat().st_mode & stat.S_IROTH
    try:
        if own:
            os.chown(source, jail.uid, jail.gid)
        if not readable:
            raise OSError(errno.EACCES, "not readable by the jailed uid")
        os.link(source, target)
    except OSError as error:
        # the VM's own disk is never copied: the guest would write to the copy, which goes
        # with the chroot when the VM stops
        if own:
            why = (
                "the state dir's jail/ and disks/ must be on one filesystem"
                if error.errno == errno.EXDEV
                else error.strerror
            )
            raise VMMFailedError(
                f"cannot hard-link the VM's disk {source} into its chroot {target.parent}: {why}"
            ) from None
        _copy_in(source, target, jail)


def _copy_in(source: Path, target: Path, jail: Jail) -> None:
    """A copy of `source` at `target`, a new file (nothing there is followed), the uid's."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with open(os.open(target, flags, 0o600), "wb") as copy, source.open("rb") as original:
            shutil.copyfileobj(original, copy)
            os.fchown(copy.fileno(), jail.uid, jail.gid)
    except OSError as error:
        raise VMMFailedError(
            f"cannot copy {source} into the chroot {target.parent}: {error.strerror}"
        ) from None


def _make_file(path: Path, jail: Jail | None) -> None:
    """A file at `path` for Firecracker to open, the jailed uid's when jailed. That uid owns
    the chroot: whatever is found there is neither followed (a symlink) nor opened blocking
    (a FIFO), nor given to it unless it is a regular file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as error:
        raise VMMFailedError(f"cannot create {path} for Firecracker: {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise VMMFailedError(f"{path} is not a regular file; remove it and start again")
        if jail is not None:
            os.fchown(fd, jail.uid, jail.gid)
    finally:
        os.close(fd)


def configure_requests(spec: LaunchSpec) -> list[Request]:
    """The API requests that configure `spec` and touch nothing of the host's: sent before
    the engine's `host_ready`."""
    requests: list[Request] = [
        ("PUT", "/machine-config", {"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib}),
    ]
    boot: dict[str, Any] = {"kernel_image_path": str(spec.kernel), "boot_args": spec.boot_args}
    if spec.initrd is not None:
        boot["initrd_path"] = str(spec.initrd)
    requests.append(("PUT", "/boot-source", boot))
    if spec.vsock is not None:
        requests.append(
            ("PUT", "/vsock", {"guest_cid": spec.vsock.cid, "uds_path": str(spec.vsock.uds_path)})
        )
    return requests


def attach_requests(spec: LaunchSpec) -> list[Request]:
    """The requests that hand Firecracker the host's devices (it opens them at once): sent
    only when the host is ready, the disk copied and the tap made."""
    requests: list[Request] = []
    if spec.rootfs is not None:
        requests.append(
            (
                "PUT",
                "/drives/rootfs",
                {
                    "drive_id": "rootfs",
                    "path_on_host": str(spec.rootfs),
                    "is_root_device": spec.initrd is None,
                    "is_read_only": False,
                },
            )
        )
    for index, nic in enumerate(spec.nics):
        iface_id = f"eth{index}"
        requests.append(
            (
                "PUT",
                f"/network-interfaces/{iface_id}",
                {"iface_id": iface_id, "host_dev_name": nic.tap, "guest_mac": nic.mac},
            )
        )
    return requests


START: Request = ("PUT", "/actions", {"action_type": "InstanceStart"})


def boot_requests(spec: LaunchSpec) -> list[Request]:
    """Every API request that configures and boots `spec`, in the order the driver sends them
    (pure, so contract tests can check each body against Firecracker's swagger file)."""
    return [
        *configure_requests(spec),
        *attach_requests(spec),
        START,
    ]


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class FirecrackerAPI:
    """A client for one VM's API socket, its one connection kept open from the VMM's first
    call to its last (Firecracker serves few connections). These calls are on the path of every
    boot, so HTTP/1.1 is spoken here directly, as much of it as Firecracker's server speaks:
    requests with a Content-Length, answers with one (or none, for no body). Measured per call:
    0.02 ms of CPU, against 0.10 ms with the standard library's client and 0.24 ms with httpx."""

    def __init__(self, api_socket: Path, timeout: float = 10.0) -> None:
        self._path = str(api_socket)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._unread = b""  # received after the last answer (nothing, from a well-behaved server)

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket, self._unread = None, b""

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        meanwhile: Callable[[], object] | None = None,
    ) -> Any:
        """Send the request and return the answer's JSON (None when it has no body).
        `meanwhile` runs once the request is sent, while Firecracker works on it; if it
        raises, the answer is not waited for (the connection is dropped) and its error is."""
        payload = b"" if body is None else json.dumps(body).encode()
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._socket.settimeout(self._timeout if timeout is None else timeout)
                    self._socket.connect(self._path)
                else:
                    self._socket.settimeout(self._timeout if timeout is None else timeout)
                self._socket.sendall(request)
                if meanwhile is not None:
                    try:
                        meanwhile()
                    except BaseException:
                        self._disconnect()
                        raise
                status, text = self._answer(self._socket)
            except (OSError, ValueError, IndexError) as error:
                self._disconnect()  # a half-read answer must not be taken for the next one
                reason = str(error) or type(error).__name__
                raise VMMFailedError(f"Firecracker API {method} {path} failed: {reason}") from None
        if status >= 300:
            message = text.decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                message = json.loads(message).get("fault_message", message)
            raise VMMFailedError(f"Firecracker refused {method} {path}: {message}")
        return json.loads(text) if text else None

    def _answer(self, sock: socket.socket) -> tuple[int, bytes]:
        """The next answer's status and body."""
        received = self._unread
        while b"\r\n\r\n" not in received:
            received += _receive(sock)
        head, _, rest = received.partition(b"\r\n\r\n")
        status_line, *fields = head.split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        for field in fields:
            name, _, value = field.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise ValueError(f"unexpected Transfer-Encoding {value.strip().decode()!r}")
        while len(rest) < length:
            rest += _receive(sock)
        self._unread = rest[length:]
        return status, rest[:length]


def _receive(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("Firecracker closed the connection")
    return data


def _wait_for_socket(process: VMMProcess, path: Path) -> None:
    """Until Firecracker accepts connections (the file appears at bind(), a moment before
    listen(), so existence alone is not enough)."""
    deadline = time.monotonic() + SOCKET_TIMEOUT
    while not _accepts(path):
        if process.exited():
            raise VMMFailedError(
                f"Firecracker exited before opening its API socket "
                f"(exit code {process.exit_code()}); see {path.parent / 'console.log'}"
            )
        if time.monotonic() > deadline:
            raise VMMFailedError(f"Firecracker did not open {path} within {SOCKET_TIMEOUT}s")
        time.sleep(0.0005)


class FirecrackerDriver:
    kind = "firecracker"

    def __init__(self, binary: Path | None, jail: Jail | None = None) -> None:
        self.binary = binary
        self.jail = jail  # run every VM under the jailer, in its run dir's chroot
        self._apis = ClientPerProcess(
            lambda process: FirecrackerAPI(self._home(process.run_dir) / "api.sock")
        )

    def check_available(self) -> None:
        binary = check_binary(
            self.binary,
            "Firecracker",
            missing="no Firecracker binary: pass --firecracker PATH to roost serve, set "
            "$ROOST_FIRECRACKER, or put firecracker on PATH",
        )
        if self.jail is not None and not os.access(self.jail.jailer, os.X_OK):
            raise VMMUnavailableError(f"jailer {self.jail.jailer} is not an executable")
        if self.jail is not None and binary.name != JAILED_EXEC_NAME:
            raise VMMUnavailableError(
                f"under the jailer, the Firecracker binary must be named {JAILED_EXEC_NAME!r} "
                f"(the jailer names each chroot after it), not {binary.name!r}"
            )

    def api_socket(self, run_dir: RunDir) -> Path:
        return run_dir.api_socket

    def vsock_unavailable(self) -> str | None:
        return None  # hybrid vsock needs no kernel support on the host

    def vsock_backend(self) -> VsockBackend:
        return VsockBackend.FIRECRACKER

    def _home(self, run_dir: Path) -> Path:
        """Where the VMM of `run_dir` has its API socket: its chroot when jailed."""
        if self.jail is None:
            return run_dir
        return jail_chroot(self.jail.base, run_dir.name)

    def start_early(
        self, name: str, run_dir: RunDir, worker: NetnsWorker, netns: Path | None = None
    ) -> ReadyWhen:
        """Have the supervisor start Firecracker (in `netns` when given: the supervisor enters
        it, or the jailer does), and go on: it comes up while the engine allocates and builds
        the tap, none of which it needs before the VM's configuration."""
        self.check_available()
        assert self.binary is not None
        for made in (run_dir.vmm_log, run_dir.metrics):  # Firecracker opens, never creates them
            _make_file(made, self.jail)
        if self.jail is None:
            argv = [str(self.binary), *firecracker_argv(name, run_dir)]
            supervisor_enters = netns
        else:
            argv = jailer_argv(self.jail, self.binary, name, run_dir, netns)
            supervisor_enters = None  # the jailer does
        starting = VMMProcess.begin(
            argv, run_dir.path, worker, output=run_dir.console_log, netns=supervisor_enters
        )
        return ReadyWhen(starting, lambda process: _wait_for_socket(process, run_dir.api_socket))

    def launch(
        self,
        spec: LaunchSpec,
        worker: NetnsWorker,
        *,
        host_ready: Callable[[], object] | None = None,
        early: Early | None = None,
        while_booting: Callable[[VMMProcess], object] | None = None,
    ) -> VMMProcess:
        """Configure and boot, all from the caller's thread: under the interpreter lock a
        thread per step would only add hand-overs."""
        if early is None:
            early = self.start_early(spec.name, spec.run_dir, worker, spec.netns)
        process = early.result()
        seen = spec
        try:
            check_namespace(process, spec.netns)
            api = self._apis.of(process)
            if self.jail is not None:
                seen = jailed_spec(spec)
                self._link(spec, seen, "kernel", own=False)
                self._link(spec, seen, "initrd", own=False)
            for request in configure_requests(seen):
                api.call(*request)
            if host_ready is not None:
                host_ready()
            self._link(spec, seen, "rootfs", own=True)
            for request in attach_requests(seen):
                api.call(*request)
            meanwhile = (lambda: while_booting(process)) if while_booting is not None else None
            api.call(*START, meanwhile=meanwhile)
        except BaseException:
            self._apis.close(process)
            process.kill()
            raise
        return process

    def _link(self, spec: LaunchSpec, seen: LaunchSpec, field: str, *, own: bool) -> None:
        """Put `spec`'s file `field` where the jailed VMM sees it (nothing when not jailed)."""
        source, target = getattr(spec, field), getattr(seen, field)
        if self.jail is not None and source is not None and spec.run_dir.chroot is not None:
            _into_chroot(source, spec.run_dir.chroot / target.name, self.jail, own=own)

    def stop(self, process: VMMProcess, timeout: float, force: bool) -> int | None:
        """Ctrl-Alt-Del, wait `timeout`; SIGTERM, wait; SIGKILL. Always reaped."""
        graceful = [(lambda: self._ctrl_alt_del(process), timeout)]
        try:
            return stop_in_steps(process, graceful, force=force, term_wait=TERM_WAIT)
        finally:
            self._apis.close(process)

    def _ctrl_alt_del(self, process: VMMProcess) -> None:
        self._apis.of(process).call(
            "PUT", "/actions", {"action_type": "SendCtrlAltDel"}, timeout=1.0
        )

    def pause(self, process: VMMProcess, meanwhile: Callable[[], object] | None = None) -> None:
        self._apis.of(process).call("PATCH", "/vm", {"state": "Paused"}, meanwhile=meanwhile)

    def resume(self, process: VMMProcess, meanwhile: Callable[[], object] | None = None) -> None:
        self._apis.of(process).call("PATCH", "/vm", {"state": "Resumed"}, meanwhile=meanwhile)
