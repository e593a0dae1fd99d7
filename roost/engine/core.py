"""The engine: VM lifecycle as plan → act, with every step recorded and undone on failure.

Locking: one operation at a time per VM (a second gets `vm_busy`); bridge set-up and removal
share one lock so a bridge is never removed under a tap that is being attached to it (a tap made
inside an allocating transaction keeps it until that transaction, and its lease, has committed).
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar, cast

from sqlalchemy import Connection, Row, and_, bindparam, insert, select, update
from sqlalchemy.orm import Session

from roost.engine.plugins import Plugins, find
from roost.engine.settings import DEFAULT_BRIDGE, DEFAULT_NETWORK, Settings
from roost.engine.steps import Steps
from roost.engine.views import VM_ROWS, network_view, vm_view
from roost.errors import ConflictError, HostError, InvalidError, NotFoundError, RoostError
from roost.host.firewall import Firewall
from roost.host.links import Links
from roost.host.netns import NetnsWorker, namespace_file
from roost.host.observe import LeaseObserver
from roost.plan import IPAM, AntiSpoof, Attachment, DefaultNetwork, VMPlan, boot_args, plan_vm
from roost.plan.network import EffectiveNetwork, NetworkPlan, plan_network
from roost.spec import Manifest, VMConfig
from roost.spec.common import check_name
from roost.state import alloc
from roost.state.artifacts import ArtifactStore, is_elf
from roost.state.db import Database, sqlite_url
from roost.state.models import VM, IPLease, Network, Plugin, PluginArtifact, VMConfigVersion
from roost.vmm.base import NIC, Driver, Early, LaunchSpec, RunDir, Vsock
from roost.vmm.firecracker import FirecrackerDriver, find_firecracker
from roost.vmm.process import ExitWatcher, VMMProcess, recorded_pid
from roost.vmm.qemu import Accel, Machine, QemuDriver

log = logging.getLogger("roost.engine")
T = TypeVar("T")
# Hot-path statements, built once and run on the session's connection (see state/alloc.py)
_VM_ROW = VM_ROWS.where(VM.name == bindparam("name"))
_VM_ID = select(VM.id).where(VM.name == bindparam("name"))
_ADD_CONFIG = insert(VMConfigVersion)
_ADD_VM = insert(VM)
# UPDATEs setting the columns their parameters name
_SET_VM = update(VM).where(VM.id == bindparam("vm_id"))
_SET_NAMED = update(VM).where(VM.name == bindparam("vm_name"))
_SET_NAMED_RETURNING = _SET_NAMED.returning(*VM.__table__.columns)
_HOLDING = (
    select(VM.id, VM.mac, VM.tap, Network.subnet)
    .outerjoin(IPLease, IPLease.vm_id == VM.id)
    .outerjoin(Network, Network.id == IPLease.network_id)
    .where(VM.name == bindparam("name"))
)
_PLUGIN = (
    select(
        Plugin.id,
        Plugin.manifest,
        PluginArtifact.role,
        PluginArtifact.sha256,
        PluginArtifact.size,
    )
    .outerjoin(PluginArtifact)
    .where(Plugin.name == bindparam("name"))
)

CREATED, STARTING, RUNNING, PAUSED = "created", "starting", "running", "paused"
STOPPING, STOPPED, CRASHED, ERROR = "stopping", "stopped", "crashed", "error"
LIVE = (STARTING, RUNNING, PAUSED, STOPPING)
Emptied = list[tuple[int, str]]  # (network id, bridge) of networks that lost their last lease


@dataclass(frozen=True)
class Booting:
    """What a starting VM holds, as the launch needs it (read once, in the allocating
    transaction; `net` is the plan with the allocated address filled in), and what of its
    launch is already under way: the VMM started early."""

    name: str
    spec: LaunchSpec
    net: NetworkPlan
    artifacts: dict[str, Any]
    vmm: str
    mac: str | None
    tap: str | None
    vsock_missing: str | None
    early: Early | None
    shown: dict[str, Any]  # what of its view cannot change while its VMM runs (see `Live`)


@dataclass(frozen=True)
class Holding:
    """What allocation reads of a VM's record: its id, name, the MAC and tap name it keeps for
    life once it has them, and the subnet it holds an address on."""

    id: int
    name: str
    mac: str | None
    tap: str | None
    subnet: str | None


@dataclass
class Live:
    """A VMM this daemon watches, the driver that runs it, and whether it is paused. `shown`
    holds the columns of the VM's view that come from other tables and cannot change while
    its VMM runs (plugin, CID, config and manifest), so a status change need not read them
    again; None for a VMM adopted after a restart."""

    process: VMMProcess
    driver: Driver
    paused: bool = False
    shown: dict[str, Any] | None = None


class Engine:
    """Owns the database, the host's links and rules, and the VMM processes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default = DefaultNetwork.from_cidr(settings.default_subnet)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        settings.state_dir.chmod(0o700)  # the database and the artifacts are root's business
        self._locks = [
            _lock(
                settings.state_dir / "lock",
                f"another roost daemon is using {settings.state_dir}"
                "; stop it, or give this one its own --state-dir",
                create=True,
            ),
            # the namespace itself (its nsfs file) is the lock: nothing is left behind
            _lock(
                namespace_file(settings.netns),
                f"another roost daemon manages network namespace {settings.netns or 'of the host'}"
                "; one daemon per namespace",
            ),
        ]
        settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = Database(settings.database_url or sqlite_url(settings.state_dir))
        self.db.migrate()
        store = ArtifactStore(settings.state_dir / "artifacts")
        store.remove_incomplete()
        self.store = store
        self.plugins = Plugins(self.db, store, settings.artifact_dirs)
        self.worker = NetnsWorker(settings.netns)
        self.links = Links(self.worker)
        self.firewall = Firewall(self.worker)
        self.observer = LeaseObserver(
            self.worker, self._address_observed, lease_file=settings.dhcp_leases
        )
        self.drivers: dict[str, Driver] = {
            "firecracker": FirecrackerDriver(find_firecracker(settings.firecracker)),
            "qemu": QemuDriver(
                machine=cast(Machine, settings.qemu_machine), accel=cast(Accel, settings.accel)
            ),
        }
        self._check_settings()
        self._live: dict[str, Live] = {}
        self._busy: dict[str, str] = {}
        self._busy_lock = threading.Lock()
        self._vm_locks: dict[str, threading.Lock] = {}
        self._bridge_lock = threading.RLock()  # undoing a failed allocation removes bridges
        self._bridges_ready: set[str] = set()
        # exits wait for their VM's lock: their own pool, so they never hold up a boot's jobs
        self._exits = ThreadPoolExecutor(max_workers=2, thread_name_prefix="roost-exit")
        self.watcher = ExitWatcher(self._on_exit)
        self._ensure_default_network()
        self._recover()

    # ---- set-up and tear-down -------------------------------------------------------------

    def _check_settings(self) -> None:
        dhcp = self.settings.dhcp_bridge
        if dhcp is not None and (dhcp == DEFAULT_BRIDGE or dhcp.startswith(alloc.BRIDGE_PREFIX)):
            raise InvalidError.at(
                "dhcp_bridge",
                f"{dhcp} is a bridge roost manages; name the operator's bridge that has a "
                "DHCP server behind it",
            )
        kernel = self.settings.kernel
        if kernel is not None and not is_elf(kernel):
            raise InvalidError.at(
                "kernel", f"{kernel} is not an uncompressed ELF vmlinux (or is not readable)"
            )
        self._run_dir("x").check_length()

    def _ensure_default_network(self) -> None:
        def work(session: Session) -> None:
            network = session.scalar(select(Network).where(Network.name == DEFAULT_NETWORK))
            subnet = str(self.default.subnet)
            if network is not None and network.subnet != subnet:
                if alloc.network_in_use(session, network):
                    raise InvalidError.at(
                        "default_subnet",
                        f"the default network is {network.subnet} and VMs hold addresses on "
                        f"it; remove them first or keep --default-subnet {network.subnet}",
                    )
                session.delete(network)
                session.flush()
                network = None
            if network is None:
                alloc.ensure_network(
                    session,
                    self.default.subnet,
                    self.default.gateway,
                    name=DEFAULT_NETWORK,
                    bridge=DEFAULT_BRIDGE,
                )

        self.db.transact(work)

    def health(self) -> dict[str, Any]:
        """What `/healthz` reports: `status` is `ok`, `recovering` or `database_gone`."""
        return {"status": "ok"}

    def close(self) -> None:
        """Stop serving; running VMMs keep running (they outlive the daemon)."""
        self.watcher.close()
        self.observer.close()
        self._exits.shutdown(wait=True)
        self.links.close()
        self.worker.close()
        self.db.dispose()
        for handle in self._locks:
            handle.close()

    # ---- per-VM exclusivity ---------------------------------------------------------------

    @contextmanager
    def _operation(self, name: str, what: str, *, wait: bool = False) -> Iterator[None]:
        with self._busy_lock:
            lock = self._vm_locks.setdefault(name, threading.Lock())
        if not lock.acquire(blocking=wait):
            doing = self._busy.get(name, "another operation")
            raise ConflictError(
                f"VM {name!r} is busy ({doing}); try again when it has finished",
                code="vm_busy",
            )
        self._busy[name] = what
        try:
            yield
        finally:
            self._busy.pop(name, None)
            lock.release()

    # ---- reading --------------------------------------------------------------------------

    def list_vms(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            rows = session.connection().execute(VM_ROWS.order_by(VM.name))
            return [self._view(row._mapping) for row in rows]

    def show_vm(self, name: str) -> dict[str, Any]:
        with self.db.read() as session:
            row = session.connection().execute(_VM_ROW, {"name": name}).first()
        if row is None:
            raise _no_vm(name)
        return self._view(row._mapping)

    def _view(self, vm: Mapping[Any, Any]) -> dict[str, Any]:
        driver = self.drivers.get(vm["vmm_kind"])
        run_dir = self._run_dir(vm["name"])
        live = self._live.get(vm["name"])
        return vm_view(
            vm,
            run_dir=run_dir,
            api_socket=driver.api_socket(run_dir) if driver and live else None,
            vsock_path=driver.vsock_path(run_dir) if driver else None,
        )

    def console(self, name: str) -> tuple[Path, bool]:
        """The VM's serial console log and whether its VMM may still write to it."""
        return self._run_dir(name).console_log, self._status(name) in LIVE

    def list_networks(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            networks = session.scalars(select(Network).order_by(Network.id))
            return [
                network_view(
                    n,
                    session.scalars(
                        select(IPLease.ip).where(IPLease.network_id == n.id).order_by(IPLease.ip)
                    ),
                )
                for n in networks
            ]

    def _status(self, name: str) -> str:
        with self.db.read() as session:
            status = session.scalar(select(VM.status).where(VM.name == name))
        if status is None:
            raise _no_vm(name)
        return status

    def _run_dir(self, name: str) -> RunDir:
        return RunDir(self.settings.run_dir / "vms" / name)

    # ---- lifecycle ------------------------------------------------------------------------

    def create_vm(self, name: str, config: VMConfig, *, start: bool = True) -> dict[str, Any]:
        """Record a VM and allocate all its plan needs, then start it unless `start` is false.
        Any failure leaves nothing: no record, lease, tap, run dir or process."""
        check_name(name)
        vmm = self._vmm_of(config)
        with self._operation(name, "create"):
            steps = Steps("create", name)
            host = steps if start else None

            def record(session: Session) -> Booting:
                connection = session.connection()
                if connection.execute(_VM_ID, {"name": name}).first() is not None:
                    raise _vm_exists(name)
                early = self._start_early(host, name, vmm, new=True) if host else None
                plugin_id, manifest_json, artifacts = _plugin(session, config.plugin)
                manifest = Manifest.model_validate(manifest_json)
                plan = plan_vm(name, manifest, config, self.default)
                self._check_launchable(plan, manifest, artifacts, vmm)
                status = STARTING if start else CREATED
                added = connection.execute(
                    _ADD_VM,
                    {
                        "name": name,
                        "plugin_id": plugin_id,
                        "status": status,
                        "vmm_kind": vmm,
                        "network": {},
                    },
                )
                assert added.inserted_primary_key is not None
                vm_id = added.inserted_primary_key[0]
                vm = Holding(id=vm_id, name=name, mac=None, tap=None, subnet=None)
                config_json = config.model_dump(mode="json", exclude_none=True)
                connection.execute(
                    _ADD_CONFIG,
                    {
                        "vm_id": vm.id,
                        "version": 1,
                        "config": config_json,
                        "manifest": manifest_json,
                        "artifacts": artifacts,
                    },
                )
                shown = {"plugin": config.plugin, "config": config_json, "manifest": manifest_json}
                booting, _ = self._allocate(
                    session, vm, status, plan, manifest, config, artifacts, vmm, early, host, shown
                )
                return booting

            booting = self._allocating(record, host)
            if not start:
                log.info("create %s: recorded the VM and its allocations", name)
                return self.show_vm(name)
            try:
                return self._launch(booting, steps)
            except BaseException:
                self._forget(name)
                raise

    def _start_early(self, host: Steps, name: str, vmm: str, *, new: bool) -> Early | None:
        """A fresh run dir, and whatever of the VMM can start before the allocations are
        made (the driver decides); the VMM's start then overlaps the database and the tap.
        Undone: the VMM killed, then the run dir removed (a `new` VM's) or its sockets."""
        driver = self.drivers[vmm]
        run_dir = self._run_dir(name)
        tidy = run_dir.remove if new else run_dir.remove_sockets
        run_dir.prepare()
        try:
            early = driver.start_early(name, run_dir, self.worker)
        except BaseException:
            tidy()
            raise
        what = "prepared the run dir" if early is None else "started the VMM early"
        host.done(what, lambda: self._discard_early(early, tidy))
        return early

    def _discard_early(self, early: Early | None, tidy: Callable[[], object]) -> None:
        """Undo `_start_early` for a launch that will not happen."""
        if early is not None:
            with suppress(Exception):
                early.result().kill()
        tidy()

    def start_vm(self, name: str) -> dict[str, Any]:
        with self._operation(name, "start"):
            if name in self._live:
                return self._pause_or_resume(name, pause=False)
            return self._start(name, "start")

    def stop_vm(
        self, name: str, *, timeout: float | None = None, force: bool = False
    ) -> dict[str, Any]:
        with self._operation(name, "stop"):
            self._stop(name, timeout, force)
            return self.show_vm(name)

    def restart_vm(self, name: str) -> dict[str, Any]:
        with self._operation(name, "restart"):
            self._stop(name, None, False)
            return self._start(name, "restart")

    def pause_vm(self, name: str) -> dict[str, Any]:
        with self._operation(name, "pause"):
            return self._pause_or_resume(name, pause=True)

    def resume_vm(self, name: str) -> dict[str, Any]:
        with self._operation(name, "resume"):
            return self._pause_or_resume(name, pause=False)

    def destroy_vm(self, name: str) -> None:
        """Stop the VM if it runs, then remove it and everything it holds."""
        with self._operation(name, "remove"):
            self._stop(name, None, False)
            self._forget(name)

    # ---- lifecycle internals --------------------------------------------------------------

    def _vmm_of(self, config: VMConfig) -> str:
        return config.vmm.value if config.vmm is not None else self.settings.vmm

    def _check_launchable(
        self, plan: VMPlan, manifest: Manifest, artifacts: dict[str, Any], vmm: str
    ) -> None:
        """Everything that would make a start fail for a reason the user can fix, checked
        before anything is allocated."""
        self._run_dir(plan.name).check_length()
        if plan.net.attach is Attachment.EXTERNAL and self.settings.dhcp_bridge is None:
            raise InvalidError.at(
                "network.mode",
                "dhcp VMs need a bridge with a DHCP server behind it, and this daemon has none: "
                "restart it with --dhcp-bridge NAME, or choose vsock or bridged",
            )
        if "kernel" not in artifacts and self.settings.kernel is None:
            raise InvalidError.at(
                "kernel",
                f"plugin {manifest.name} names no kernel and the daemon has no default; "
                "add a kernel to the manifest or start the daemon with --kernel PATH",
            )
        self.drivers[vmm].check_available()

    def _allocating(self, work: Callable[[Session], T], host: Steps | None) -> T:
        """Run allocating transaction `work`. With `host` (a launch follows), `work` also
        makes the VM's tap and rules, recorded in `host`; the bridge lock is then held until it
        has committed, so no bridge is removed for lack of a lease that is not visible yet.
        Host work of a failed attempt is undone."""
        if host is None:
            return self.db.transact(work)

        def attempt(session: Session) -> T:
            host.rollback()  # what an earlier attempt made, had its commit failed
            return work(session)

        with self._bridge_lock:
            try:
                return self.db.transact(attempt)
            except BaseException:
                host.rollback()
                raise

    def _allocate(
        self,
        session: Session,
        vm: Holding,
        status: str,
        plan: VMPlan,
        manifest: Manifest,
        config: VMConfig,
        artifacts: dict[str, Any],
        vmm: str,
        early: Early | None,
        host: Steps | None,
        shown: dict[str, Any],
    ) -> tuple[Booting, Emptied]:
        """Make the VM hold what its plan needs, and nothing else: address (bridged), CID,
        MAC and tap name; record them, the resolved network and `status`. Also says which
        networks it left. With `host` (a launch follows), the tap and its rules are made too,
        their undoing recorded in `host`."""
        emptied: Emptied = []
        effective = plan.network
        bridge: str | None = None
        network: alloc.NetworkRow | None = None
        held_on = vm.subnet
        if held_on is not None and (plan.net.ipam is IPAM.NONE or held_on != str(effective.subnet)):
            emptied += self._release_ip(session, vm)
        if plan.net.ipam is not IPAM.NONE:
            assert effective.subnet is not None and effective.gateway is not None
            network = alloc.ensure_network(session, effective.subnet, effective.gateway)
            bridge = network.bridge
        elif plan.net.attach is Attachment.EXTERNAL:
            bridge = self.settings.dhcp_bridge
        mac, tap = vm.mac, vm.tap  # both kept for the VM's life once it has them
        if plan.net.nic and mac is None:
            mac = alloc.new_mac(session)
        if plan.net.tap and tap is None:
            tap = alloc.tap_name(vm)
        if network is not None:
            requested = effective.ip if plan.net.ipam is IPAM.MANUAL else None
            effective = effective.with_ip(alloc.allocate_ip(session, network, vm.id, requested))
        net = plan_network(effective, vm.name)
        if host is not None and net.tap:
            assert tap is not None and mac is not None and bridge is not None
            network_id = network.id if network is not None else None
            self._add_tap(host, tap, mac, bridge, network_id, net.attach, effective)
            if net.antispoof is not AntiSpoof.NONE:
                ip = str(effective.ip) if net.antispoof is AntiSpoof.IP_AND_MAC else None
                self.firewall.protect(tap, mac, ip)
                host.done("added anti-spoofing rules", lambda: self.firewall.release(tap))
        cid = alloc.allocate_cid(session, vm)
        vsock_missing = self.drivers[vmm].vsock_unavailable() if net.vsock else None
        session.connection().execute(
            _SET_VM,
            {
                "vm_id": vm.id,
                "status": status,
                "mac": mac,
                "tap": tap,
                "network": {
                    "effective": effective.to_json(),
                    "plan": net.to_json(),
                    "bridge": bridge,
                },
                "vmm_kind": vmm,
                "vsock_unavailable": vsock_missing,
                "observed_ip": None,
                "status_reason": None,
                "exit_code": None,
            },
        )
        run_dir = self._run_dir(vm.name)
        kernel = self._artifact_path(artifacts, "kernel") or self.settings.kernel
        assert kernel is not None
        with_vsock = net.vsock and vsock_missing is None
        spec = LaunchSpec(
            name=vm.name,
            run_dir=run_dir,
            kernel=kernel,
            initrd=self._artifact_path(artifacts, "initramfs"),
            rootfs=self._disk_path(vm.name) if "rootfs" in artifacts else None,
            boot_args=boot_args(manifest, config, vm.name, net.kernel_ip_arg),
            vcpus=plan.resources.vcpus,
            memory_mib=plan.resources.memory_mib,
            nic=NIC(tap=tap, mac=mac) if net.tap and tap and mac else None,
            vsock=Vsock(cid, run_dir.vsock_socket) if with_vsock else None,
        )
        booting = Booting(
            name=vm.name,
            spec=spec,
            net=net,
            artifacts=artifacts,
            vmm=vmm,
            mac=mac if net.nic else None,
            tap=tap if net.tap else None,
            vsock_missing=vsock_missing,
            early=early,
            shown={**shown, "cid": cid},
        )
        return booting, emptied

    def _add_tap(
        self,
        host: Steps,
        tap: str,
        mac: str,
        bridge: str,
        network_id: int | None,
        attach: Attachment,
        effective: EffectiveNetwork,
    ) -> None:
        """Make the tap; undone: the tap removed, then its bridge unless a lease keeps it
        (making the tap may have set the bridge up; roost's own bridges only)."""
        self._make_tap(tap, mac, bridge, attach, effective)

        def drop() -> None:
            self.links.delete(tap)
            if network_id is not None:
                self._remove_bridges([(network_id, bridge)])

        host.done(f"created tap {tap} on {bridge}", drop)

    def _make_tap(
        self, tap: str, mac: str, bridge: str, attach: Attachment, effective: EffectiveNetwork
    ) -> None:
        """A fresh tap on `bridge`, setting the bridge up first unless this daemon already
        did (and again if it has vanished since). Runs while its allocating transaction holds
        the bridge lock."""
        if bridge not in self._bridges_ready:
            self._ensure_bridge(bridge, attach, effective)
            self._bridges_ready.add(bridge)
        try:
            self.links.create_tap(tap, bridge, alloc.tap_mac(mac))
        except HostError:
            self._bridges_ready.discard(bridge)
            self._ensure_bridge(bridge, attach, effective)
            self.links.create_tap(tap, bridge, alloc.tap_mac(mac))
            self._bridges_ready.add(bridge)

    def _ensure_bridge(self, bridge: str, attach: Attachment, effective: EffectiveNetwork) -> None:
        if attach is Attachment.EXTERNAL:
            info = self.links.info(bridge)
            if info is None or info.kind != "bridge":
                raise HostError(
                    f"the dhcp bridge {bridge} does not exist (or is not a bridge) in the "
                    "daemon's namespace; create it and connect it to a network with a DHCP server"
                )
            return
        assert effective.subnet is not None and effective.gateway is not None
        address = ipaddress.IPv4Interface(f"{effective.gateway}/{effective.subnet.prefixlen}")
        self.links.ensure_bridge(bridge, address)

    def _release_ip(self, session: Session, vm: alloc.Holder) -> Emptied:
        network = alloc.release_ip(session, vm)
        if network is None:
            return []
        emptied = [(network.id, network.bridge)]
        if network.name != DEFAULT_NETWORK:
            session.delete(network)
        return emptied

    def _remove_bridges(self, emptied: Emptied) -> None:
        """Remove the bridges of networks that lost their last lease (unless a VM took an
        address there meanwhile)."""
        for network_id, bridge in emptied:
            with self._bridge_lock:
                with self.db.read() as session:
                    leased = session.scalar(
                        select(IPLease.ip).where(IPLease.network_id == network_id).limit(1)
                    )
                if leased is None:
                    self._bridges_ready.discard(bridge)
                    self.links.delete(bridge)

    def _start(self, name: str, operation: str) -> dict[str, Any]:
        """Plan again from the VM's current config, allocate what the plan needs (releasing
        what it no longer needs), then launch."""
        with self.db.read() as session:
            current = session.scalar(
                select(VMConfigVersion)
                .join(
                    VM,
                    and_(
                        VM.id == VMConfigVersion.vm_id, VM.config_version == VMConfigVersion.version
                    ),
                )
                .where(VM.name == name)
            )
            if current is None:
                raise _no_vm(name)
            manifest = Manifest.model_validate(current.manifest)
            config = VMConfig.model_validate(current.config)
            artifacts = current.artifacts
            shown = {
                "plugin": config.plugin,
                "config": current.config,
                "manifest": current.manifest,
            }
        vmm = self._vmm_of(config)
        plan = plan_vm(name, manifest, config, self.default)
        self._check_launchable(plan, manifest, artifacts, vmm)
        steps = Steps(operation, name)

        def allocate(session: Session) -> tuple[Booting, Emptied]:
            row = session.connection().execute(_HOLDING, {"name": name}).first()
            if row is None:
                raise _no_vm(name)
            early = self._start_early(steps, name, vmm, new=False)
            vm = Holding(id=row.id, name=name, mac=row.mac, tap=row.tap, subnet=row.subnet)
            return self._allocate(
                session, vm, STARTING, plan, manifest, config, artifacts, vmm, early, steps, shown
            )

        booting, emptied = self._allocating(allocate, steps)
        self._remove_bridges(emptied)
        return self._launch(booting, steps)

    def _launch(self, booting: Booting, steps: Steps) -> dict[str, Any]:
        """Set up the host and boot the VMM; the VM as it then is. A failure leaves the VM
        `error` with its reason, its tap and process gone, its leases kept."""
        try:
            return self._boot(booting, steps)
        except BaseException as error:
            reason = error.message if isinstance(error, RoostError) else repr(error)
            steps.rollback()
            self._set(
                booting.name, status=ERROR, status_reason=reason, pid=None, supervisor_pid=None
            )
            raise

    def _boot(self, booting: Booting, steps: Steps) -> dict[str, Any]:
        name, net = booting.name, booting.net
        if booting.vsock_missing:
            log.warning("VM %s starts without a vsock device: %s", name, booting.vsock_missing)
        driver = self.drivers[booting.vmm]
        # logged before the boot: the moments after it are the busiest of all
        if booting.early is not None:
            pid = booting.early.result().pid
            log.info("%s %s: booting %s (pid %d)", steps.operation, name, booting.vmm, pid)
        else:
            log.info("%s %s: booting %s", steps.operation, name, booting.vmm)
        recorded: list[Mapping[Any, Any]] = []

        def record_running(process: VMMProcess) -> None:
            """While the VMM boots the guest (Firecracker: InstanceStart sent, its answer not
            yet in), so the write overlaps the VMM's work instead of following it. A boot that
            fails after this is recorded as `error` by `_launch`."""
            recorded.append(
                self._write(
                    name,
                    booting.shown,
                    status=RUNNING,
                    pid=process.pid,
                    supervisor_pid=process.supervisor_pid,
                )
            )

        process = driver.launch(
            booting.spec,
            self.worker,
            # the VM's own disk, made once its record exists, before the VMM is handed it
            host_ready=lambda: self._make_disk(name, booting.artifacts),
            early=booting.early,
            while_booting=record_running,
        )
        self._live[name] = Live(process, driver, shown=booting.shown)
        steps.done(f"started {booting.vmm}", lambda: self._untrack(name, process))
        self.watcher.watch(name, process)
        if net.observe_ip and booting.tap is not None:
            assert booting.mac is not None
            self.observer.watch(name, booting.tap, booting.mac)
        [row] = recorded  # drivers call `while_booting` once for every boot they complete
        return self._view(row)

    def _untrack(self, name: str, process: VMMProcess) -> None:
        """Undo a launch: no longer track the VMM, and end it."""
        self._live.pop(name, None)
        process.kill()

    def _artifact_path(self, artifacts: dict[str, Any], role: str) -> Path | None:
        item = artifacts.get(role)
        return None if item is None else self.store.path(item["sha256"])

    def _disk_path(self, name: str) -> Path:
        return self.settings.state_dir / "disks" / f"{name}.img"

    def _make_disk(self, name: str, artifacts: dict[str, Any]) -> None:
        """The VM's own copy of its plugin's rootfs (if it has one), made at its first boot
        and kept for its life: guests write to their disks, and the stored artifact is shared
        and must not change."""
        source = self._artifact_path(artifacts, "rootfs")
        if source is None:
            return
        disk = self._disk_path(name)
        if not disk.exists():
            disk.parent.mkdir(mode=0o700, exist_ok=True)
            partial = disk.with_suffix(".partial")
            try:
                _copy_file(source, partial)
                partial.chmod(0o600)
                partial.rename(disk)
            except OSError as error:
                partial.unlink(missing_ok=True)
                raise HostError(f"cannot make the disk of VM {name}: {error}") from None

    def _pause_or_resume(self, name: str, *, pause: bool) -> dict[str, Any]:
        """Pause or resume a VM whose VMM runs (the VMMs this daemon watches are exactly the
        running and paused VMs); asking for the state it is in changes nothing."""
        live = self._live.get(name)
        if live is None:
            what = "pause" if pause else "resume"
            status = self._status(name)
            raise ConflictError(f"cannot {what} VM {name!r}: it is {status}; start it first")
        if live.paused == pause:
            return self.show_vm(name)
        before, after = (RUNNING, PAUSED) if pause else (PAUSED, RUNNING)
        written: list[Mapping[Any, Any]] = []

        def record() -> None:  # while the VMM pauses or resumes the guest
            written.append(self._write(name, live.shown, status=after))

        change = live.driver.pause if pause else live.driver.resume
        try:
            change(live.process, record)
        except BaseException:
            if written:  # recorded, then the VMM refused: the record goes back
                self._write(name, live.shown, status=before)
            raise
        live.paused = pause
        [row] = written  # drivers call `meanwhile` once for every change they complete
        return self._view(row)

    def _stop(self, name: str, timeout: float | None, force: bool) -> None:
        live = self._live.get(name)
        if live is None:
            self._status(name)  # a VM that does not exist is an error, a stopped one is not
            return
        self._set(name, status=STOPPING)
        self.watcher.forget(live.process)
        if live.paused and not force:
            # a paused guest cannot act on a graceful shutdown request: let it run to do so
            try:
                live.driver.resume(live.process)
            except RoostError as error:
                log.warning("VM %s: could not resume it to stop it gracefully: %s", name, error)
        wait = self.settings.stop_timeout if timeout is None else timeout
        code = live.driver.stop(live.process, wait, force)
        self._live.pop(name, None)
        self._release_host(name)
        self._set(name, status=STOPPED, exit_code=code, pid=None, supervisor_pid=None)

    def _release_host(self, name: str) -> None:
        """Remove what only exists while the VMM runs: its tap, its rules and its sockets."""
        self.observer.forget(name)
        with self.db.read() as session:
            tap = session.scalar(select(VM.tap).where(VM.name == name))
        if tap is not None:
            self.firewall.release(tap)
            self.links.delete(tap)
        self._run_dir(name).remove_sockets()

    def _on_exit(self, name: str, process: VMMProcess) -> None:
        self._exits.submit(self._vmm_exited, name, process)

    def _vmm_exited(self, name: str, process: VMMProcess) -> None:
        """A VMM ended without being asked: the VM is `stopped` (exit 0) or `crashed`."""
        with self._operation(name, "exit", wait=True):
            live = self._live.get(name)
            if live is None or live.process is not process:
                return
            process.wait(5)
            code = process.exit_code()
            self._live.pop(name, None)
            self._release_host(name)
            status = STOPPED if code == 0 else CRASHED
            self._set(
                name,
                status=status,
                status_reason=None if code == 0 else _exit_reason(code),
                exit_code=code,
                pid=None,
                supervisor_pid=None,
            )
            log.info("VM %s: VMM exited on its own with %s -> %s", name, code, status)

    def _address_observed(self, name: str, ip: str) -> None:
        """The address a dhcp guest leased, as the host saw it (tap traffic or lease file)."""

        def work(session: Session) -> None:
            vm = session.scalar(select(VM).where(VM.name == name))
            if vm is not None and vm.status in LIVE:
                vm.observed_ip = ip

        self.db.transact(work)
        log.info("VM %s: observed address %s", name, ip)

    def _forget(self, name: str) -> None:
        """Remove the VM's record, leases, run dir and any empty network."""

        def work(session: Session) -> Emptied:
            vm = session.scalar(select(VM).where(VM.name == name))
            if vm is None:
                return []
            emptied = self._release_ip(session, vm)
            session.delete(vm)
            return emptied

        self._release_host(name)
        emptied = self.db.transact(work)
        self._remove_bridges(emptied)
        self._run_dir(name).remove()
        self._disk_path(name).unlink(missing_ok=True)
        self.plugins.collect_garbage()

    def _set(self, name: str, **values: Any) -> dict[str, Any]:
        """Update the VM's record and return its view."""
        live = self._live.get(name)
        return self._view(self._write(name, live.shown if live is not None else None, **values))

    def _write(self, name: str, shown: dict[str, Any] | None, **values: Any) -> Mapping[Any, Any]:
        """Update the VM's record in one transaction and return its row for the view (Core
        statements: the ORM would cost several times the queries). With `shown` — what a
        running VM's view takes from other tables, which cannot change while it runs — that is
        one statement."""

        def work(connection: Connection) -> Mapping[Any, Any]:
            parameters = {"vm_name": name, **values}
            if shown is not None:
                updated = connection.execute(_SET_NAMED_RETURNING, parameters).first()
                if updated is None:
                    raise _no_vm(name)
                return {**updated._mapping, **shown}
            connection.execute(_SET_NAMED, parameters)
            row = connection.execute(_VM_ROW, {"name": name}).first()
            if row is None:
                raise _no_vm(name)
            return row._mapping

        return self.db.transact_core(work)

    # ---- recovery after a daemon restart --------------------------------------------------

    def _recover(self) -> None:
        """Bring the records and the host in line after a restart or a crash: adopt the VMMs
        still running, settle the ones that ended, end the VMMs nothing accounts for, and
        remove taps, bridges and run dirs that belong to no VM."""
        with self.db.read() as session:
            records = session.execute(
                select(VM.name, VM.status, VM.pid, VM.supervisor_pid, VM.vmm_kind, VM.network)
            ).all()
        for record in records:
            if record.status in LIVE:
                self._recover_vm(record)
        self._end_strays({record.name for record in records})
        self._reap_links()

    def _recover_vm(self, record: Row[Any]) -> None:
        name, status = record.name, record.status
        run_dir = self._run_dir(name)
        pid = record.pid or recorded_pid(run_dir.path)  # a crash while starting leaves only this
        process = VMMProcess(run_dir.path, pid, record.supervisor_pid or pid) if pid else None
        if process is not None and not process.exited() and _is_our_vmm(process.pid, run_dir):
            if status in (STARTING, STOPPING):
                code = process.kill()
                interrupted = f"the daemon stopped while the VM was {status}"
                self._settle(name, STOPPED if status == STOPPING else ERROR, code, interrupted)
                return
            self._live[name] = Live(process, self.drivers[record.vmm_kind], status == PAUSED)
            self.watcher.watch(name, process)
            self._observe_again(name, record.network)
            log.info("VM %s: adopted its running VMM (pid %d)", name, process.pid)
            return
        code = process.exit_code() if process is not None else None
        self._settle(
            name, STOPPED if code == 0 else CRASHED, code, None if code == 0 else _exit_reason(code)
        )

    def _observe_again(self, name: str, network: dict[str, Any]) -> None:
        """An adopted VM whose address the host learns by watching keeps being watched."""
        if not network.get("plan", {}).get("observe_ip"):
            return
        with self.db.read() as session:
            tap, mac = session.execute(select(VM.tap, VM.mac).where(VM.name == name)).one()
        if tap is not None and mac is not None:
            self.observer.watch(name, tap, mac)

    def _end_strays(self, names: set[str]) -> None:
        """Run dirs of no VM (a create the daemon died in): end their VMM, remove them."""
        vms = self.settings.run_dir / "vms"
        for path in sorted(vms.iterdir()) if vms.is_dir() else []:
            if path.name in names:
                continue
            run_dir = RunDir(path)
            pid = recorded_pid(run_dir.path)
            if pid is not None and _is_our_vmm(pid, run_dir):
                VMMProcess(path, pid, pid).kill()
                log.info("ended VMM %d of %s, which no VM accounts for", pid, path)
            run_dir.remove()

    def _reap_links(self) -> None:
        """Taps of no running VM, and managed bridges no VM holds an address on."""
        with self.db.read() as session:
            live_taps = set(session.scalars(select(VM.tap).where(VM.name.in_(list(self._live)))))
            used = set(session.scalars(select(Network.bridge).join(IPLease).distinct()))
        for tap in self.links.names(alloc.TAP_PREFIX):
            if tap not in live_taps:
                self.firewall.release(tap)
                self.links.delete(tap)
                log.info("removed tap %s, which no running VM uses", tap)
        for bridge in [*self.links.names(alloc.BRIDGE_PREFIX), *self.links.names(DEFAULT_BRIDGE)]:
            if bridge not in used:
                self.links.delete(bridge)
                log.info("removed bridge %s, on which no VM holds an address", bridge)

    def _settle(self, name: str, status: str, code: int | None, reason: str | None) -> None:
        self._release_host(name)
        self._set(
            name, status=status, exit_code=code, status_reason=reason, pid=None, supervisor_pid=None
        )
        log.info("VM %s: found %s (exit code %s)", name, status, code)


# ---- helpers -------------------------------------------------------------------------------


def _lock(path: Path, message: str, *, create: bool = False) -> IO[bytes]:
    """An exclusive lock on `path` held for the daemon's life (the kernel releases it if the
    daemon dies)."""
    try:
        handle = path.open("ab" if create else "rb")
    except OSError as error:
        raise HostError(f"cannot open {path} to lock it: {error.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConflictError(message, code="locked") from None
    return handle


def _copy_file(source: Path, target: Path) -> None:
    """Copy in the kernel (a reflink where the filesystem can, so a big disk costs nothing)."""
    with source.open("rb") as reader, target.open("wb") as writer:
        remaining = os.fstat(reader.fileno()).st_size
        while remaining > 0:
            copied = os.copy_file_range(reader.fileno(), writer.fileno(), remaining)
            if copied == 0:
                raise OSError(f"{source} ended early")
            remaining -= copied


def _is_our_vmm(pid: int, run_dir: RunDir) -> bool:
    """Guard against PID reuse: the process must name this VM's run dir on its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return f"{run_dir.path}/".encode() in cmdline


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "the VMM ended and its exit status is unknown"
    if code < 0:
        return f"the VMM was killed by signal {-code}"
    return f"the VMM exited with code {code}"


def _plugin(session: Session, name: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """The installed plugin's id, manifest and artifacts, in one Core query (`find` says when
    it is not installed)."""
    rows = session.connection().execute(_PLUGIN, {"name": name}).all()
    if not rows:
        find(session, name)  # raises: it is not installed
    artifacts = {r.role: {"sha256": r.sha256, "size": r.size} for r in rows if r.role is not None}
    return rows[0].id, rows[0].manifest, artifacts


def _no_vm(name: str) -> NotFoundError:
    return NotFoundError(f"VM {name!r} does not exist (roost vm list shows those that do)")


def _vm_exists(name: str) -> ConflictError:
    return ConflictError(f"VM {name!r} already exists; choose another name", code="exists")
