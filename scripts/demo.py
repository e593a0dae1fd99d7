"""The main job (`make demo`): boot real microVMs in every network mode and show what each can
reach, in a private network namespace, then remove everything — also on Ctrl-C.

Steps: a netns `roost-demo`; inside it a bridge with dnsmasq as the "external" DHCP server;
the roost daemon (QEMU here, Firecracker where KVM can run it); the demo plugin; four VMs
(vsock, bridged auto-assign, bridged manual ip, dhcp); wait until each guest says it is ready;
`roost vm list` and a reachability table (HTTP from inside roost-demo for the VMs with an
address, `roost vm connect` to its vsock echo for the isolated one); tear down.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "demo-work"
ROOST = ROOT / ".venv" / "bin" / "roost"
NETNS = "roost-demo"
DHCP_BRIDGE = "demo-dhcp"
DHCP_NET = "10.58.0"
PLUGIN = ROOT / "build" / "demo" / "plugin.json"
FIRECRACKER = ROOT / "build" / "firecracker" / "firecracker"
READY_TIMEOUT = 90.0
MANUAL_IP = "10.57.0.50"
ECHO_PORT = 1024  # the demo guest's vsock echo
VMS = [
    ("vsock-1", ["--network-mode", "vsock"]),
    ("auto-1", []),
    ("manual-1", ["--network-ip", MANUAL_IP]),
    ("dhcp-1", ["--network-mode", "dhcp"]),
]


class Interrupted(Exception):  # noqa: N818 - a signal, not an error
    """SIGTERM (or a second Ctrl-C) asked us to stop; the teardown still runs."""


def say(message: str) -> None:
    print(message, flush=True)


class Step:
    """Numbered progress lines with the time each step took."""

    total = 8

    def __init__(self) -> None:
        self.number = 0

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        self.number += 1
        started = time.monotonic()
        say(f"[{self.number}/{self.total}] {what} ...")
        yield
        say(f"      done in {time.monotonic() - started:.1f}s")


def sh(*argv: str, netns: bool = False, check: bool = True) -> str:
    prefix = ["ip", "netns", "exec", NETNS] if netns else []
    result = subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


class Demo:
    def __init__(self) -> None:
        self.api = f"unix://{WORK / 'api.sock'}"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.dnsmasq: subprocess.Popen[bytes] | None = None
        self.netns_made = False
        self.torn_down = False

    def roost(self, *args: str, json_out: bool = True) -> Any:
        argv = [str(ROOST), "--api", self.api, *args] + (["--json"] if json_out else [])
        result = subprocess.run(
            argv, capture_output=True, text=True, check=False, start_new_session=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"roost {' '.join(args)} failed: {result.stderr.strip()}")
        return json.loads(result.stdout) if json_out else result.stdout

    # ---- set-up --------------------------------------------------------------------------

    def make_netns(self) -> None:
        if NETNS in sh("ip", "netns", "list"):
            say(f"      removing a {NETNS} namespace left by an interrupted run")
            remove_netns()
        sh("ip", "netns", "add", NETNS)
        self.netns_made = True
        sh("ip", "link", "set", "lo", "up", netns=True)

    def start_dhcp_server(self) -> None:
        sh("ip", "link", "add", DHCP_BRIDGE, "type", "bridge", netns=True)
        sh("ip", "addr", "add", f"{DHCP_NET}.1/24", "dev", DHCP_BRIDGE, netns=True)
        sh("ip", "link", "set", DHCP_BRIDGE, "up", netns=True)
        leases = WORK / "dnsmasq.leases"
        leases.unlink(missing_ok=True)
        self.dnsmasq = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                NETNS,
                "dnsmasq",
                "--no-daemon",
                "--no-ping",
                "--bind-interfaces",
                "--port=0",
                f"--interface={DHCP_BRIDGE}",
                f"--dhcp-range={DHCP_NET}.100,{DHCP_NET}.150,255.255.255.0,1h",
                f"--dhcp-leasefile={leases}",
                "--conf-file=/dev/null",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(WORK / "dnsmasq.log").open("wb"),
            start_new_session=True,  # Ctrl-C reaches only the demo, which tears down in order
        )

    def start_daemon(self) -> str:
        """Firecracker where KVM can run its guests, QEMU (with TCG) elsewhere."""
        accel = choose_accel()
        vmm = "firecracker" if accel == "kvm" and FIRECRACKER.exists() else "qemu"
        argv = [
            str(ROOST),
            "serve",
            "--state-dir",
            str(WORK / "state"),
            "--run-dir",
            str(WORK / "run"),
            "--listen",
            self.api,
            "--netns",
            NETNS,
            "--vmm",
            vmm,
            "--accel",
            accel,
            "--dhcp-bridge",
            DHCP_BRIDGE,
            "--dhcp-leases",
            str(WORK / "dnsmasq.leases"),
        ]
        if FIRECRACKER.exists():
            argv += ["--firecracker", str(FIRECRACKER)]
        log = (WORK / "daemon.log").open("ab")
        self.daemon = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        wait_until(self.alive_and_answering, 30, "the daemon to answer")
        return vmm

    def alive_and_answering(self) -> bool:
        assert self.daemon is not None
        if self.daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited; see {WORK / 'daemon.log'}")
        return (
            subprocess.run(
                [str(ROOST), "--api", self.api, "vm", "list"],
                capture_output=True,
                check=False,
                start_new_session=True,
            ).returncode
            == 0
        )

    # ---- the VMs -------------------------------------------------------------------------

    def create_vms(self) -> None:
        notes = set()
        for name, flags in VMS:
            vm = self.roost("vm", "create", name, "--plugin", "roost-demo", *flags)
            address = vm["network"]["ip"] or (
                "leased by DHCP" if vm["network"]["mode"] == "dhcp" else "none"
            )
            say(f"      {name:<9} {vm['network']['mode']:<8} {address}")
            if not vm["vsock"]["available"]:
                notes.add(vm["vsock"]["reason"])
        for note in sorted(notes):
            say(f"      note: these VMs have no vsock device: {note}")

    def console(self, name: str) -> str:
        path = WORK / "run" / "vms" / name / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self) -> None:
        pending = {name for name, _ in VMS}
        retried: set[str] = set()
        deadline = time.monotonic() + READY_TIMEOUT
        while pending:
            for name in sorted(pending):
                if "roost-ready:" in self.console(name):
                    ready = [
                        line
                        for line in self.console(name).splitlines()
                        if line.startswith("roost-ready:")
                    ][-1]
                    say(f"      {name:<9} {ready}")
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                late = sorted(pending - retried)
                if not late:
                    raise RuntimeError(f"{', '.join(sorted(pending))} never became ready")
                for name in late:  # a TCG boot can hang: one retry
                    say(f"      {name} is late; restarting it once")
                    self.roost("vm", "restart", name)
                    retried.add(name)
                deadline = time.monotonic() + READY_TIMEOUT
            time.sleep(0.2)
        for vm in self.roost("vm", "list"):
            if vm["network"]["mode"] == "dhcp":
                wait_until(
                    lambda name=vm["name"]: self.roost("vm", "show", name)["network"][
                        "observed_ip"
                    ],
                    30,
                    f"roost to observe the address {vm['name']} leased",
                )

    def vsock_echo(self, name: str) -> str:
        """`echo hello | roost vm connect NAME 1024`: the guest's vsock echo, through the API."""
        result = subprocess.run(
            [str(ROOST), "--api", self.api, "vm", "connect", name, str(ECHO_PORT)],
            input="hello\n",
            capture_output=True,
            text=True,
            check=False,
            start_new_session=True,
        )
        if result.returncode != 0:
            return f"vm connect failed: {result.stderr.strip()}"
        return f"vm connect {name} {ECHO_PORT}: {result.stdout.strip()!r} echoed over vsock"

    def report(self) -> None:
        say("")
        say(self.roost("vm", "list", json_out=False).rstrip())
        say("")
        rows = [("VM", "MODE", "ADDRESS", "REACHED FROM THE HOST")]
        for vm in self.roost("vm", "list"):
            network = vm["network"]
            address = network["ip"] or network["observed_ip"]
            if network["mode"] == "vsock":
                answer = self.vsock_echo(vm["name"])
            elif address is None:
                answer = "no address observed"
            else:
                answer = "HTTP " + http_from_netns(f"http://{address}/")
            rows.append((vm["name"], network["mode"], address or "-", answer))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            say(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )

    # ---- tear-down -----------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove everything, in order; further Ctrl-Cs wait for it (it takes seconds)."""
        if self.torn_down:
            return
        self.torn_down = True
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._teardown()
        finally:
            signal.signal(signal.SIGINT, previous)

    def _teardown(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            with contextlib.suppress(Exception):
                for vm in self.roost("vm", "list"):
                    self.roost("vm", "rm", vm["name"])
            stop(self.daemon)
        if self.dnsmasq is not None:
            stop(self.dnsmasq)
        if self.netns_made:
            leaked = remove_netns()
            if leaked:
                say(f"      warning: killed processes left in {NETNS}: {leaked}")
        for sub in ("state", "run"):
            subprocess.run(["rm", "-rf", str(WORK / sub)], check=False)
        say("      no namespace, process or link is left; logs are in demo-work/")


def choose_accel() -> str:
    """Whether KVM can run a standard guest here (QEMU's own probe boot, run once)."""
    from roost.host.netns import NetnsWorker
    from roost.vmm.qemu import QemuDriver

    worker = NetnsWorker(NETNS)
    try:
        return QemuDriver(accel="auto").accel_for(PLUGIN.parent / "vmlinux", worker)
    finally:
        worker.close()


def http_from_netns(url: str) -> str:
    from roost.host.netns import NetnsWorker

    worker = NetnsWorker(NETNS)

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode().strip()
            return f"{response.status} OK: {body!r}"

    try:
        return worker.run(fetch)
    except OSError as error:
        return f"unreachable ({error})"
    finally:
        worker.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def remove_netns() -> list[int]:
    """Kill (by PID) whatever still runs in the namespace, then delete it."""
    pids = [int(pid) for pid in sh("ip", "netns", "pids", NETNS, check=False).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    sh("ip", "netns", "del", NETNS, check=False)
    return pids


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _interrupt(_signum: int, _frame: object) -> None:
    raise Interrupted


def main() -> int:
    if os.geteuid() != 0:
        say("make demo needs root (network namespaces, bridges, taps)")
        return 1
    if not PLUGIN.exists():
        say(f"{PLUGIN} is missing; run make setup")
        return 1
    WORK.mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    demo = Demo()
    step = Step()
    try:
        with step(f"Creating the private network namespace {NETNS}"):
            demo.make_netns()
        with step(f"Starting dnsmasq on bridge {DHCP_BRIDGE} as the external DHCP server"):
            demo.start_dhcp_server()
        with step("Starting the roost daemon inside it"):
            vmm = demo.start_daemon()
            say(f"      VMM: {vmm} (QEMU's probe boot decides whether KVM can run guests)")
        with step("Installing the demo plugin (a Debian kernel and a busybox initramfs)"):
            plugin = demo.roost("plugin", "install", str(PLUGIN))
            say(f"      {plugin['name']} {plugin['version']}")
        with step("Creating four VMs, one per way of networking"):
            demo.create_vms()
        with step("Waiting until every guest says it is ready"):
            demo.wait_ready()
        with step("What each VM is, and how the host reaches it"):
            demo.report()
        with step("Tearing everything down"):
            demo.teardown()
    except (KeyboardInterrupt, Interrupted):
        say("\nInterrupted: tearing down ...")
        return 130
    except RuntimeError as error:
        say(f"\ndemo failed: {error}")
        return 1
    finally:
        demo.teardown()
    say(f"Finished in {time.monotonic() - started:.0f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
