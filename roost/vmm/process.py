"""VMM processes: started under the supervisor, signalled by PID, awaited through pidfds."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roost.errors import VMMFailedError
from roost.host.netns import NetnsWorker

log = logging.getLogger(__name__)
SUPERVISOR = Path(__file__).with_name("supervisor.py")
DEVICE_GRACE = 2.0  # for a device process to end on its own once its VMM has
ANSWER_TIMEOUT = 10.0  # for the supervisor to answer a command; else it is replaced


@dataclass(frozen=True)
class ProcessFiles:
    """The names of the files in a run dir where the supervisor writes a process's PID and its
    exit status."""

    pid: str
    exit: str


VMM_FILES = ProcessFiles("vmm.pid", "exit")
# a device process that serves the VMM (roost's vhost-user-vsock backend)
DEVICE_FILES = ProcessFiles("vsock.pid", "vsock.exit")


def recorded_pid(run_dir: Path, files: ProcessFiles = VMM_FILES) -> int | None:
    """The PID of the process the supervisor started in `run_dir`, if it wrote one."""
    try:
        return int((run_dir / files.pid).read_text())
    except (OSError, ValueError):
        return None


def is_vmm_of(pid: int, run_dir: Path, chroot: Path | None = None) -> bool:
    """Whether process `pid` was started for `run_dir` (a VMM or its device process: it names
    the run dir on its command line; a jailed Firecracker instead has its VM's `--id` and
    `chroot` for root): a guard against PID reuse before a PID is adopted or signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if f"{run_dir}/".encode() in cmdline:
        return True
    return (
        chroot is not None
        and f"\0--id\0{chroot.parent.name}\0".encode() in cmdline
        and _same_file(Path(f"/proc/{pid}/root"), chroot)
    )


def _same_file(a: Path, b: Path) -> bool:
    """Whether both name the same inode (a jailed process's root reads `/` in its own mount
    namespace, but is its chroot's directory)."""
    try:
        first, second = a.stat(), b.stat()
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie does not (an orphaned VMM, whose supervisor has gone, may
    stay one until init reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class VMMProcess:
    """A VMM started by this daemon's supervisor (or an earlier daemon's): known by its PID and
    its run dir, where the supervisor writes how it ended. `device` is the process serving
    one of its devices (roost's vsock backend), which lives and ends with it."""

    def __init__(
        self, run_dir: Path, pid: int, supervisor_pid: int, files: ProcessFiles = VMM_FILES
    ) -> None:
        self.run_dir = run_dir
        self.pid = pid
        self.supervisor_pid = supervisor_pid
        self.files = files
        self.device: VMMProcess | None = None

    @classmethod
    def begin(
        cls,
        argv: list[str],
        run_dir: Path,
        worker: NetnsWorker,
        *,
        output: Path,
        files: ProcessFiles = VMM_FILES,
        netns: Path | None = None,
    ) -> Starting:
        """Ask the supervisor to start `argv` in the worker's namespace (or in the network
        namespace file `netns`, e.g. a cni VM's), in a session of its own, its output appended
        to `output`, and go on: `result()` waits for it."""
        command = Command(argv, run_dir, output, files, netns)
        supervisor = Supervisor.of(worker)
        return Starting(supervisor, supervisor.send(argv, run_dir, output, files, netns), command)

    @property
    def exit_file(self) -> Path:
        return self.run_dir / self.files.exit

    def exited(self) -> bool:
        return self.exit_file.exists() or not _pid_alive(self.pid)

    def exit_code(self) -> int | None:
        """The VMM's exit status (minus the signal number when killed), or None when it cannot
        be known (e.g. its supervisor was killed too)."""
        try:
            return int(self.exit_file.read_text())
        except (OSError, ValueError):
            return None

    def signal(self, signum: int) -> None:
        """Signal the VMM, unless it has already been reaped (its PID may then belong to
        another process)."""
        if self.exit_file.exists():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> bool:
        """Wait until the VMM has exited and been reaped (its exit status written); True if it
        has. A VMM whose supervisor is gone too counts once the VMM itself is gone."""
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while not self.exit_file.exists():
            if not _pid_alive(self.pid) and not _pid_alive(self.supervisor_pid):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return True

    def kill(self) -> int | None:
        """SIGKILL the VMM, wait until it is reaped, end its device process; the VMM's exit
        code."""
        self.signal(signal.SIGKILL)
        if not self.wait(10):
            log.error("VMM %d did not end after SIGKILL", self.pid)
        self.end_device()
        return self.exit_code()

    def end_device(self) -> None:
        """Once the VMM has ended: give its device process a moment to end on its own (it
        does when the VMM goes), then SIGKILL it; reaped either way."""
        device = self.device
        if device is not None and not device.wait(DEVICE_GRACE):
            device.kill()

    def pidfd(self) -> int:
        """A descriptor that becomes readable when the VMM has exited."""
        return os.pidfd_open(self.pid)


@dataclass(frozen=True)
class Command:
    """What the supervisor is asked to start: `argv` in `run_dir`, its output appended to
    `output`, its PID and exit status written to `files`; inside the network namespace file
    `netns` when not None (else in the supervisor's, the worker's)."""

    argv: list[str]
    run_dir: Path
    output: Path
    files: ProcessFiles
    netns: Path | None = None


class SupervisorLostError(VMMFailedError):
    """The supervisor gave no answer (it hung, or died): it has been replaced, and the command
    may be asked of its replacement."""


class Starting:
    """A VMM its supervisor has been asked to start; `result()` waits for its PID the first
    time, and gives the same process (or raises the same error) every time. A supervisor that
    gives no answer is replaced, and the start asked once more of its replacement: the hang was
    the supervisor's, not the VMM's."""

    def __init__(self, supervisor: Supervisor, ticket: Ticket, command: Command) -> None:
        self._supervisor = supervisor
        self._ticket = ticket
        self._command = command
        self._outcome: VMMProcess | VMMFailedError | None = None

    def result(self) -> VMMProcess:
        if self._outcome is None:
            self._outcome = self._collect()
        if isinstance(self._outcome, VMMFailedError):
            raise self._outcome
        return self._outcome

    def _collect(self) -> VMMProcess | VMMFailedError:
        command = self._command
        for last in (False, True):
            channel = self._ticket[0]
            try:
                pid = self._supervisor.answer(self._ticket)
                return VMMProcess(command.run_dir, pid, channel.process.pid, command.files)
            except SupervisorLostError as error:
                _end_unanswered(command.run_dir, command.files)
                if last:
                    return error
                log.warning("%s; asking its replacement to start %s", error, command.argv[0])
                self._ticket = self._supervisor.send(
                    command.argv, command.run_dir, command.output, command.files, command.netns
                )
            except VMMFailedError as error:
                _end_unanswered(command.run_dir, command.files)
                return error
        raise AssertionError("unreachable")


def _end_unanswered(run_dir: Path, files: ProcessFiles) -> None:
    """SIGKILL what a supervisor that gave no answer (it hung, or died, after starting it)
    recorded for `run_dir`: nobody knows its PID, so nothing else would ever end it."""
    pid = recorded_pid(run_dir, files)
    if pid is None or not _pid_alive(pid):
        return
    try:  # a jailed Firecracker names its VM by --id instead of the run dir
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if f"{run_dir}/".encode() in cmdline or f"\0--id\0{run_dir.name}\0".encode() in cmdline:
        log.error(
            "ending process %d of %s, started by a supervisor that gave no answer", pid, run_dir
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class ReadyWhen:
    """A VMM being started by the supervisor; `result()` is the process once `ready` (a
    check that raises while it is not) has passed, or raises leaving no process; the same on
    every call."""

    def __init__(self, starting: Starting, ready: Callable[[VMMProcess], None]) -> None:
        self._starting = starting
        self._ready = ready
        self._process: VMMProcess | None = None
        self._error: BaseException | None = None

    def result(self) -> VMMProcess:
        if self._process is None and self._error is None:
            try:
                process = self._starting.result()
                try:
                    self._ready(process)
                except BaseException:
                    process.kill()
                    raise
                self._process = process
            except BaseException as error:
                self._error = error
        if self._error is not None:
            raise self._error
        assert self._process is not None
        return self._process


@dataclass
class _Channel:
    """One supervisor process and the answers read from it: it answers in the order it was
    asked, so the n-th answer belongs to the n-th command."""

    process: subprocess.Popen[bytes]
    sent: int = 0
    read: int = 0
    pending: bytes = b""  # read, not yet a whole line
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)  # read, not yet collected
    ended: bool = False  # its stdout closed: it is exiting, even while `poll()` says not yet


Ticket = tuple[_Channel, int, str]  # the channel, the command's number, the program


class Supervisor:
    """The daemon's handle on its supervisor process (`supervisor.py`): one per namespace
    worker, started on first use inside that namespace. Commands are sent at once and their
    answers collected later, so a VMM starts while the daemon does other work."""

    _by_worker: dict[int, Supervisor] = {}
    _registry_lock = threading.Lock()

    def __init__(self, worker: NetnsWorker) -> None:
        self._worker = worker
        self._lock = threading.Lock()
        self._channel: _Channel | None = None
        self._closed = False
        worker.on_close(self.close)

    @classmethod
    def of(cls, worker: NetnsWorker) -> Supervisor:
        with cls._registry_lock:
            supervisor = cls._by_worker.get(id(worker))
            if supervisor is None:
                supervisor = cls._by_worker[id(worker)] = cls(worker)
            return supervisor

    @property
    def pid(self) -> int:
        assert self._channel is not None
        return self._channel.process.pid

    def _running(self) -> _Channel:
        channel = self._channel
        if channel is not None and not channel.ended and channel.process.poll() is None:
            return channel
        if channel is not None:
            if channel.ended:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    channel.process.wait(1)
            _end_channel(channel)
            log.warning(
                "the VMM supervisor ended (code %s); starting another",
                channel.process.returncode,
            )
        process = self._worker.spawn(
            [sys.executable, "-I", "-S", str(SUPERVISOR)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self._channel = _Channel(process)
        return self._channel

    def send(
        self,
        argv: list[str],
        run_dir: Path,
        output: Path,
        files: ProcessFiles,
        netns: Path | None = None,
    ) -> Ticket:
        """Ask for `argv` to be started (inside the network namespace file `netns`, if given);
        `answer` gives its PID."""
        command = {
            "run_dir": str(run_dir),
            "argv": argv,
            "output": str(output),
            "pid_file": files.pid,
            "exit_file": files.exit,
        }
        if netns is not None:
            command["netns"] = str(netns)
        with self._lock:
            channel = self._running()
            assert channel.process.stdin is not None
            number = channel.sent
            channel.sent += 1
            try:
                channel.process.stdin.write(json.dumps(command).encode() + b"\n")
                channel.process.stdin.flush()
            except OSError:
                pass  # the supervisor is gone: reading the answers says so
        return channel, number, argv[0]

    def answer(self, ticket: Ticket) -> int:
        """The PID of the VMM `ticket` asked for, reading (and keeping for the others) every
        answer before it."""
        channel, number, program = ticket
        with self._lock:
            while channel.read <= number:
                said = self._read(channel)
                channel.answers[channel.read] = said
                channel.read += 1
            answer = channel.answers.pop(number)
        if "lost" in answer:
            message = f"cannot start {program}: {answer['lost']}"
            # a closed supervisor (the daemon is stopping) is not replaced
            raise VMMFailedError(message) if self._closed else SupervisorLostError(message)
        if "pid" not in answer:
            raise VMMFailedError(f"cannot start {program}: {answer['error']}")
        return int(answer["pid"])

    def _read(self, channel: _Channel) -> dict[str, Any]:
        """The supervisor's next answer; `lost` if it ended or did not answer in time."""
        try:
            line = _readline(channel, time.monotonic() + ANSWER_TIMEOUT)
        except TimeoutError:  # before OSError, of which it is one
            self._replace(channel)
            return {"lost": f"the supervisor did not answer within {ANSWER_TIMEOUT:.0f} s"}
        except (OSError, ValueError):  # ValueError: closed by `close` or `_replace`
            line = b""
        try:
            return dict(json.loads(line)) if line else {"lost": "the supervisor exited"}
        except ValueError:  # cut short: it died while answering
            return {"lost": f"the supervisor answered {line!r}"}

    def _replace(self, channel: _Channel) -> None:
        """A supervisor that did not answer in time: SIGKILLed and reaped, so the next command
        starts another. The VMMs it started keep running (in sessions of their own) and are
        still followed by PID; their exit status is then unknown."""
        log.error(
            "the VMM supervisor (pid %d) did not answer within %.0f s; replacing it",
            channel.process.pid,
            ANSWER_TIMEOUT,
        )
        _end_channel(channel)
        if self._channel is channel:
            self._channel = None

    def close(self) -> None:
        """Let the supervisor go: it starts nothing more and exits after its last VMM (which
        outlive the daemon). Reaped here if it has none left."""
        with self._registry_lock:
            self._by_worker.pop(id(self._worker), None)
        with self._lock:
            channel, self._channel = self._channel, None
            self._closed = True
        if channel is None:
            return
        process = channel.process
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(1)


def _end_channel(channel: _Channel) -> None:
    """SIGKILL a supervisor unless it has been reaped, reap it and close its pipes (or they
    leak, each time)."""
    channel.process.kill()
    channel.process.wait()
    for pipe in (channel.process.stdin, channel.process.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _readline(channel: _Channel, deadline: float) -> bytes:
    """The supervisor's next answer line; b"" once it has ended; TimeoutError at `deadline`."""
    stdout = channel.process.stdout
    assert stdout is not None
    fd = stdout.fileno()
    while b"\n" not in channel.pending:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, 65536)
        if not chunk:
            channel.ended = True
            line, channel.pending = channel.pending, b""
            return line
        channel.pending += chunk
    line, _, channel.pending = channel.pending.partition(b"\n")
    return line + b"\n"


class ExitWatcher:
    """One thread that notices every watched VMM's end, as it happens, through pidfds."""

    def __init__(self, on_exit: Callable[[str, VMMProcess], None]) -> None:
        self._on_exit = on_exit
        self._selector = selectors.EpollSelector()
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="roost-exits", daemon=True)
        self._thread.start()

    def watch(self, key: str, process: VMMProcess) -> None:
        try:
            fd = process.pidfd()
        except ProcessLookupError:
            self._on_exit(key, process)
            return
        with self._lock:  # epoll watches a new descriptor at once: no need to wake the thread
            self._selector.register(fd, selectors.EVENT_READ, (key, process))

    def forget(self, process: VMMProcess) -> None:
        """Stop watching `process` (the engine is ending it itself)."""
        with self._lock:
            for key in list(self._selector.get_map().values()):
                if key.data is not None and key.data[1] is process:
                    self._selector.unregister(key.fd)
                    os.close(key.fd)

    def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        os.write(self._wake_write, b"x")
        self._thread.join(5)
        with self._lock:
            for key in list(self._selector.get_map().values()):
                self._selector.unregister(key.fd)
                os.close(key.fd)
        self._selector.close()
        os.close(self._wake_write)

    def _loop(self) -> None:
        while not self._stopping:
            events = self._selector.select()
            for key, _ in events:
                if key.data is None:
                    os.read(self._wake_read, 4096)
                    continue
                with self._lock:
                    if self._selector.get_map().get(key.fd) is not key:
                        continue
                    self._selector.unregister(key.fd)
                    os.close(key.fd)
                name, process = key.data
                try:
                    self._on_exit(name, process)
                except Exception:
                    log.exception("handling the exit of VM %s failed", name)
