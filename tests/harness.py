"""Driving a real roost daemon from tests: namespaces, the daemon process, the CLI, the API.

Everything a test starts is ended by PID and reaped; namespaces are deleted even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from roost.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
FIRECRACKER = Path(os.environ.get("ROOST_TEST_FIRECRACKER", BUILD / "firecracker" / "firecracker"))
DEMO = Path(os.environ.get("ROOST_TEST_DEMO", BUILD / "demo"))
KERNEL = DEMO / "vmlinux"
INITRAMFS = DEMO / "initramfs.cpio.gz"
EXAMPLES = ROOT / "examples" / "plugins"


def run(
    *argv: str, check: bool = True, netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *argv], check=check, capture_output=True, text=True)


@contextlib.contextmanager
def network_namespace() -> Iterator[str]:
    """A fresh namespace `roost-t-<random>`, deleted afterwards with whatever still runs in it
    (by PID)."""
    name = f"roost-t-{secrets.token_hex(4)}"
    run("ip", "netns", "add", name)
    try:
        yield name
    finally:
        for pid in namespace_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run("ip", "netns", "del", name, check=False)


def namespace_pids(name: str) -> list[int]:
    output = run("ip", "netns", "pids", name, check=False).stdout
    return [int(pid) for pid in output.split()]


def leftover_pids(name: str) -> list[int]:
    """Processes in the namespace other than the daemon's supervisor when no VMM runs under it
    (it lives as long as the daemon)."""

    def idle_supervisor(pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return False
        return cmdline.endswith(b"supervisor.py\0") and not children

    return [pid for pid in namespace_pids(name) if not idle_supervisor(pid)]


def links(netns: str) -> dict[str, dict[str, Any]]:
    """The namespace's links as `ip -j -d link` describes them, by name."""
    data = json.loads(run("ip", "-j", "-d", "link", "show", netns=netns).stdout)
    return {link["ifname"]: link for link in data}


def addresses(netns: str, name: str) -> list[str]:
    data = json.loads(run("ip", "-j", "addr", "show", "dev", name, netns=netns).stdout)
    return [f"{a['local']}/{a['prefixlen']}" for a in data[0]["addr_info"] if a["family"] == "inet"]


def short_tmp() -> Path:
    """A short directory (Unix socket paths are limited to 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="roost-t-", dir="/tmp"))


@dataclass
class CLIResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


# util-linux's setpriv sets the parent-death signal and execs the command (same PID): SIGTERM
# when the test process that started it ends
TERMINATE_WITH_PARENT = ("setpriv", "--pdeathsig", "TERM", "--")


class Daemon:
    """A `roost serve` process in its own dirs, inside `netns`."""

    def __init__(
        self,
        netns: str,
        *args: str,
        firecracker: Path | None = FIRECRACKER,
        env: dict[str, str] | None = None,
    ) -> None:
        self.netns = netns
        self.env = dict(env or {})  # added to the daemon's environment
        self.dir = short_tmp()
        self.socket = self.dir / "api.sock"
        self.api = f"unix://{self.socket}"
        self.state_dir = self.dir / "state"
        self.run_dir = self.dir / "run"
        self.log = self.dir / "daemon.log"
        argv = [
            sys.executable,
            "-m",
            "roost.cli.main",
            "serve",
            "--state-dir",
            str(self.state_dir),
            "--run-dir",
            str(self.run_dir),
            "--listen",
            self.api,
            "--netns",
            netns,
        ]
        if firecracker is not None:
            argv += ["--firecracker", str(firecracker)]
        self.argv = [*argv, *args]
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://roost",
            timeout=120,
        )

    def launch(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start the daemon (with `extra` arguments this time) without waiting for it."""
        with self.log.open("ab") as sink:
            # a session of its own: a Ctrl-C reaches only the test (or benchmark), which then
            # removes the VMs through the daemon's API; a test run killed outright takes its
            # daemon with it (SIGTERM), which otherwise would outlive it
            self.process = subprocess.Popen(
                [*TERMINATE_WITH_PARENT, *self.argv, *extra],
                stdout=sink,
                stderr=sink,
                start_new_session=True,
                env={**os.environ, **self.env},
            )
        return self.process

    def start(self, *extra: str, timeout: float = 30) -> Daemon:
        """Start the daemon and wait until it answers."""
        self.launch(*extra)
        return self.wait_answering(timeout)

    def wait_answering(self, timeout: float = 30) -> Daemon:
        """Wait until the launched daemon answers `/healthz`; an error with its log if it
        exits first or stays silent."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.logs()}")
            with contextlib.suppress(httpx.TransportError):
                if self.http.get("/healthz").status_code == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not answer within {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM the daemon and reap it (its VMs keep running)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def close(self) -> None:
        """Remove every VM through the API (killing their VMMs: the test is over, a graceful
        stop would only wait), stop the daemon, and remove its dirs."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                self.remove_vms(self.http.get("/v1/vms").json())
        self.stop()
        self.http.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def remove_vms(self, vms: list[dict[str, Any]]) -> None:
        """Remove `vms` (as listed) through the API, killing the VMMs of running ones."""
        for vm in vms:
            if vm["status"] in ("running", "paused"):
                self.http.post(f"/v1/vms/{vm['name']}/stop", params={"force": "true"})
            self.http.delete(f"/v1/vms/{vm['name']}")

    def cli(self, *args: str | Path) -> CLIResult:
        """The roost CLI, in-process, pointed at this daemon."""
        result = CliRunner().invoke(app, ["--api", self.api, *map(str, args)])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CLIResult(result.exit_code, result.stdout, result.stderr)

    def ok(self, *args: str | Path) -> Any:
        """Run a CLI command with --json that must succeed; return its JSON."""
        result = self.cli(*args, "--json")
        assert result.exit_code == 0, f"{args}: {result.stdout}{result.stderr}"
        return result.json()

    def firecracker_config(self, vm: dict[str, Any]) -> dict[str, Any]:
        """What Firecracker itself says it was told (GET /vm/config on the VM's socket)."""
        socket = vm["vmm"]["api_socket"]
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket), base_url="http://fc") as fc:
            return fc.get("/vm/config").json()

    def firecracker_state(self, vm: dict[str, Any]) -> str:
        socket = vm["vmm"]["api_socket"]
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket), base_url="http://fc") as fc:
            return str(fc.get("/").json()["state"])


def write_plugin(directory: Path, name: str, **fields: Any) -> Path:
    manifest = {
        "name": name,
        "version": "1.0.0",
        "kernel": {"path": str(KERNEL)},
        "initramfs": {"path": str(INITRAMFS)},
        "boot_args": "console=ttyS0 reboot=k panic=1",
        **fields,
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(manifest))
    return path


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not); a process that ends while it is looked at
    does not either."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_for(predicate: Any, timeout: float = 15, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def missing(paths: Sequence[Path]) -> list[str]:
    return [str(p) for p in paths if not p.exists()]


READY = "roost-ready:"


def console_of(daemon: Daemon, name: str) -> str:
    path = daemon.run_dir / "vms" / name / "console.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_ready(
    daemon: Daemon, name: str, timeout: float = 60, fresh: bool = False, since: int = 0
) -> str:
    """The console from now (`fresh`) or from byte `since`, once the guest says it is ready.
    A boot that misses the deadline is retried once with a restart (TCG boots can hang ~9 %
    of the time); the retry is printed, and a second miss fails."""
    for attempt in range(2):
        offset = len(console_of(daemon, name)) if fresh or attempt else since
        try:
            wait_for(
                lambda start=offset: READY in console_of(daemon, name)[start:],
                timeout=timeout,
                what=f"{name} to be ready",
            )
            return console_of(daemon, name)[offset:]
        except AssertionError:
            if attempt:
                raise AssertionError(
                    f"{name} was not ready within {timeout}s twice; console:\n"
                    f"{console_of(daemon, name)[-3000:]}"
                ) from None
            print(f"wait_ready: {name} was not ready within {timeout}s; restarting it once")
            daemon.ok("vm", "restart", name)
    raise AssertionError("unreachable")


def demo_plugin(directory: Path, name: str, **fields: Any) -> Path:
    """A plugin of the demo guest (build/demo) named `name`, with `fields` (e.g. a network)."""
    manifest = json.loads((DEMO / "plugin.json").read_text())
    return write_plugin(
        directory,
        name,
        kernel={"path": str(DEMO / manifest["kernel"]["path"])},
        initramfs={"path": str(DEMO / manifest["initramfs"]["path"])},
        **fields,
    )


def http_get(netns: str, url: str, timeout: float = 30) -> str:
    """GET `url` from inside `netns` (a thread that entered it), retrying until `timeout`."""
    import urllib.request

    from roost.host.netns import NetnsWorker

    worker = NetnsWorker(netns)
    try:

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=3) as response:
                return str(response.read().decode())

        deadline = time.monotonic() + timeout
        while True:
            try:
                return worker.run(fetch)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        worker.close()


def serve_unix(
    path: Path, serve: Callable[[socket.socket], None]
) -> tuple[socket.socket, threading.Thread]:
    """A listening Unix socket at `path`, handed to `serve` on a daemon thread: the scripted
    peer of a protocol test."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    thread = threading.Thread(target=serve, args=(listener,), daemon=True)
    thread.start()
    return listener, thread


class EventsFollower:
    """`roost events` as a process against the daemon at `api`, its stdout read line by line."""

    def __init__(self, api: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "roost.cli.main", "--api", api, "events", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        stdout = self.process.stdout
        assert stdout is not None
        threading.Thread(target=lambda: [*map(self.lines.put, stdout)], daemon=True).start()

    def line(self, timeout: float = 10) -> str:
        """The next line it prints, within `timeout` seconds."""
        try:
            return self.lines.get(timeout=timeout).rstrip("\n")
        except queue.Empty:
            raise AssertionError(f"roost events printed no line within {timeout:g} s") from None

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C; its exit code and stderr."""
        self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=10)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.communicate()
        return self.process.returncode, err


def bridged_tap(netns: str) -> str:
    """A tap on bridge br0 (10.0.0.1/24) in `netns`, as roost makes them."""
    for argv in (
        ("ip", "link", "add", "br0", "type", "bridge"),
        ("ip", "addr", "add", "10.0.0.1/24", "dev", "br0"),
        ("ip", "link", "set", "br0", "up"),
        ("ip", "tuntap", "add", "dev", "rtap0", "mode", "tap", "vnet_hdr"),
        ("ip", "link", "set", "rtap0", "master", "br0", "up"),
    ):
        run(*argv, netns=netns)
    return "rtap0"
