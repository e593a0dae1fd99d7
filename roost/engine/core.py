"""The engine: VM lifecycle as plan → act, with every step recorded and undone on failure.

Locking: one operation at a time per VM (a second gets `vm_busy`); bridge set-up and removal
share one lock so a bridge is never removed under a tap that is being attached to it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from sqlalchemy import Row, and_, select, update
from sqlalchemy.orm import Session

from roost.engine.plugins import Plugins, find
from roost.engine.settings import DEFAULT_BRIDGE, DEFAULT_NETWORK, Settings
from roost.engine.steps import Steps
from roost.engine.views import network_view, vm_view
from roost.errors import ConflictError, HostError, InvalidError, NotFoundError, RoostError
from roost.host.firewall import Firewall
from roost.host.links import Links
from roost.host.netns import NetnsWorker
from roost.host.observe import LeaseObserver
from roost.plan import IPAM, AntiSpoof, Attachment, DefaultNetwork, VMPlan, boot_args, plan_vm
from roost.plan.network import NetworkPlan, plan_network
from roost.spec import Manifest, VMConfig
from roost.spec.common import check_name
from roost.state import alloc
from roost.state.artifacts import ArtifactStore
from roost.state.db import Database, sqlite_url
from roost.state.models import VM, CIDLease, IPLease, Network, Plugin, VMConfigVersion
from roost.vmm.base import NIC, Driver, LaunchSpec, RunDir, Vsock
from roost.vmm.firecracker import FirecrackerDriver, find_firecracker
from roost.vmm.process import ExitWatcher, VMMProcess
from roost.vmm.qemu import Accel, Machine, QemuDriver

log = logging.getLogger("roost.engine")

CREATED, STARTING, RUNNING, PAUSED = "created", "starting", "running", "paused"
STOPPING, STOPPED, CRASHED, ERROR = "stopping", "stopped", "crashed", "error"
LIVE = (STARTING, RUNNING, PAUSED, STOPPING)
LOCK_DIR = Path("/run/lock")
Emptied = list[tuple[int, str]]  # (network id, bridge) of networks that lost their last lease


class LockedError(RoostError):
    code = "locked"
    http_status = 409
    exit_code = 4


@dataclass(frozen=True)
class Booting:
    """What a starting VM holds, as the launch needs it (read once, in the allocating
    transaction)."""

    name: str
    plan: VMPlan
    net: NetworkPlan
    manifest: Manifest
    config: VMConfig
    artifacts: dict[str, Any]
    vmm: str
    cid: int
    mac: str | None
    tap: str | None
    bridge: str | None
    ip: str | None
    vsock_missing: str | None


@dataclass
class Live:
    """A VMM this daemon watches, the driver that runs it, and whether it is paused."""

    process: VMMProcess
    driver: Driver
    paused: bool = False


class Engine:
    """Owns the database, the host's links and rules, and the VMM processes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default = DefaultNetwork.from_cidr(settings.default_subnet)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._locks = [
            _lock(
                settings.state_dir / "lock",
                f"another roost daemon is using {settings.state_dir}"
                "; stop it, or give this one its own --state-dir",
            ),
            _lock(
                LOCK_DIR / f"roost-netns-{settings.netns or '-host-'}.lock",
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
        self.plugins = Plugins(self.db, store)
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
        self._bridge_lock = threading.Lock()
        self._bridges_ready: set[str] = set()
        self._background = ThreadPoolExecutor(max_workers=4, thread_name_prefix="roost-bg")
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
        if kernel is not None and not _is_elf(kernel):
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

    def close(self) -> None:
        """Stop serving; running VMMs keep running (they outlive the daemon)."""
        self.watcher.close()
        self.observer.close()
        self._background.shutdown(wait=True)
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
            return [self._view(row) for row in session.execute(_view_query().order_by(VM.name))]

    def show_vm(self, name: str) -> dict[str, Any]:
        with self.db.read() as session:
            row = session.execute(_view_query().where(VM.name == name)).first()
        if row is None:
            raise _no_vm(name)
        return self._view(row)

    def _view(self, row: Row[Any]) -> dict[str, Any]:
        vm: VM = row.VM
        driver = self.drivers.get(vm.vmm_kind)
        run_dir = self._run_dir(vm.name)
        live = self._live.get(vm.name)
        return vm_view(
            vm,
            plugin=row.plugin,
            cid=row.cid,
            config=row.config,
            manifest=row.manifest,
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
            with self.db.read() as session:
                if session.scalar(select(VM.id).where(VM.name == name)) is not None:
                    raise _vm_exists(name)
            early = self._start_early(name, vmm) if start else None

            def record(session: Session) -> Booting:
                if session.scalar(select(VM.id).where(VM.name == name)) is not None:
                    raise _vm_exists(name)
                plugin = find(session, config.plugin)
                artifacts = {a.role: {"sha256": a.sha256, "size": a.size} for a in plugin.artifacts}
                manifest = Manifest.model_validate(plugin.manifest)
                plan = plan_vm(name, manifest, config, self.default)
                self._check_launchable(plan, manifest, artifacts, vmm)
                vm = VM(
                    name=name,
                    plugin_id=plugin.id,
                    status=STARTING if start else CREATED,
                    vmm_kind=vmm,
                    network={},
                )
                session.add(vm)
                session.flush()
                session.add(
                    VMConfigVersion(
                        vm_id=vm.id,
                        version=1,
                        config=config.model_dump(mode="json", exclude_none=True),
                        manifest=plugin.manifest,
                        artifacts=artifacts,
                    )
                )
                booting, _ = self._allocate(session, vm, plan, manifest, config, artifacts, vmm)
                return booting

            try:
                booting = self.db.transact(record)
            except BaseException:
                self._discard_early(name, early)
                self._run_dir(name).remove()
                raise
            log.info("create %s: recorded the VM and its allocations", name)
            if not start:
                return self.show_vm(name)
            try:
                return self._launch(booting, Steps("create", name), early)
            except BaseException:
                self._forget(name)
                raise

    def _start_early(self, name: str, vmm: str) -> Future[VMMProcess] | None:
        """A fresh run dir, and whatever of the VMM can start before the allocations are
        made (the driver decides); the VMM's start then overlaps the database and the tap."""
        driver = self.drivers[vmm]
        driver.check_available()
        run_dir = self._run_dir(name)
        run_dir.prepare()
        return driver.start_early(name, run_dir, self.worker)

    def _discard_early(self, name: str, early: Future[VMMProcess] | None) -> None:
        """Undo `_start_early` for a launch that will not happen."""
        if early is not None:
            with suppress(Exception):
                early.result().kill()
        self._run_dir(name).remove_sockets()

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

    def _allocate(
        self,
        session: Session,
        vm: VM,
        plan: VMPlan,
        manifest: Manifest,
        config: VMConfig,
        artifacts: dict[str, Any],
        vmm: str,
    ) -> tuple[Booting, Emptied]:
        """Make the VM hold what its plan needs, and nothing else: address (bridged), CID,
        MAC and tap name; record the resolved network. Also says which networks it left."""
        emptied: Emptied = []
        effective = plan.network
        bridge: str | None = None
        held_on = session.scalar(select(Network.subnet).join(IPLease).where(IPLease.vm_id == vm.id))
        if held_on is not None and (plan.net.ipam is IPAM.NONE or held_on != str(effective.subnet)):
            emptied += self._release_ip(session, vm)
        if plan.net.ipam is not IPAM.NONE:
            assert effective.subnet is not None and effective.gateway is not None
            network = alloc.ensure_network(session, effective.subnet, effective.gateway)
            requested = effective.ip if plan.net.ipam is IPAM.MANUAL else None
            effective = effective.with_ip(alloc.allocate_ip(session, network, vm.id, requested))
            bridge = network.bridge
        elif plan.net.attach is Attachment.EXTERNAL:
            bridge = self.settings.dhcp_bridge
        cid = alloc.allocate_cid(session, vm)
        if plan.net.nic and vm.mac is None:
            vm.mac = alloc.new_mac(session)
        if plan.net.tap and vm.tap is None:
            vm.tap = alloc.tap_name(vm)
        net = plan_network(effective, vm.name)
        vm.network = {"effective": effective.to_json(), "plan": net.to_json(), "bridge": bridge}
        vsock_missing = self.drivers[vmm].vsock_unavailable() if net.vsock else None
        vm.vmm_kind, vm.vsock_unavailable, vm.observed_ip = vmm, vsock_missing, None
        vm.status_reason, vm.exit_code = None, None
        booting = Booting(
            name=vm.name,
            plan=plan,
            net=net,
            manifest=manifest,
            config=config,
            artifacts=artifacts,
            vmm=vmm,
            cid=cid,
            mac=vm.mac if net.nic else None,
            tap=vm.tap if net.tap else None,
            bridge=bridge,
            ip=None if effective.ip is None else str(effective.ip),
            vsock_missing=vsock_missing,
        )
        return booting, emptied

    def _release_ip(self, session: Session, vm: VM) -> Emptied:
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
        vmm = self._vmm_of(config)
        plan = plan_vm(name, manifest, config, self.default)
        self._check_launchable(plan, manifest, artifacts, vmm)
        early = self._start_early(name, vmm)

        def allocate(session: Session) -> tuple[Booting, Emptied]:
            vm = session.scalar(select(VM).where(VM.name == name))
            if vm is None:
                raise _no_vm(name)
            booting, emptied = self._allocate(session, vm, plan, manifest, config, artifacts, vmm)
            vm.status = STARTING
            return booting, emptied

        try:
            booting, emptied = self.db.transact(allocate)
        except BaseException:
            self._discard_early(name, early)
            raise
        self._remove_bridges(emptied)
        return self._launch(booting, Steps(operation, name), early)

    def _launch(
        self, booting: Booting, steps: Steps, early: Future[VMMProcess] | None
    ) -> dict[str, Any]:
        """Set up the host and boot the VMM; the VM as it then is. A failure leaves the VM
        `error` with its reason, its tap and process gone, its leases kept."""
        steps.done("started the VMM early", lambda: self._discard_early(booting.name, early))
        try:
            return self._boot(booting, steps, early)
        except BaseException as error:
            reason = error.message if isinstance(error, RoostError) else repr(error)
            steps.rollback()
            self._set(
                booting.name, status=ERROR, status_reason=reason, pid=None, supervisor_pid=None
            )
            raise

    def _boot(
        self, booting: Booting, steps: Steps, early: Future[VMMProcess] | None
    ) -> dict[str, Any]:
        name, net = booting.name, booting.net
        if booting.vsock_missing:
            log.warning("VM %s starts without a vsock device: %s", name, booting.vsock_missing)
        run_dir = self._run_dir(name)

        nic = None
        rules: Future[None] | None = None
        if net.tap:
            tap, mac, bridge = booting.tap, booting.mac, booting.bridge
            assert tap is not None and mac is not None and bridge is not None
            if net.antispoof is not AntiSpoof.NONE:
                ip = booting.ip if net.antispoof is AntiSpoof.IP_AND_MAC else None
                # nft runs while the tap is made and the VMM starts; the guest boots only
                # once the rules are in (the driver's before_boot)
                rules = self._background.submit(self.firewall.protect, tap, mac, ip)
                steps.done("adding anti-spoofing rules", lambda: self._unprotect(tap, rules))
            self._attach_tap(tap, mac, bridge, net.attach, booting)
            steps.done(f"created tap {tap} on {bridge}", lambda: self.links.delete(tap))
            nic = NIC(tap=tap, mac=mac)

        kernel = self._artifact_path(booting.artifacts, "kernel") or self.settings.kernel
        assert kernel is not None
        with_vsock = booting.vsock_missing is None and net.vsock
        spec = LaunchSpec(
            name=name,
            run_dir=run_dir,
            kernel=kernel,
            initrd=self._artifact_path(booting.artifacts, "initramfs"),
            rootfs=self._artifact_path(booting.artifacts, "rootfs"),
            boot_args=boot_args(booting.manifest, booting.config, name, net.kernel_ip_arg),
            vcpus=booting.plan.resources.vcpus,
            memory_mib=booting.plan.resources.memory_mib,
            nic=nic,
            vsock=Vsock(booting.cid, run_dir.vsock_socket) if with_vsock else None,
        )
        driver = self.drivers[booting.vmm]
        gate = rules.result if rules is not None else None
        process = driver.launch(spec, self.worker, before_boot=gate, early=early)
        steps.done(f"started {booting.vmm} (pid {process.pid})", process.kill)
        self._live[name] = Live(process, driver)
        steps.done("tracked the VMM", lambda: self._live.pop(name, None))
        self.watcher.watch(name, process)
        if net.observe_ip and nic is not None:
            self.observer.watch(name, nic.tap, nic.mac)
        return self._set(
            name, status=RUNNING, pid=process.pid, supervisor_pid=process.supervisor_pid
        )

    def _attach_tap(
        self, tap: str, mac: str, bridge: str, attach: Attachment, booting: Booting
    ) -> None:
        """A fresh tap on `bridge`, setting the bridge up first unless this daemon already
        did (and again if it has vanished since)."""
        with self._bridge_lock:
            if bridge not in self._bridges_ready:
                self._ensure_bridge(bridge, attach, booting)
                self._bridges_ready.add(bridge)
            try:
                self.links.create_tap(tap, bridge, alloc.tap_mac(mac))
            except HostError:
                self._bridges_ready.discard(bridge)
                self._ensure_bridge(bridge, attach, booting)
                self.links.create_tap(tap, bridge, alloc.tap_mac(mac))
                self._bridges_ready.add(bridge)

    def _ensure_bridge(self, bridge: str, attach: Attachment, booting: Booting) -> None:
        if attach is Attachment.EXTERNAL:
            info = self.links.info(bridge)
            if info is None or info.kind != "bridge":
                raise HostError(
                    f"the dhcp bridge {bridge} does not exist (or is not a bridge) in the "
                    "daemon's namespace; create it and connect it to a network with a DHCP server"
                )
            return
        effective = booting.plan.network
        assert effective.subnet is not None and effective.gateway is not None
        address = ipaddress.IPv4Interface(f"{effective.gateway}/{effective.subnet.prefixlen}")
        self.links.ensure_bridge(bridge, address)

    def _unprotect(self, tap: str, rules: Future[None]) -> None:
        rules.exception()  # wait until nft has finished before taking the rules away
        self.firewall.release(tap)

    def _artifact_path(self, artifacts: dict[str, Any], role: str) -> Path | None:
        item = artifacts.get(role)
        return None if item is None else self.store.path(item["sha256"])

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
        if pause:
            live.driver.pause(live.process)
        else:
            live.driver.resume(live.process)
        live.paused = pause
        return self._set(name, status=PAUSED if pause else RUNNING)

    def _stop(self, name: str, timeout: float | None, force: bool) -> None:
        live = self._live.get(name)
        if live is None:
            self._status(name)  # a VM that does not exist is an error, a stopped one is not
            return
        self._set(name, status=STOPPING)
        self.watcher.forget(live.process)
        if live.paused and not force:
            # a paused guest cannot act on a graceful shutdown request: let it run to do so
            live.driver.resume(live.process)
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
        self._background.submit(self._vmm_exited, name, process)

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
        self.plugins.collect_garbage()

    def _set(self, name: str, **values: Any) -> dict[str, Any]:
        """Update the VM's record and return its view, in one transaction."""

        def work(session: Session) -> Row[Any]:
            session.execute(update(VM).where(VM.name == name).values(**values))
            row = session.execute(_view_query().where(VM.name == name)).first()
            if row is None:
                raise _no_vm(name)
            return row

        return self._view(self.db.transact(work))

    # ---- recovery after a daemon restart --------------------------------------------------

    def _recover(self) -> None:
        """Bring the records in line with what runs: adopt live VMMs, settle the ended ones."""
        with self.db.read() as session:
            found = [
                (vm.name, vm.status, vm.pid, vm.supervisor_pid, vm.vmm_kind)
                for vm in session.scalars(select(VM).where(VM.status.in_(LIVE)))
            ]
        for name, status, pid, supervisor_pid, kind in found:
            run_dir = self._run_dir(name)
            process = None
            if pid is not None and supervisor_pid is not None:
                process = VMMProcess(run_dir.path, pid, supervisor_pid)
            if process is not None and not process.exited() and _is_our_vmm(process.pid, run_dir):
                if status in (STARTING, STOPPING):
                    code = process.kill()
                    interrupted = f"the daemon stopped while the VM was {status}"
                    self._settle(name, STOPPED if status == STOPPING else ERROR, code, interrupted)
                else:
                    self._live[name] = Live(process, self.drivers[kind], status == PAUSED)
                    self.watcher.watch(name, process)
                    log.info("VM %s: adopted its running VMM (pid %d)", name, pid)
                continue
            code = process.exit_code() if process is not None else None
            reason = None if code == 0 else _exit_reason(code)
            self._settle(name, STOPPED if code == 0 else CRASHED, code, reason)

    def _settle(self, name: str, status: str, code: int | None, reason: str | None) -> None:
        self._release_host(name)
        self._set(
            name, status=status, exit_code=code, status_reason=reason, pid=None, supervisor_pid=None
        )
        log.info("VM %s: found %s (exit code %s)", name, status, code)


# ---- helpers -------------------------------------------------------------------------------


def _lock(path: Path, message: str) -> IO[str]:
    """An exclusive lock held for the daemon's life (released by the kernel if it dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise LockedError(message) from None
    return handle


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as reader:
            return reader.read(4) == b"\x7fELF"
    except OSError:
        return False


def _is_our_vmm(pid: int, run_dir: RunDir) -> bool:
    """Guard against PID reuse: the process must name this VM's run dir on its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(run_dir.path).encode() in cmdline


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "the VMM ended and its exit status is unknown"
    if code < 0:
        return f"the VMM was killed by signal {-code}"
    return f"the VMM exited with code {code}"


def _view_query() -> Any:
    """Everything a VM's JSON needs, in one query."""
    return (
        select(
            VM,
            Plugin.name.label("plugin"),
            CIDLease.cid.label("cid"),
            VMConfigVersion.config.label("config"),
            VMConfigVersion.manifest.label("manifest"),
        )
        .join(Plugin, Plugin.id == VM.plugin_id)
        .join(
            VMConfigVersion,
            and_(VMConfigVersion.vm_id == VM.id, VMConfigVersion.version == VM.config_version),
        )
        .outerjoin(CIDLease, CIDLease.vm_id == VM.id)
    )


def _no_vm(name: str) -> NotFoundError:
    return NotFoundError(f"VM {name!r} does not exist (roost vm list shows those that do)")


def _vm_exists(name: str) -> ConflictError:
    return ConflictError(f"VM {name!r} already exists; choose another name", code="exists")
