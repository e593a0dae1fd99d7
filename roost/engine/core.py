"""The engine: VM lifecycle as plan → act, with every host step recorded and undone on failure.

Its collaborators are passed in (see `roost.engine.daemon.Daemon`, which builds the real
ones): the VM records, the plugins, the host network, the VMM drivers, the lease observer,
the disks and the event bus, so each failure path can be exercised with a failing fake.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy.orm import Session

from roost.engine.allocation import Allocator, Booting, Patched
from roost.engine.cni import (
    Added,
    CniAttachments,
    DatabaseStore,
    daemon_tag,
    released_reason,
    wanted_of,
)
from roost.engine.disks import Disks
from roost.engine.events import EventBus, follow_networks
from roost.engine.exclusive import VMLocks
from roost.engine.hostnet import HostNetwork
from roost.engine.metrics import EngineMetrics, timed
from roost.engine.networks import NetworkRegistry, lookup_in, policy_lookup_in
from roost.engine.plugins import Plugins
from roost.engine.policies import PolicyFirewallLike, PolicyRegistry
from roost.engine.settings import Settings
from roost.engine.steps import Steps
from roost.engine.views import ListedViews, network_view, vm_view, with_host_status
from roost.errors import ConflictError, RoostError
from roost.host.cni import CniRuntime, vm_namespace
from roost.host.netns import NetnsWorker, netns_path
from roost.plan import plan_vm
from roost.spec import Manifest, VMConfig, VMConfigPatch
from roost.spec.common import check_name
from roost.spec.interfaces import MAX_INTERFACES
from roost.state import alloc, configs
from roost.state.artifacts import ArtifactStore
from roost.state.configs import ConfigVersion
from roost.state.db import Database
from roost.state.vms import (
    ALL_VMS,
    LIVE,
    LiveRecord,
    NotThisHostsError,
    Row,
    VMQuery,
    VMRecords,
    VMStatus,
    no_vm,
)
from roost.vmm.base import (
    Driver,
    Early,
    HybridVsock,
    KernelVsock,
    LaunchSpec,
    RunDir,
    Vsock,
    VsockBackend,
    VsockTarget,
)
from roost.vmm.process import ExitWatcher, VMMProcess

log = logging.getLogger("roost.engine")
T = TypeVar("T")
# how long a vsock device's end may precede its VMM's for both to be the VMM's own end
DEVICE_VMM_GRACE = 1.0
EXITS = (VMStatus.STOPPED, VMStatus.CRASHED)  # the statuses a VMM's end leaves its VM in
# fetches those of a booting VM's artifacts (role -> {sha256, size}) this host's store lacks
# (in a cluster, from its peers: roost.engine.artifact_peers), or raises saying why it cannot
MissingArtifacts = Callable[[Mapping[str, Mapping[str, Any]]], None]


class Observer(Protocol):
    """Learns the addresses dhcp guests lease by watching their taps."""

    def watch(self, key: str, tap: str, mac: str) -> None: ...

    def forget(self, key: str) -> None: ...

    def close(self) -> None: ...


class VsockListeners(Protocol):
    """What the daemon listens on for a VM while its VMM runs (its `vsock_services`), bound
    before its guest boots and closed with its VMM; its persisted forwards go with the VM.
    Called from the engine's threads."""

    def vm_started(self, name: str, target: VsockTarget, services: Mapping[int, str]) -> None:
        """Listen for the VM's guest-initiated connections; raises if a listener cannot be
        bound (the start then fails)."""

    def vm_stopped(self, name: str) -> None:
        """Close the VM's service listeners (its forwards stay, refusing connections)."""

    def vm_removed(self, name: str) -> None:
        """Close everything held for the VM, forwards too."""


class NoListeners:
    """For an engine without a daemon's relays (tests of other parts)."""

    def vm_started(self, name: str, target: VsockTarget, services: Mapping[int, str]) -> None:
        return None

    def vm_stopped(self, name: str) -> None:
        return None

    def vm_removed(self, name: str) -> None:
        return None


@dataclass
class Live:
    """A VMM this daemon watches, the driver that runs it, and whether it is paused. `shown`
    holds the columns of the VM's view that come from other tables and cannot change while
    its VMM runs (plugin, CID, config and manifest), so a status change need not read them
    again; None for a VMM adopted after a restart. `taps`: those it runs with, released by
    name once its record is gone (a lost VM removed through another agent)."""

    process: VMMProcess
    driver: Driver
    paused: bool = False
    shown: dict[str, Any] | None = None
    taps: tuple[str, ...] = ()


def _as_read(query: VMQuery, offline: frozenset[int]) -> VMQuery:
    """`query` selecting by status as VMs read while the hosts `offline` are (their VMs
    `unknown`)."""
    return replace(query, offline_hosts=offline) if query.by_status and offline else query


class Engine:
    """Runs VMs: creates, starts, stops, pauses and removes them, and follows their VMMs."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        store: ArtifactStore,
        plugins: Plugins,
        host: HostNetwork,
        drivers: Mapping[str, Driver],
        observer: Observer,
        disks: Disks,
        worker: NetnsWorker,
        listeners: VsockListeners | None = None,
        events: EventBus | None = None,
        policy_firewall: PolicyFirewallLike | None = None,
        policy_gaps: Sequence[str] = (),
        missing_artifacts: MissingArtifacts | None = None,
    ) -> None:
        self.settings = settings
        self.missing_artifacts = missing_artifacts  # None: single host, the store has them all
        self.db = db
        self.records = VMRecords(db)
        self.store = store
        self.plugins = plugins
        self.host = host
        self.drivers = dict(drivers)
        self.observer = observer
        self.disks = disks
        self.worker = worker
        self.listeners: VsockListeners = listeners or NoListeners()
        self.events = events or EventBus()
        follow_networks(db, self.events)
        self.policies = PolicyRegistry(
            db,
            policy_firewall,
            self.events,
            lambda session: policy_lookup_in(session, self.records.host_id),
            gaps=policy_gaps,
        )
        self.metrics = EngineMetrics(db, self.drivers, self.policies.rule_counters)
        self.networks = NetworkRegistry(db, host, settings.dhcp_bridge)
        # runs cni interfaces' plugins from the daemon's namespace
        self.cni = CniRuntime(settings.cni_conf_dir, settings.cni_bin_dirs, worker)
        self.cni_store = DatabaseStore(db)
        self.cni_attachments = CniAttachments(
            self.cni, self.cni_store, tag=daemon_tag(settings.state_dir), events=self.events
        )
        self.allocator = Allocator(
            settings,
            db=db,
            records=self.records,
            drivers=self.drivers,
            store=store,
            disk_path=disks.path,
            run_dir=self.run_dir,
        )
        self.locks = VMLocks()
        # the ids of the hosts whose heartbeat is late (a cluster's; none on one host): their
        # VMs show status `unknown` as they are read (roost.engine.cluster keeps it current)
        self.offline_hosts: Callable[[], frozenset[int]] = frozenset
        self.live: dict[str, Live] = {}
        self.listed = ListedViews(self._view)
        # exits wait for their VM's lock: their own pool, so they never hold up a boot's jobs
        self._exits = ThreadPoolExecutor(max_workers=2, thread_name_prefix="roost-exit")
        self.watcher = ExitWatcher(self._on_exit)

    def act_as_host(self, host_id: int) -> None:
        """Be cluster host `host_id`'s engine (set once it has joined, before recovery): its
        VMs are the only ones it recovers, reaps, counts and shows live state of; others'
        are shown as their rows say."""
        self.records.host_id = host_id
        self.metrics.host_id = host_id
        self.networks.host_id = host_id
        self.cni_store.host_id = host_id

    def health(self) -> dict[str, Any]:
        """What `/healthz` reports: `status` is `ok`, `recovering` or `database_gone`."""
        if self.db.gone():
            return {"status": "database_gone"}
        if self.locks.recovering:
            return {"status": "recovering", "vms_to_recover": self.locks.unrecovered}
        return {"status": "ok"}

    def close(self) -> None:
        """Stop following VMMs; running ones keep running (they outlive the daemon)."""
        self.watcher.close()
        self.observer.close()
        self._exits.shutdown(wait=True)

    # ---- reading --------------------------------------------------------------------------

    def list_vms(self, query: VMQuery = ALL_VMS) -> list[dict[str, Any]]:
        """The VMs `query` names, in name order: one query, then each VM's view from its row."""
        offline = self.offline_hosts()
        rows = self.records.rows(_as_read(query, offline))
        return [self._view(with_host_status(row, offline)) for row in rows]

    def list_vms_encoded(self, query: VMQuery = ALL_VMS) -> list[tuple[str, bytes]]:
        """The names and JSON of the VMs `query` names, in name order: one query, then each
        VM's JSON as last listed unless its row or liveness changed since."""
        offline = self.offline_hosts()
        rows = self.records.listed(_as_read(query, offline))
        return self.listed.encoded(rows, self.live, every=query == ALL_VMS, offline=offline)

    def list_vm_names(self, query: VMQuery = ALL_VMS) -> list[str]:
        return self.records.names_of(_as_read(query, self.offline_hosts()))

    def show_vm(self, name: str) -> dict[str, Any]:
        return self._view(with_host_status(self.records.row(name), self.offline_hosts()))

    def _view(self, vm: Row, live: bool | None = None) -> dict[str, Any]:
        """VM `vm`'s view; `live` says whether its VMM runs (None: as `self.live` says now).
        A VM of another host is shown from its row alone: this agent neither runs its VMM nor
        knows its files."""
        if not self.records.on_this_host(vm["host_id"]):
            return vm_view(vm, run_dir=None, api_socket=None)
        driver = self.drivers.get(vm["vmm_kind"])
        run_dir = self.run_dir(vm["name"])
        if live is None:
            live = vm["name"] in self.live
        return vm_view(
            vm,
            run_dir=run_dir,
            api_socket=driver.api_socket(run_dir) if driver and live else None,
        )

    def console(self, name: str) -> tuple[Path, bool]:
        """The VM's serial console log and whether its VMM may still write to it."""
        return self.run_dir(name).console_log, self.records.status(name) in LIVE

    def vsock_target(self, name: str) -> VsockTarget:
        """How the host reaches VM `name`'s vsock now: its hybrid socket, or its CID. A VM whose
        VMM does not run (a paused one does) cannot be reached: conflict."""
        row = self.records.row(name)
        if name not in self.live:
            raise ConflictError(
                f"VM {name!r} is {row['status']}: its vsock is reachable only while its VMM "
                f"runs; start it first (roost vm start {name})"
            )
        backend = row["vsock_backend"]
        if backend is None:
            reason = row["vsock_unavailable"] or "its network plan has none"
            raise ConflictError(f"VM {name!r} has no vsock device: {reason}")
        if backend == VsockBackend.KERNEL:
            return KernelVsock(row["cid"])
        return HybridVsock(self.run_dir(name).vsock_socket)

    def list_networks(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            hosts = self.networks.hosts(session)
            return [network_view(n, i, hosts) for n, i in alloc.networks_and_leases(session)]

    def run_dir(self, name: str) -> RunDir:
        return RunDir(self.settings.run_dir / "vms" / name, self.settings.chroot(name))

    # ---- lifecycle ------------------------------------------------------------------------

    @timed("create")
    def create_vm(self, name: str, config: VMConfig, *, start: bool = True) -> dict[str, Any]:
        """Record a VM and allocate all its plan needs, then start it unless `start` is false.
        Any failure leaves nothing: no record, lease, tap, run dir or process. A create that
        starts is recorded as in progress first, so a daemon that dies during it rolls it
        back when it next starts."""
        check_name(name)
        allocator = self.allocator
        vmm = allocator.vmm_of(config)
        with self.locks.hold(name, "create", new=True):
            if not start:
                self.db.transact(
                    lambda session: allocator.record_new(session, name, config, vmm, None, False)
                )
                log.info("create %s: recorded the VM and its allocations", name)
                self.events.publish("vm.created", vm=name, plugin=config.plugin)
                return self.show_vm(name)
            allocator.check_run_dir_free(name)
            self.records.begin_create(name)
            steps = Steps("create", name)
            steps.done("recorded", "recorded the create as in progress")
            booting = None
            try:
                netns, added = self._attach_cni(steps, name, config)
                early = self._start_early(steps, name, vmm, new=True, netns=netns)
                booting = self.db.transact(
                    lambda session: allocator.record_new(
                        session, name, config, vmm, early, True, added
                    )
                )
                self.events.publish("vm.created", vm=name, plugin=config.plugin)
                self.events.publish(
                    "vm.status",
                    vm=name,
                    status=VMStatus.STARTING,
                    status_reason=None,
                    exit_code=None,
                )
                steps.done("allocated", "committed its record and allocations")
                view = self._boot(booting, steps)
            except BaseException:
                steps.rollback()
                self._undo_create(name)
                if booting is not None:  # its readers were told it exists
                    self.events.publish("vm.deleted", vm=name)
                raise
            self.records.end_create(name)
            return view

    def _undo_create(self, name: str) -> None:
        """A create that failed (or was cut short by a crash) leaves nothing: its VMM, record,
        leases, tap, rules, run dir and disk go (its VMM was ended by the steps' rollback, or
        by recovery), then the record that it was in progress."""
        self._forget(name)
        self.records.end_create(name)

    def _start_early(
        self, host: Steps, name: str, vmm: str, *, new: bool, netns: Path | None = None
    ) -> Early | None:
        """A fresh run dir, and whatever of the VMM can start before the allocations are
        made (the driver decides, in the VM's namespace `netns` for a cni VM); the VMM's start
        then overlaps the database and the tap. Undone: the VMM killed, then the run dir
        removed (a `new` VM's) or its sockets."""
        driver = self.drivers[vmm]
        run_dir = self.run_dir(name)
        tidy = run_dir.remove if new else run_dir.remove_sockets
        run_dir.prepare()
        try:
            early = driver.start_early(name, run_dir, self.worker, netns)
        except BaseException:
            tidy()
            raise
        what = "prepared the run dir" if early is None else "started the VMM early"
        host.done("vmm", what, lambda: _discard_early(early, tidy))
        return early

    def _attach_cni(
        self, steps: Steps, name: str, config: VMConfig, manifest: Manifest | None = None
    ) -> tuple[Path | None, dict[int, Added]]:
        """ADD for each cni interface of the VM's plan (its namespace made first), before its
        VMM starts in that namespace and its allocation takes the MACs and addresses ADD
        gave, each step's undo in `steps`: the namespace's file (None for a VM with no cni
        interface) and what each ADD gave, by interface index. A create (no `manifest`) is
        judged first as its allocation will judge it, so no plugin runs for a create then
        refused; a start was judged by `prepare_start`."""
        with self.db.read() as session:
            artifacts = None
            if manifest is None:
                plugin = self.records.plugin(session.connection(), config.plugin)
                manifest, artifacts = Manifest.model_validate(plugin.manifest), plugin.artifacts
            lookup = lookup_in(session, self.records.host_id)
            plan = plan_vm(name, manifest, config, self.allocator.default, lookup)
            wanted = wanted_of(plan.interfaces, lookup)
            if wanted and artifacts is not None:
                vmm = self.allocator.vmm_of(config)
                self.allocator.check_launchable(plan, manifest, artifacts, vmm)
        if not wanted:
            return None, {}
        added = self.cni_attachments.add(steps, name, wanted)
        return netns_path(vm_namespace(name)), added

    def start_vm(self, name: str) -> dict[str, Any]:
        with self.locks.hold(name, "start"):
            if name in self.live:
                return self._pause_or_resume(name, pause=False)
            return self._start(name, "start")

    def stop_vm(
        self, name: str, *, timeout: float | None = None, force: bool = False
    ) -> dict[str, Any]:
        with self.locks.hold(name, "stop"):
            self._stop(name, timeout, force, "stop")
            return self.show_vm(name)

    def restart_vm(self, name: str) -> dict[str, Any]:
        with self.locks.hold(name, "restart"):
            self._stop(name, None, False, "restart")
            return self._start(name, "restart")

    def pause_vm(self, name: str) -> dict[str, Any]:
        with self.locks.hold(name, "pause"):
            return self._pause_or_resume(name, pause=True)

    def resume_vm(self, name: str) -> dict[str, Any]:
        with self.locks.hold(name, "resume"):
            return self._pause_or_resume(name, pause=False)

    # ---- config versions ------------------------------------------------------------------

    def config(self, name: str) -> dict[str, Any]:
        """The VM's latest config version."""
        with self.db.read() as session:
            latest = configs.latest(session.connection(), name)
        if latest is None:
            raise no_vm(name)
        return latest.to_json()

    def config_history(self, name: str) -> list[dict[str, Any]]:
        """Every config version of the VM, newest first."""
        with self.db.read() as session:
            versions = configs.history(session.connection(), name)
        if not versions:
            raise no_vm(name)
        return [version.to_json() for version in versions]

    def patch_config(
        self, name: str, patch: VMConfigPatch, *, restart: bool = False
    ) -> dict[str, Any]:
        """Store what `patch` makes of the VM's config as a new version (validated as a create
        is, its address reserved at once); it takes effect at the VM's next start. With
        `restart`, a VM whose VMM runs an older version that needs restarting is restarted now
        (the version is stored first; a restart that fails raises, leaving the VM `error`)."""
        with self.locks.hold(name, "patch"):
            vmm_runs = name in self.live
            patched = self._patch(name, patch, vmm_runs=vmm_runs)
            self.host.remove_bridges(patched.emptied)
            if patched.created:
                log.info("patch %s: stored config version %d", name, patched.version.version)
                self.events.publish("vm.config", vm=name, version=patched.version.version)
            if patched.policies:
                taps = ", ".join(sorted(patched.policies))
                log.info("patch %s: its taps' policies changed at once (%s)", name, taps)
            if restart and vmm_runs and patched.restart_required:
                self._stop(name, None, False, "restart")
                self._start(name, "restart")
            return patched.version.to_json()

    def _patch(self, name: str, patch: VMConfigPatch, *, vmm_runs: bool) -> Patched:
        """The patch's transaction; when it changes the policies of taps that exist, they are
        changed inside it (one firewall transaction for all the VM's taps), so a change the
        firewall refuses stores nothing, and a commit that fails puts the taps back."""
        changed: list[Patched] = []

        def work(session: Session) -> Patched:
            patched = self.allocator.patch(session, name, patch, vmm_runs=vmm_runs)
            if patched.policies:
                self.host.set_tap_policies(patched.policies)
                changed.append(patched)
            return patched

        try:
            return self.db.transact(work)
        except BaseException:
            for patched in changed[-1:]:
                try:
                    self.host.set_tap_policies(patched.policies_before)
                except RoostError as error:
                    log.error("patch %s: could not put its taps' policies back: %s", name, error)
            raise

    def destroy_vm(self, name: str) -> None:
        """Stop the VM if it runs, then remove it and everything it holds. Another host's VM
        the cluster declared lost (its host offline, maybe for good) has only its record
        removed (its reservation given back; its addresses went when it was lost): its VMM,
        taps and CNI attachments are its host's to end, as that host's fencing does."""
        with self.locks.hold(name, "remove"):
            if self.records.lost_elsewhere(name):
                self.db.transact(lambda session: self.allocator.forget(session, name))
                log.info("VM %s: removed the record of the lost VM of another host", name)
                self.events.publish("vm.deleted", vm=name)
                return
            self.allocator.check_run_dir_free(name)
            stopped = self._stop(name, None, False, "remove")
            # a VMM stopped here had its host side released by the stop: not twice (each
            # tap's rules cost two nftables runs)
            self._forget(name, Steps("remove", name).done, released=stopped)
            self.events.publish("vm.deleted", vm=name)

    # ---- lifecycle internals --------------------------------------------------------------

    def _start(self, name: str, operation: str) -> dict[str, Any]:
        """Plan again from the VM's latest config version, allocate what the plan needs
        (taking the address a patch reserved, releasing what it no longer needs), then launch.
        A start that fails leaves the VM `error` with its reason, its tap, rules and process
        gone, its leases kept."""
        with self.db.read() as session:
            latest = configs.latest(session.connection(), name)
        if latest is None:
            raise no_vm(name)
        try:
            return self._plan_and_launch(name, operation, latest)
        except NotThisHostsError:
            raise  # the VM is not this host's to record anything of
        except BaseException as error:
            reason = error.message if isinstance(error, RoostError) else repr(error)
            try:
                self._set(
                    name, status=VMStatus.ERROR, status_reason=reason, pid=None, supervisor_pid=None
                )
            except RoostError as unrecorded:
                log.error("VM %s: could not record its failed start: %s", name, unrecorded)
            raise

    @timed("start")
    def _plan_and_launch(self, name: str, operation: str, latest: ConfigVersion) -> dict[str, Any]:
        allocator = self.allocator
        vmm = allocator.prepare_start(name, latest)
        steps = Steps(operation, name)
        # recorded before any VMM is started for it: a daemon that dies from here on finds a
        # VM it was starting (and ends its VMM), not a VMM its database does not account for
        starting = self.records.begin_start(name)
        self.events.vm_status(starting)
        steps.done("starting", "recorded the VM starting")
        try:
            config = VMConfig.model_validate(latest.config)
            manifest = Manifest.model_validate(latest.manifest)
            netns, added = self._attach_cni(steps, name, config, manifest)
            early = self._start_early(steps, name, vmm, new=False, netns=netns)
            booting, emptied = self.db.transact(
                lambda session: allocator.for_start(session, name, latest, early, added)
            )
            self.host.remove_bridges(emptied)
            steps.done("allocated", "committed its allocations")
            return self._boot(booting, steps)
        except BaseException:
            steps.rollback()
            raise

    def _boot(self, booting: Booting, steps: Steps) -> dict[str, Any]:
        """Make its taps on their bridges (with their rules and policies), now that its leases
        have committed and keep those bridges, and its cni interfaces' taps; then boot the VMM.
        The VM as it then is. On failure the caller rolls `steps` back. Artifacts this host
        lacks are fetched first (`missing_artifacts`)."""
        name = booting.name
        if self.missing_artifacts is not None:
            self.missing_artifacts(booting.artifacts)
        for planned in booting.taps:
            self.host.attach(steps, planned)
        owner = self._tap_owner(booting.vmm)
        for index, tap in booting.cni_taps:
            self.cni_attachments.connect(steps, name, index, tap, owner)
        if booting.vsock_missing:
            log.warning("VM %s starts without a vsock device: %s", name, booting.vsock_missing)
        driver = self.drivers[booting.vmm]
        # logged before the boot: the moments after it are the busiest of all
        if booting.early is not None:
            pid = booting.early.result().pid
            log.info("%s %s: booting %s (pid %d)", steps.operation, name, booting.vmm, pid)
        else:
            log.info("%s %s: booting %s", steps.operation, name, booting.vmm)
        recorded: list[Row] = []

        def record_running(process: VMMProcess) -> None:
            """While the VMM boots the guest (Firecracker: InstanceStart sent, its answer not
            yet in), so the write overlaps the VMM's work instead of following it. A boot that
            fails after this is recorded by the caller."""
            recorded.append(
                self.records.write(
                    name,
                    booting.shown,
                    status=VMStatus.RUNNING,
                    pid=process.pid,
                    supervisor_pid=process.supervisor_pid,
                    running_version=booting.version,
                    restart_required=False,
                )
            )
            self.events.vm_status(recorded[-1])

        self._listen(name, booting.spec, booting.services, steps)
        disk_source = self.allocator.artifact_path(booting.artifacts, "rootfs")
        process = driver.launch(
            booting.spec,
            self.worker,
            # the VM's own disk, made once its record exists, before the VMM is handed it
            host_ready=(lambda: self.disks.make(name, disk_source)) if disk_source else None,
            early=booting.early,
            while_booting=record_running,
        )
        taps = (*(planned.tap for planned in booting.taps), *(tap for _, tap in booting.cni_taps))
        self.live[name] = Live(process, driver, shown=booting.shown, taps=taps)
        steps.done("booted", f"started {booting.vmm}", lambda: self._untrack(name, process))
        self._watch(name, process)
        for index, tap, mac in booting.watched:
            self.observer.watch(observer_key(name, index), tap, mac)
        [row] = recorded  # drivers call `while_booting` once for every boot they complete
        return self._view(row)

    def _listen(
        self, name: str, spec: LaunchSpec, services: Mapping[int, str], steps: Steps
    ) -> None:
        """Listen for the guest's connections to its `vsock_services` before it boots."""
        if spec.vsock is None:
            return
        target = vsock_target_of(spec.vsock)
        self.listeners.vm_started(name, target, services)
        steps.done(
            "listening", "listened for vsock services", lambda: self.listeners.vm_stopped(name)
        )

    def _watch(self, name: str, process: VMMProcess) -> None:
        """Follow the VMM, and its vsock device if it has one: the device's end kills the
        guest's vsock for good, so it ends the VM too."""
        self.watcher.watch(name, process)
        if process.device is not None:
            self.watcher.watch(name, process.device)

    def _unwatch(self, process: VMMProcess) -> None:
        self.watcher.forget(process)
        if process.device is not None:
            self.watcher.forget(process.device)

    def _untrack(self, name: str, process: VMMProcess) -> None:
        """Undo a launch: no longer follow the VMM, and end it."""
        self.live.pop(name, None)
        self._unwatch(process)
        process.kill()

    def _pause_or_resume(self, name: str, *, pause: bool) -> dict[str, Any]:
        """Pause or resume a VM whose VMM runs (the VMMs this daemon watches are exactly the
        running and paused VMs); asking for the state it is in changes nothing."""
        live = self.live.get(name)
        if live is None:
            what = "pause" if pause else "resume"
            status = self.records.status(name)
            raise ConflictError(f"cannot {what} VM {name!r}: it is {status}; start it first")
        if live.paused == pause:
            return self.show_vm(name)
        before, after = (
            (VMStatus.RUNNING, VMStatus.PAUSED) if pause else (VMStatus.PAUSED, VMStatus.RUNNING)
        )
        written: list[Row] = []

        def record() -> None:  # while the VMM pauses or resumes the guest
            written.append(self.records.write(name, live.shown, status=after))
            self.events.vm_status(written[-1])

        change = live.driver.pause if pause else live.driver.resume
        try:
            change(live.process, record)
        except BaseException:
            if written:  # recorded, then the VMM refused: the record goes back
                self.events.vm_status(self.records.write(name, live.shown, status=before))
            raise
        live.paused = pause
        operation, step = ("pause", "paused") if pause else ("resume", "resumed")
        Steps(operation, name).done(step, f"recorded the VM {after}")
        [row] = written  # drivers call `meanwhile` once for every change they complete
        return self._view(row)

    def _stop(self, name: str, timeout: float | None, force: bool, operation: str) -> bool:
        """Stop the VM's VMM, if one runs, as part of `operation` (stop, restart or remove);
        whether one did (and its host side was released)."""
        live = self.live.get(name)
        if live is None:
            self.records.status(name)  # a VM that does not exist is an error, a stopped one not
            return False
        began = time.monotonic()
        steps = Steps(operation, name)
        self._set(name, status=VMStatus.STOPPING)
        steps.done("stopping", "recorded the VM stopping")
        self._unwatch(live.process)
        if live.paused and not force:
            # a paused guest cannot act on a graceful shutdown request: let it run to do so
            try:
                live.driver.resume(live.process)
            except RoostError as error:
                log.warning("VM %s: could not resume it to stop it gracefully: %s", name, error)
        wait = self.settings.stop_timeout if timeout is None else timeout
        code = live.driver.stop(live.process, wait, force)
        steps.done("vmm-ended", f"ended its VMM (exit code {code})")
        self.live.pop(name, None)
        failures = self.release_host(name)
        steps.done("released", "released its tap, rules and sockets")
        self._set(
            name,
            status=VMStatus.STOPPED,
            exit_code=code,
            status_reason=released_reason(None, VMStatus.STOPPED, failures),
            **self._ended(name),
        )
        steps.done("stopped", "recorded the VM stopped")
        self.metrics.observe("stop", time.monotonic() - began)
        return True

    def abandon(self, name: str) -> bool:
        """End VM `name`'s VMM by PID (reaped) and release what it held on this host, leaving
        its record as it is: the cluster declared the VM lost, so its addresses may be another
        VM's by now and nothing of it is written. Whether a VMM ran."""
        with self.locks.hold(name, "abandon", wait=True, recovery=True):
            live = self.live.get(name)
            if live is None:
                return False
            self._let_go(name, live)
            return True

    def _let_go(self, name: str, live: Live) -> None:
        self.live.pop(name, None)
        self._unwatch(live.process)
        live.process.kill()
        self.release_host(name, sorted({*self.records.taps(name), *live.taps}))

    def release_host(self, name: str, taps: Sequence[str] | None = None) -> list[str]:
        """Remove what only exists while the VMM runs: its taps, their rules and its sockets
        (`taps`: those of every interface it has had, read from its record if not given), and
        its CNI attachments (DEL, then its namespace); what of those could not be removed."""
        for index in range(MAX_INTERFACES):
            self.observer.forget(observer_key(name, index))
        self.listeners.vm_stopped(name)
        for tap in self.records.taps(name) if taps is None else taps:
            self.host.release(tap)
        self.run_dir(name).remove_sockets()
        return self.cni_attachments.release(name)

    def _tap_owner(self, vmm: str) -> tuple[int, int] | None:
        """Who must own a VM's taps: the jailer's uid and gid for a jailed Firecracker."""
        settings = self.settings
        if vmm != "firecracker" or settings.jail_uid is None or settings.jail_gid is None:
            return None
        return (settings.jail_uid, settings.jail_gid) if settings.jailer is not None else None

    def _on_exit(self, name: str, process: VMMProcess) -> None:
        self._exits.submit(self._vmm_exited, name, process)

    def _vmm_exited(self, name: str, process: VMMProcess) -> None:
        """A VMM (or its vsock device) ended without being asked: the VM is `stopped` (exit 0)
        or `crashed`."""
        with self.locks.hold(name, "exit", wait=True, recovery=True):
            live = self.live.get(name)
            if live is None:
                return
            if self.records.host_id is not None and self.records.status(name) is VMStatus.LOST:
                # declared lost while this host was silent (frozen): its record is no longer
                # this host's to write, only its VMM and host side are
                self._let_go(name, live)
                return
            if process is live.process.device:
                self._device_ended(name, live)
                return
            if live.process is process:
                self._record_exit(name, process)

    def _record_exit(self, name: str, process: VMMProcess) -> None:
        process.wait(5)
        process.end_device()
        code = process.exit_code()
        self.live.pop(name, None)
        failures = self.release_host(name)
        status = VMStatus.STOPPED if code == 0 else VMStatus.CRASHED
        self._set(
            name,
            status=status,
            status_reason=released_reason(
                None if code == 0 else exit_reason(code), status, failures
            ),
            exit_code=code,
            **self._ended(name),
        )
        log.info("VM %s: VMM exited on its own with %s -> %s", name, code, status)

    def _device_ended(self, name: str, live: Live) -> None:
        """The VM's vsock device ended. When its VMM ends too (the device goes once the VMM
        does), that is the VMM's end; else the guest's vsock is dead for good (QEMU cannot
        reconnect a vhost-user device): the VMM is stopped and the VM `crashed`."""
        process, device = live.process, live.process.device
        assert device is not None
        if process.wait(DEVICE_VMM_GRACE):
            self._unwatch(process)
            self._record_exit(name, process)
            return
        device.wait(1)
        what = f"the VM's vsock device (roost's vhost-user-vsock backend, pid {device.pid})"
        reason = (
            f"{exit_reason(device.exit_code(), what)}; its guest cannot get vsock back, so its "
            "VMM was stopped"
        )
        log.error("VM %s: %s", name, reason)
        self._unwatch(process)
        code = live.driver.stop(process, 0, True)
        self.live.pop(name, None)
        failures = self.release_host(name)
        self._set(
            name,
            status=VMStatus.CRASHED,
            status_reason=released_reason(reason, VMStatus.CRASHED, failures),
            exit_code=code,
            **self._ended(name),
        )

    def address_observed(self, key: str, ip: str) -> None:
        """The address a dhcp guest leased on one interface (`key`, an `observer_key`), as the
        host saw it (tap traffic or lease file)."""
        name, index = observed_interface(key)
        self.records.set_observed_ip(name, index, ip)
        log.info("VM %s: observed address %s on interface %d", name, ip, index)

    def _forget(
        self,
        name: str,
        done: Callable[[str, str], None] = lambda step, what: None,
        *,
        released: bool = False,
    ) -> None:
        """Remove the VM's record, leases, run dir, disk and any network it leaves empty, and
        its host side unless `released` already; `done` records each step (a remove's
        `Steps.done`)."""
        if not released:
            self.release_host(name)
        emptied = self.db.transact(lambda session: self.allocator.forget(session, name))
        done("forgotten", "removed its record and leases")
        # after the record has gone: a forward added meanwhile then fails, or is closed here
        self.listeners.vm_removed(name)
        self.host.remove_bridges(emptied)
        self.run_dir(name).remove()
        done("run-dir", "removed its run dir")
        self.disks.remove(name)
        done("disk", "removed its disk")
        self.plugins.collect_garbage()

    def _ended(self, name: str) -> dict[str, Any]:
        """What a VM's record says once its VMM has ended: no VMM, no version running, and —
        when it ran an older version than its latest — what its latest version has it hold
        (the addresses it no longer needs released now, as a patch of a stopped VM would)."""
        planned, emptied = self.db.transact(
            lambda session: self.allocator.latest_planned(session, name)
        )
        self.host.remove_bridges(emptied)
        return {
            "pid": None,
            "supervisor_pid": None,
            "running_version": None,
            "restart_required": False,
            **planned,
        }

    def _set(self, name: str, **values: Any) -> dict[str, Any]:
        """Update the VM's record and return its view; its status goes out as an event, and a
        VMM's end is counted under the VMM that ran (read before the write, which may record
        the VMM of a newer config version)."""
        live = self.live.get(name)
        ran = self.records.vmm_kind(name) if values.get("status") in EXITS else None
        row = self.records.write(name, live.shown if live else None, **values)
        self.events.vm_status(row)
        if ran is not None:
            self.metrics.vmm_exited(ran, row["status"])
        return self._view(row)

    # ---- used by recovery -----------------------------------------------------------------

    def adopt(self, record: LiveRecord, process: VMMProcess) -> None:
        """Follow a VMM an earlier daemon started, as if this one had."""
        self.live[record.name] = Live(
            process,
            self.drivers[record.vmm_kind],
            record.status is VMStatus.PAUSED,
            taps=tuple(record.taps),
        )
        self._watch(record.name, process)
        for interface in record.network.interfaces if record.network is not None else ():
            nic = record.nics.get(interface.index)
            if interface.plan.observe_ip and nic is not None:
                self.observer.watch(observer_key(record.name, interface.index), nic.tap, nic.mac)
        if record.vsock_backend is not None:
            self._listen_again(record.name, record.running_version)
        self._check_cni(record)

    def _check_cni(self, record: LiveRecord) -> None:
        """CHECK an adopted VM's CNI attachments (and roost's redirects, which the plugins
        cannot see): what is wrong goes into its `status_reason` (an event with it), and the
        VM keeps running."""
        interfaces = record.network.interfaces if record.network is not None else ()
        if not any(interface.plan.netns for interface in interfaces):
            return
        taps = {index: nic.tap for index, nic in record.nics.items()}
        problem = self.cni_attachments.check(record.name, taps)
        if problem is not None:
            log.warning("VM %s: CNI CHECK failed: %s", record.name, problem)
            self._set(record.name, status_reason=f"CNI CHECK failed: {problem}")

    def reap_cni(self) -> None:
        """At start, once VMs are recovered: DEL the CNI attachments of VMs no VMM runs or
        starts for (a crash's, a failed DEL's, a removed VM's) and remove their namespaces."""

        def in_use() -> set[str]:
            # another host's VM or create is that host's to reap, whatever it runs (read again
            # for each VM: a create another host begins meanwhile records its attachments first)
            live = {record.name for record in self.records.live()} | self.records.elsewhere()
            return live | self.records.pending_creates() | self.allocator.kept_orphans

        def hold(vm: str) -> AbstractContextManager[None]:
            # a start of a stopped VM may run meanwhile: its attachments are its own
            return self.locks.hold(vm, "reap", wait=True, recovery=True)

        self.cni_attachments.reap(in_use, hold)

    def _listen_again(self, name: str, version: int | None) -> None:
        """Listen for an adopted VM's vsock services again (those of the version it runs); a
        listener that cannot be bound is logged, and the VM adopted all the same."""
        with self.db.read() as session:
            running = configs.version(session.connection(), name, version or 0)
            running = running or configs.latest(session.connection(), name)
        if running is None:
            return
        services = VMConfig.model_validate(running.config).vsock_services
        try:
            self.listeners.vm_started(name, self.vsock_target(name), services)
        except Exception:
            log.exception("VM %s: could not listen for its vsock services again", name)

    def settle(
        self,
        name: str,
        status: VMStatus,
        code: int | None,
        reason: str | None,
        taps: Sequence[str],
    ) -> None:
        """Record how a VM's VMM ended while no daemon followed it, and tidy what it used."""
        failures = self.release_host(name, taps)
        reason = released_reason(reason, status, failures)
        self._set(name, status=status, exit_code=code, status_reason=reason, **self._ended(name))
        log.info("VM %s: found %s (exit code %s)", name, status, code)

    def roll_back_create(self, name: str) -> None:
        """Undo a create a daemon died in (its VMM, if any, ended by the caller)."""
        with self.locks.hold(name, "rollback", wait=True, recovery=True):
            self._undo_create(name)


def observer_key(name: str, index: int) -> str:
    """What the lease observer knows one interface of a VM by: the VM's name for its first
    (VM names have no `#`), `<name>#<index>` for the others."""
    return name if index == 0 else f"{name}#{index}"


def observed_interface(key: str) -> tuple[str, int]:
    """The VM and interface index of an `observer_key`."""
    name, _, index = key.partition("#")
    return name, int(index or 0)


def _discard_early(early: Early | None, tidy: Callable[[], object]) -> None:
    """Undo `_start_early` for a launch that will not happen."""
    if early is not None:
        with suppress(Exception):
            early.result().kill()
    tidy()


def vsock_target_of(vsock: Vsock) -> VsockTarget:
    """How the host reaches a guest with this vsock device."""
    if vsock.backend is VsockBackend.KERNEL:
        return KernelVsock(vsock.cid)
    return HybridVsock(vsock.uds_path)


def exit_reason(code: int | None, what: str = "the VMM") -> str:
    if code is None:
        return f"{what} ended and its exit status is unknown"
    if code < 0:
        return f"{what} was killed by signal {-code}"
    return f"{what} exited with code {code}"
