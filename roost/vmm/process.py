"""VMM processes: started under the supervisor, signalled by PID, awaited through pidfds."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from roost.errors import VMMFailedError
from roost.host.netns import NetnsWorker

log = logging.getLogger(__name__)
SUPERVISOR = Path(__file__).with_name("supervisor.py")
PID_FILE = "vmm.pid"
EXIT_FILE = "exit"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VMMProcess:
    """A VMM and its supervisor. `supervisor` is the `Popen` when this daemon started it (so
    the daemon reaps it); after a daemon restart it is None and init reaps it."""

    def __init__(
        self,
        run_dir: Path,
        pid: int,
        supervisor_pid: int,
        supervisor: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.pid = pid
        self.supervisor_pid = supervisor_pid
        self.supervisor = supervisor

    @classmethod
    def start(
        cls,
        argv: list[str],
        run_dir: Path,
        worker: NetnsWorker,
        *,
        output: Path,
        timeout: float = 5.0,
    ) -> VMMProcess:
        """Start `argv` under a supervisor in the worker's namespace, in a session of its own,
        with its output appended to `output`."""
        supervisor = _WarmSupervisors.of(worker).take()
        command = {"run_dir": str(run_dir), "argv": argv, "output": str(output)}
        assert supervisor.stdin is not None
        try:
            supervisor.stdin.write(json.dumps(command).encode() + b"\n")
            supervisor.stdin.close()
        except BrokenPipeError:
            pass  # it died; found out below
        pid_file = run_dir / PID_FILE
        deadline = time.monotonic() + timeout
        while not pid_file.exists():
            if supervisor.poll() is not None or time.monotonic() > deadline:
                supervisor.kill()
                supervisor.wait()
                raise VMMFailedError(f"{argv[0]} did not start (see {output})")
            time.sleep(0.0002)
        return cls(run_dir, int(pid_file.read_text()), supervisor.pid, supervisor)

    @property
    def exit_file(self) -> Path:
        return self.run_dir / EXIT_FILE

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
        """Signal the VMM, unless its supervisor has already reaped it (its PID may then belong
        to another process)."""
        if self.exit_file.exists():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> bool:
        """Wait until the VMM has exited and been reaped; True if it has."""
        if self.supervisor is not None:
            try:
                self.supervisor.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while _pid_alive(self.supervisor_pid) or _pid_alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def kill(self) -> int | None:
        """SIGKILL the VMM, reap it, return its exit code."""
        self.signal(signal.SIGKILL)
        if not self.wait(10):
            log.error("VMM %d did not die after SIGKILL", self.pid)
        return self.exit_code()

    def pidfd(self) -> int:
        """A descriptor that becomes readable when the supervisor (and so the VMM) is gone."""
        return os.pidfd_open(self.supervisor_pid)


class _WarmSupervisors:
    """One supervisor kept started ahead, per namespace worker: Python takes ~10 ms to start,
    which a VM launch should not wait for."""

    _by_worker: dict[int, _WarmSupervisors] = {}
    _registry_lock = threading.Lock()

    def __init__(self, worker: NetnsWorker) -> None:
        self._worker = worker
        self._lock = threading.Lock()
        self._ready: Future[subprocess.Popen[bytes]] | None = None
        worker.on_close(self.close)

    @classmethod
    def of(cls, worker: NetnsWorker) -> _WarmSupervisors:
        with cls._registry_lock:
            warm = cls._by_worker.get(id(worker))
            if warm is None:
                warm = cls._by_worker[id(worker)] = cls(worker)
            return warm

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-I", "-S", str(SUPERVISOR)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )

    def take(self) -> subprocess.Popen[bytes]:
        """A started supervisor waiting for its command; another is started for next time."""
        with self._lock:
            ready, self._ready = self._ready, self._worker.submit(self._spawn)
        if ready is not None:
            try:
                supervisor = ready.result()
                if supervisor.poll() is None:
                    return supervisor
                supervisor.wait()
            except OSError as error:
                log.warning("a supervisor started ahead failed: %s", error)
        return self._worker.run(self._spawn)

    def close(self) -> None:
        """Let the supervisor started ahead go (EOF on its stdin) and reap it."""
        with self._lock:
            ready, self._ready = self._ready, None
        with self._registry_lock:
            self._by_worker.pop(id(self._worker), None)
        if ready is None:
            return
        with contextlib.suppress(OSError):
            supervisor = ready.result()
            assert supervisor.stdin is not None
            supervisor.stdin.close()
            supervisor.wait(10)


class ExitWatcher:
    """One thread that notices every watched VMM's end, as it happens, through pidfds."""

    def __init__(self, on_exit: Callable[[str, VMMProcess], None]) -> None:
        self._on_exit = on_exit
        self._selector = selectors.DefaultSelector()
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
        with self._lock:
            self._selector.register(fd, selectors.EVENT_READ, (key, process))
        os.write(self._wake_write, b"x")

    def forget(self, process: VMMProcess) -> None:
        """Stop watching `process` (the engine is ending it itself)."""
        with self._lock:
            for key in list(self._selector.get_map().values()):
                if key.data is not None and key.data[1] is process:
                    self._selector.unregister(key.fd)
                    os.close(key.fd)

    def close(self) -> None:
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
