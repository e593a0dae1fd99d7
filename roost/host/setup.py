"""Preparing a host for roost (`roost host setup`): the sysctls it needs and a systemd unit for
`roost serve`. Each is looked at first and changed only where it differs, so a second run
changes nothing; a dry run only looks.

The one sysctl roost needs is IPv4 forwarding: guests on roost's bridges reach anything beyond
them only through the host's routing (`roost serve --nat` turns it on by itself, but never
across a reboot). The bridge-netfilter switches (`net.bridge.bridge-nf-call-*`) are left as they
are: roost's rules are right either way, and other software on the host (Docker, Kubernetes)
needs them as they are.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from roost.errors import HostError, InvalidError
from roost.host import sysctl
from roost.host.netns import NetnsWorker

SYSCTLS = {"net.ipv4.ip_forward": "1"}
SYSCTL_FILE = Path("/etc/sysctl.d/90-roost.conf")
UNIT_NAME = "roost.service"
UNIT_DIR = Path("/etc/systemd/system")
# where systemd keeps runtime units, and the sign that it runs (what sd_booted() looks at)
RUNTIME_UNIT_DIR = Path("/run/systemd/system")

UNIT = """\
# Written by `roost host setup`, which rewrites it: put your own settings (e.g. --nat) in a
# drop-in (systemctl edit roost.service), which survives.
[Unit]
Description=roost: plugins as microVMs
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={exec_start}
# Stopping or restarting the unit ends only the daemon: the VMs keep running and the next
# daemon adopts them (no RuntimeDirectory= either: removing /run/roost would orphan them).
KillMode=process
Restart=on-failure
RestartSec=2s
# refused options (1, 2) and a refused start (4: another daemon, orphaned VMMs) need a person
RestartPreventExitStatus=1 2 4

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class Action:
    """One thing set up: what it is about, whether it changes (or would change) the host, and
    what was done, in words."""

    kind: str  # sysctl, file or daemon-reload
    target: str
    changed: bool
    message: str

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "target": self.target,
            "changed": self.changed,
            "message": self.message,
        }


class Sysctls(Protocol):
    """Reads and sets sysctls in one network namespace."""

    where: str

    def read(self, name: str) -> str: ...

    def write(self, name: str, value: str) -> None: ...


class NamespaceSysctls:
    """The sysctls of a named network namespace, set from a thread inside it."""

    def __init__(self, worker: NetnsWorker) -> None:
        self._worker = worker
        self.where = f"network namespace {worker.netns}"

    def read(self, name: str) -> str:
        return self._worker.run(sysctl.read, name)

    def write(self, name: str, value: str) -> None:
        self._worker.run(sysctl.write, name, value)


class HostSysctls:
    """The sysctls of the namespace this process runs in (the host's)."""

    where = "the host's namespace"

    def read(self, name: str) -> str:
        return sysctl.read(name)

    def write(self, name: str, value: str) -> None:
        sysctl.write(name, value)


def roost_command() -> str:
    """The `roost` command of this installation (the venv's, next to its Python)."""
    beside = Path(sys.executable).parent / "roost"
    found = str(beside) if beside.is_file() else shutil.which("roost")
    if found is None:
        raise HostError(
            f"cannot find the roost command (not in {beside.parent}, nor on PATH); install "
            "roost (pip install) and run `roost host setup` from that installation"
        )
    return found


def unit_text(command: str, netns: str | None) -> str:
    argv = [command, "serve", *(["--netns", netns] if netns else [])]
    return UNIT.format(exec_start=shlex.join(argv))


def sysctl_file_text() -> str:
    lines = "".join(f"{name} = {value}\n" for name, value in SYSCTLS.items())
    return f"# Written by `roost host setup`: what roost needs (see its README).\n{lines}"


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as error:
        raise HostError(f"cannot run {argv[0]}: {error.strerror}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
        raise HostError(f"{shlex.join(argv)} failed: {said}")


@dataclass
class HostSetup:
    """What to set up and where: sysctls through `sysctls`, the persistent sysctl file (none
    for a namespace, which does not outlive a reboot), and the unit in `unit_dir`."""

    sysctls: Sysctls
    sysctl_file: Path | None
    unit_dir: Path
    unit: str
    systemd_running: bool
    dry_run: bool = False
    run: Callable[[list[str]], None] = _run  # how commands run (systemctl)

    def apply(self) -> list[Action]:
        if not self.unit_dir.is_dir():
            raise InvalidError.at(
                "unit_dir",
                f"{self.unit_dir} is not a directory; pass --unit-dir DIR, the directory the "
                "unit should go to",
            )
        actions = [self._sysctl(name, value) for name, value in SYSCTLS.items()]
        if self.sysctl_file is not None:
            actions.append(self._file(self.sysctl_file, sysctl_file_text()))
        unit = self._file(self.unit_dir / UNIT_NAME, self.unit)
        actions.append(unit)
        if unit.changed:
            actions.append(self._reload())
        return actions

    def _sysctl(self, name: str, value: str) -> Action:
        was = self.sysctls.read(name)
        where = self.sysctls.where
        if was == value:
            return Action("sysctl", name, False, f"ok: {name} is already {value} in {where}")
        if self.dry_run:
            return Action(
                "sysctl", name, True, f"would set {name} = {value} in {where} (now {was})"
            )
        self.sysctls.write(name, value)
        return Action("sysctl", name, True, f"set {name} = {value} in {where} (was {was})")

    def _file(self, path: Path, text: str) -> Action:
        try:
            current = path.read_text() if path.exists() else None
        except OSError as error:
            raise HostError(f"cannot read {path}: {error.strerror}") from None
        if current == text:
            return Action("file", str(path), False, f"ok: {path} is already up to date")
        verb = "write" if current is None else "replace"
        if self.dry_run:
            return Action("file", str(path), True, f"would {verb} {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(f".{path.name}.roost-new")
            staged.write_text(text)
            staged.chmod(0o644)
            staged.replace(path)  # whole or not at all
        except OSError as error:
            raise HostError(f"cannot write {path}: {error.strerror}; run as root") from None
        return Action(
            "file", str(path), True, f"{'wrote' if current is None else 'replaced'} {path}"
        )

    def _reload(self) -> Action:
        if not self.systemd_running:
            return Action(
                "daemon-reload",
                "systemctl",
                False,
                f"skipped systemctl daemon-reload: systemd does not run here ({RUNTIME_UNIT_DIR} "
                "is missing)",
            )
        if self.dry_run:
            return Action("daemon-reload", "systemctl", True, "would run systemctl daemon-reload")
        self.run(["systemctl", "daemon-reload"])
        return Action("daemon-reload", "systemctl", True, "ran systemctl daemon-reload")
