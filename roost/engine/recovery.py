"""Recovery at start: bring the records and the host in line after a restart or a crash.

First, before the daemon listens, `check` finds the live VMMs in the run dirs and compares
them with the database: a VMM that no VM record accounts for (and that is not one of a create
the database records as in progress) is an orphan, and a daemon never kills silently what its
database does not know: it refuses to start, naming them, unless told to reap or keep them.

Then, with the API up, `run` rolls back the creates a daemon died in, adopts the VMMs still
running (CHECKing a cni VM's attachments), settles the ones that ended, and removes run dirs,
disks, taps and bridges that belong to no VM (and, with --nat, makes the NAT rules match the
bridges that remain); last, it DELs the CNI attachments no live VM holds and removes their
namespaces. Operations on a VM wait (503 `recovering`) until it has been recovered.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from roost.engine.core import Engine, exit_reason
from roost.engine.hostnet import tap_policies
from roost.engine.settings import Orphans
from roost.errors import ConflictError, RoostError
from roost.plan.policy import TapPolicies
from roost.state import alloc
from roost.state.vms import LiveRecord, VMStatus
from roost.vmm.base import RunDir, VsockBackend
from roost.vmm.process import (
    DEVICE_FILES,
    VMM_FILES,
    ProcessFiles,
    VMMProcess,
    is_vmm_of,
    recorded_pid,
)

log = logging.getLogger("roost.recovery")
T = TypeVar("T")


@dataclass(frozen=True)
class FoundVMM:
    """A live VMM of this daemon's kind, or its live vsock device (or both), found in the run
    dir of VM `name`."""

    name: str
    pid: int | None
    run_dir: Path
    device_pid: int | None = None

    def end(self) -> None:
        """Kill both, by PID, the VMM first."""
        for process in (_process(self.run_dir, self.pid), self.device()):
            if process is not None:
                process.kill()

    def device(self) -> VMMProcess | None:
        return _process(self.run_dir, self.device_pid, DEVICE_FILES)

    def __str__(self) -> str:
        pids = [f"pid {self.pid}"] if self.pid else []
        pids += [f"vsock device pid {self.device_pid}"] if self.device_pid else []
        return f"{self.name} ({', '.join(pids)})"


def _process(run_dir: Path, pid: int | None, files: ProcessFiles = VMM_FILES) -> VMMProcess | None:
    return None if pid is None else VMMProcess(run_dir, pid, pid, files)


def _live_pid(run_dir: Path, files: ProcessFiles, chroot: Path | None = None) -> int | None:
    """The PID the supervisor recorded in `run_dir`, if that process still lives and names the
    run dir on its command line (not a stranger that got the PID since)."""
    pid = recorded_pid(run_dir, files)
    if pid is None or VMMProcess(run_dir, pid, pid, files).exited():
        return None
    return pid if is_vmm_of(pid, run_dir, chroot) else None


def live_vmms(
    run_root: Path, chroot: Callable[[str], Path | None] = lambda name: None
) -> list[FoundVMM]:
    """Every run dir under `run_root` where a VMM or a vsock device started for it lives
    (`chroot` names a VM's chroot under the jailer)."""
    vms = run_root / "vms"
    found = []
    for path in sorted(vms.iterdir()) if vms.is_dir() else []:
        pid = _live_pid(path, VMM_FILES, chroot(path.name))
        device_pid = _live_pid(path, DEVICE_FILES)
        if pid is not None or device_pid is not None:
            found.append(FoundVMM(path.name, pid, path, device_pid))
    return found


def unaccounted(
    found: list[FoundVMM], records: list[LiveRecord], pending: set[str]
) -> list[FoundVMM]:
    """The VMMs no record accounts for: not a create in progress, and not the VMM of a VM
    whose record says one runs (with this PID, or none recorded yet)."""
    by_name = {record.name: record for record in records}
    orphans = []
    for vmm in found:
        record = by_name.get(vmm.name)
        accounted = record is not None and (vmm.pid is None or record.pid in (None, vmm.pid))
        if vmm.name in pending or accounted:
            continue
        orphans.append(vmm)
    return orphans


def _tap_policies(record: LiveRecord) -> list[TapPolicies]:
    """The attachments of a live VM's taps, as its record has their policies."""
    if record.network is None:
        return []
    found = []
    for interface in record.network.interfaces:
        nic = record.nics.get(interface.index)
        if interface.plan.tap and nic is not None:
            effective = interface.effective
            attached = tap_policies(nic.tap, effective.policies, effective.policy_defaults)
            if attached is not None:
                found.append(attached)
    return found


def orphans_error(orphans: list[FoundVMM]) -> ConflictError:
    listed = ", ".join(str(vmm) for vmm in orphans)
    return ConflictError(
        f"live VMMs that the database does not account for run in the run dir: {listed}. "
        "The database may have been replaced or restored from an older copy. Start the daemon "
        "with --reap-orphans to end them, or --keep-orphans to leave them running untouched",
        code="orphans",
    )


class Recovery:
    """One daemon start's recovery: `check` (before listening), then `start` (in the
    background)."""

    def __init__(self, engine: Engine, policy: Orphans) -> None:
        self.engine = engine
        self.policy = policy
        self.records: list[LiveRecord] = []
        self.pending: set[str] = set()
        self.orphans: list[FoundVMM] = []
        self.finished = threading.Event()

    def check(self) -> None:
        """Find the orphans and refuse them unless the policy says otherwise; then set up
        the network policies again."""
        self.records = self.engine.records.live()
        self.pending = self.engine.records.pending_creates()
        found = live_vmms(self.engine.settings.run_dir, self.engine.settings.chroot)
        self.orphans = unaccounted(found, self.records, self.pending)
        if self.orphans and self.policy is Orphans.REFUSE:
            raise orphans_error(self.orphans)
        if self.policy is Orphans.KEEP and self.orphans:
            self.engine.allocator.kept_orphans = {vmm.name for vmm in self.orphans}
            self.engine.host.keep_bridges = True  # an orphan's tap may be on any of them
        self._restore_policies()

    def _restore_policies(self) -> None:
        """Before the API listens (so no policy changes meanwhile), in one transaction: every
        stored policy made again, the taps of every VM whose record says a VMM runs attached to
        the policies that record gives them (a VMM that has ended is settled later, which
        detaches them), and attachments of any other tap dropped, unless a kept orphan's tap
        of that name exists. A firewall that cannot be set up is logged: the VMs are recovered
        all the same."""
        engine = self.engine
        taps = [attached for record in self.records for attached in _tap_policies(record)]
        orphan_taps = (
            set(engine.host.links.names(alloc.TAP_PREFIX))
            if engine.allocator.kept_orphans
            else set()
        )
        try:
            with engine.db.read() as session:
                policies = engine.policies.stored(session)
                stale = engine.host.restore_policies(
                    policies, taps, engine.policies.addresses(session), orphan_taps.__contains__
                )
        except RoostError as error:
            log.error("network policies could not be set up again: %s", error)
            return
        if policies or taps or stale:
            log.info(
                "network policies: made %d, attached %d taps of live VMs, detached %d others%s",
                len(policies),
                len(taps),
                len(stale),
                f" ({', '.join(stale)})" if stale else "",
            )

    def start(self) -> threading.Thread:
        names = {record.name for record in self.records} | self.pending
        self.engine.locks.begin_recovery(names)
        thread = threading.Thread(target=self.run, name="roost-recovery", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        try:
            self._reap_orphans()
            for name in sorted(self.pending):
                self._each(name, self._roll_back_create, name)
            for record in self.records:
                if record.name not in self.pending:
                    self._each(record.name, self._recover_vm, record)
            self._remove_strays()
            self.engine.reap_cni()
            log.info("recovery done: %d VMs looked at", len(self.records) + len(self.pending))
        except Exception:
            log.exception("recovery failed; VMs not yet recovered may need a daemon restart")
        finally:
            self.engine.locks.end_recovery()
            self.finished.set()

    def _each(self, name: str, recover: Callable[[T], object], what: T) -> None:
        """Recover one VM; one that cannot be is left as it is (its VMM, tap and leases
        kept) and refuses operations until a restart of the daemon recovers it."""
        try:
            recover(what)
        except Exception as error:
            log.exception("VM %s: could not recover it", name)
            reason = error.message if isinstance(error, RoostError) else repr(error)
            self.engine.locks.failed(name, reason)
        else:
            self.engine.locks.recovered(name)

    def _reap_orphans(self) -> None:
        for vmm in self.orphans:
            if self.policy is Orphans.REAP:
                vmm.end()
                log.warning("ended %s in %s, which no VM accounts for", vmm, vmm.run_dir)
            else:
                log.warning("left %s in %s running (--keep-orphans)", vmm, vmm.run_dir)

    def _roll_back_create(self, name: str) -> None:
        """A create that never returned: its VMM ended, then everything it made removed."""
        run_dir = self.engine.run_dir(name)
        path = run_dir.path
        pid = _live_pid(path, VMM_FILES, run_dir.chroot)
        FoundVMM(name, pid, path, _live_pid(path, DEVICE_FILES)).end()
        self.engine.roll_back_create(name)
        log.info("VM %s: rolled back its create, which the daemon died in", name)

    def _recover_vm(self, record: LiveRecord) -> None:
        """A VM whose record says a VMM runs for it: one the daemon died starting or stopping
        is stopped (its VMM ended, if any); a running or paused one is adopted if its VMM
        lives, else settled as its VMM ended."""
        name, status = record.name, record.status
        run_dir = self.engine.run_dir(name)
        pid = record.pid or recorded_pid(run_dir.path)  # a crash while starting leaves only this
        process = VMMProcess(run_dir.path, pid, record.supervisor_pid or pid) if pid else None
        alive = (
            process is not None
            and not process.exited()
            and is_vmm_of(process.pid, run_dir.path, run_dir.chroot)
        )
        device = _process(run_dir.path, _live_pid(run_dir.path, DEVICE_FILES), DEVICE_FILES)
        if process is not None:
            process.device = device
        elif device is not None:
            device.kill()
        if status in (VMStatus.STARTING, VMStatus.STOPPING):
            code = process.kill() if alive and process is not None else None
            doing = "starting" if status is VMStatus.STARTING else "stopping"
            reason = f"the daemon stopped while the VM was {doing}; start it again"
            self.engine.settle(name, VMStatus.STOPPED, code, reason, record.taps)
            return
        if alive and process is not None:
            if record.vsock_backend == VsockBackend.USER and device is None:
                code = process.kill()
                reason = (
                    "the VM's vsock device (roost's vhost-user-vsock backend) ended while no "
                    "daemon followed it; its guest cannot get vsock back, so its VMM was stopped"
                )
                self.engine.settle(name, VMStatus.CRASHED, code, reason, record.taps)
                return
            self.engine.adopt(record, process)
            log.info("VM %s: adopted its running VMM (pid %d)", name, process.pid)
            return
        if process is not None:
            process.end_device()
        code = process.exit_code() if process is not None else None
        ended = VMStatus.STOPPED if code == 0 else VMStatus.CRASHED
        self.engine.settle(name, ended, code, None if code == 0 else exit_reason(code), record.taps)

    def _remove_strays(self) -> None:
        """Run dirs and disks of no VM, then taps of no running VM and bridges no VM holds an
        address on — unless orphans were kept, whose run dirs and links are theirs — and then
        NAT rules for exactly the managed bridges left."""
        engine = self.engine
        names = engine.records.names()
        kept = engine.allocator.kept_orphans
        vms = engine.settings.run_dir / "vms"
        for path in sorted(vms.iterdir()) if vms.is_dir() else []:
            if path.name not in names and path.name not in kept:
                RunDir(path, engine.settings.chroot(path.name)).remove()
                log.info("removed run dir %s, which belongs to no VM", path)
        for name in engine.disks.names() - names - kept:
            engine.disks.remove(name)
            log.info("removed the disk of %s, which belongs to no VM", name)

        def used_bridges() -> set[str]:
            with engine.db.read() as session:
                return alloc.bridges_in_use(session)

        def networks() -> dict[str, ipaddress.IPv4Network]:
            with engine.db.read() as session:
                return {
                    alloc.bridge_of(network): ipaddress.IPv4Network(network.subnet)
                    for network, _ in alloc.networks_and_leases(session)
                    if network.subnet is not None and network.kind != alloc.EXTERNAL
                }

        if kept:
            log.warning("left taps and bridges as they are: kept orphaned VMMs may use them")
        else:
            engine.host.reap(engine.records.live_taps, used_bridges)
        engine.host.reconcile_nat(networks)
