"""The engine: VM lifecycle as plan → act, with every step recorded and undone on failure.

Locking: one operation at a time per VM (a second gets `vm_busy`); bridge set-up and removal
share one lock so a bridge is never removed under a tap that is being attached to it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from roost.engine.settings import DEFAULT_BRIDGE, DEFAULT_NETWORK, Settings
from roost.engine.steps import Steps
from roost.engine.views import network_view, plugin_view, vm_view
from roost.errors import ConflictError, HostError, InvalidError, NotFoundError, RoostError
from roost.host.firewall import Firewall
from roost.host.links import Links
from roost.host.netns import NetnsWorker
from roost.host.observe import LeaseObserver
from roost.plan import IPAM, AntiSpoof, Attachment, DefaultNetwork, VMPlan, boot_args, plan_vm
from roost.plan.network import EffectiveNetwork, plan_network
from roost.spec import Manifest, VMConfig
from roost.spec.common import check_name
from roost.state import alloc
from roost.state.artifacts import ArtifactStore, Progress
from roost.state.db import Database, sqlite_url
from roost.state.models import VM, IPLease, Network, Plugin, PluginArtifact, VMConfigVersion
from roost.vmm.base import NIC, Driver, LaunchSpec, RunDir, Vsock
from roost.vmm.firecracker import FirecrackerDriver, find_firecracker
from roost.vmm.process import ExitWatcher, VMMProcess
from roost.vmm.qemu import Accel, Machine, QemuDriver

log = logging.getLogger("roost.engine")

CREATED, STARTING, RUNNING, PAUSED = "created", "starting", "running", "paused"
STOPPING, STOPPED, CRASHED, ERROR = "stopping", "stopped", "crashed", "error"
LIVE = (STARTING, RUNNING, PAUSED, STOPPING)
InstallProgress = Callable[[dict[str, Any]], None]


class StateDirLockedError(RoostError):
    code = "state_dir_locked"
    http_status = 409
    exit_code = 4


class Engine:
    """Owns the database, the host's links and rules, and the VMM processes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.default = DefaultNetwork.from_cidr(settings.default_subnet)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock_state_dir(settings.state_dir)
        settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = Database(settings.database_url or sqlite_url(settings.state_dir))
        self.db.migrate()
        self.store = ArtifactStore(settings.state_dir / "artifacts")
        self.store.remove_incomplete()
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
        self._processes: dict[str, VMMProcess] = {}
        self._busy: dict[str, str] = {}
        self._busy_lock = threading.Lock()
        self._vm_locks: dict[str, threading.Lock] = {}
        self._bridge_lock = threading.Lock()
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
        self._exits.shutdown(wait=True)
        self.links.close()
        self.worker.close()
        self.db.dispose()
        self._lock_file.close()

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

    # ---- plugins --------------------------------------------------------------------------

    def install_plugin(
        self, manifest: Manifest, *, force: bool, progress: InstallProgress | None = None
    ) -> dict[str, Any]:
        """Store the manifest's artifacts (checking sha256s) and record the plugin."""
        if not force:
            with self.db.read() as session:
                if _plugin(session, manifest.name, missing_ok=True) is not None:
                    raise _plugin_exists(manifest.name)
        stored = {}
        for role, artifact in manifest.artifacts().items():
            source = artifact.path or artifact.url
            assert source is not None
            if progress is not None:
                progress({"event": "artifact", "role": role, "source": source})
            stored[role] = self.store.fetch(
                source,
                loc=role,
                expected_sha256=artifact.sha256,
                progress=_artifact_progress(progress, role),
            )
        if "kernel" in stored and not self.store.is_elf(stored["kernel"].sha256):
            raise InvalidError.at(
                "kernel",
                "is not an uncompressed ELF vmlinux (Firecracker boots only those; extract it "
                "from a bzImage with the kernel's scripts/extract-vmlinux)",
            )

        def work(session: Session) -> Plugin:
            plugin = _plugin(session, manifest.name, missing_ok=True)
            if plugin is not None and not force:
                raise _plugin_exists(manifest.name)
            if plugin is None:
                plugin = Plugin(name=manifest.name)
                session.add(plugin)
            plugin.version = manifest.version
            plugin.manifest = manifest.model_dump(mode="json", exclude_none=True)
            plugin.artifacts = [
                PluginArtifact(role=role, sha256=item.sha256, size=item.size)
                for role, item in stored.items()
            ]
            session.flush()
            return plugin

        self.db.transact(work)
        self._collect_garbage()
        return self.show_plugin(manifest.name)

    def list_plugins(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            plugins = session.scalars(
                select(Plugin).options(selectinload(Plugin.artifacts)).order_by(Plugin.name)
            )
            return [plugin_view(p, _vm_names(session, p)) for p in plugins]

    def show_plugin(self, name: str) -> dict[str, Any]:
        with self.db.read() as session:
            plugin = _plugin(session, name)
            return plugin_view(plugin, _vm_names(session, plugin))

    def remove_plugin(self, name: str) -> None:
        def work(session: Session) -> None:
            plugin = _plugin(session, name)
            users = _vm_names(session, plugin)
            if users:
                raise ConflictError(
                    f"plugin {name!r} is used by VM(s) {', '.join(users)}; remove them first",
                    code="plugin_in_use",
                )
            session.delete(plugin)

        self.db.transact(work)
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        with self.db.read() as session:
            referenced = set(session.scalars(select(PluginArtifact.sha256)))
            for artifacts in session.scalars(select(VMConfigVersion.artifacts)):
                referenced.update(item["sha256"] for item in artifacts.values())
        self.store.collect_garbage(referenced)

    # ---- VMs: reading ---------------------------------------------------------------------

    def list_vms(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            vms = session.scalars(_vm_query().order_by(VM.name))
            return [self._view(vm) for vm in vms]

    def show_vm(self, name: str) -> dict[str, Any]:
        with self.db.read() as session:
            return self._view(_vm(session, name))

    def _view(self, vm: VM) -> dict[str, Any]:
        driver = self.drivers.get(vm.vmm_kind)
        run_dir = self._run_dir(vm.name)
        process = self._processes.get(vm.name)
        api_socket = driver.api_socket(run_dir) if driver is not None and process else None
        vsock_path = driver.vsock_path(run_dir) if driver is not None else None
        return vm_view(vm, run_dir, api_socket, vsock_path)

    def console(self, name: str) -> tuple[Path, bool]:
        """The VM's serial console log and whether its VMM may still write to it."""
        with self.db.read() as session:
            vm = _vm(session, name)
            return self._run_dir(name).console_log, vm.status in LIVE

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

    def _run_dir(self, name: str) -> RunDir:
        return RunDir(self.settings.run_dir / "vms" / name)

    # ---- VMs: lifecycle -------------------------------------------------------------------

    def create_vm(self, name: str, config: VMConfig, *, start: bool = True) -> dict[str, Any]:
        """Record a VM and allocate all its plan needs, then start it unless `start` is false.
        Any failure leaves nothing: no record, lease, tap, run dir or process."""
        check_name(name)
        with self._operation(name, "create"):
            with self.db.read() as session:
                if session.scalar(select(VM.id).where(VM.name == name)) is not None:
                    raise _vm_exists(name)
                plugin = _plugin(session, config.plugin)
                manifest = Manifest.model_validate(plugin.manifest)
                artifacts = {a.role: {"sha256": a.sha256, "size": a.size} for a in plugin.artifacts}
                plugin_id, manifest_json = plugin.id, plugin.manifest
            plan = plan_vm(name, manifest, config, self.default)
            vmm = self._vmm_of(config)
            self._check_launchable(plan, manifest, artifacts, vmm)

            def record(session: Session) -> None:
                if session.scalar(select(VM.id).where(VM.name == name)) is not None:
                    raise _vm_exists(name)
                vm = VM(name=name, plugin_id=plugin_id, status=CREATED, vmm_kind=vmm, network={})
                session.add(vm)
                session.flush()
                vm.configs.append(
                    VMConfigVersion(
                        version=1,
                        config=config.model_dump(mode="json", exclude_none=True),
                        manifest=manifest_json,
                        artifacts=artifacts,
                    )
                )
                self._allocate(session, vm, plan)

            self.db.transact(record)
            log.info("create %s: recorded the VM and its allocations", name)
            if start:
                try:
                    self._start(name, "create")
                except BaseException:
                    self._forget(name)
                    raise
            return self.show_vm(name)

    def start_vm(self, name: str) -> dict[str, Any]:
        with self._operation(name, "start"):
            status = self.show_vm(name)["status"]
            if status == RUNNING:
                return self.show_vm(name)
            if status == PAUSED:
                return self._resume(name)
            self._start(name, "start")
            return self.show_vm(name)

    def stop_vm(
        self, name: str, *, timeout: float | None = None, force: bool = False
    ) -> dict[str, Any]:
        with self._operation(name, "stop"):
            self._stop(name, timeout, force)
            return self.show_vm(name)

    def restart_vm(self, name: str) -> dict[str, Any]:
        with self._operation(name, "restart"):
            self._stop(name, None, False)
            self._start(name, "restart")
            return self.show_vm(name)

    def pause_vm(self, name: str) -> dict[str, Any]:
        with self._operation(name, "pause"):
            status = self.show_vm(name)["status"]
            if status == PAUSED:
                return self.show_vm(name)
            process = self._live_process(name, status, "pause")
            self._driver_of(name).pause(process)
            self._set(name, status=PAUSED)
            return self.show_vm(name)

    def resume_vm(self, name: str) -> dict[str, Any]:
        with self._operation(name, "resume"):
            return self._resume(name)

    def _resume(self, name: str) -> dict[str, Any]:
        status = self.show_vm(name)["status"]
        if status == RUNNING:
            return self.show_vm(name)
        process = self._live_process(name, status, "resume")
        self._driver_of(name).resume(process)
        self._set(name, status=RUNNING)
        return self.show_vm(name)

    def destroy_vm(self, name: str) -> None:
        """Stop the VM if it runs, then remove it and everything it holds."""
        with self._operation(name, "remove"):
            self._stop(name, None, False)
            self._forget(name)

    # ---- lifecycle internals --------------------------------------------------------------

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

    def _allocate(self, session: Session, vm: VM, plan: VMPlan) -> list[tuple[int, str]]:
        """Make the VM hold what its plan needs, and nothing else: address (bridged), CID,
        MAC and tap name. Returns the (id, bridge) of networks left without leases."""
        emptied = []
        effective = plan.network
        bridge: str | None = None
        held = session.scalar(select(IPLease).where(IPLease.vm_id == vm.id))
        if plan.net.ipam is IPAM.NONE or (
            held is not None and held.network.subnet != str(effective.subnet)
        ):
            emptied += self._release_ip(session, vm)
        if plan.net.ipam is not IPAM.NONE:
            assert effective.subnet is not None and effective.gateway is not None
            network = alloc.ensure_network(session, effective.subnet, effective.gateway)
            requested = effective.ip if plan.net.ipam is IPAM.MANUAL else None
            effective = effective.with_ip(alloc.allocate_ip(session, network, vm, requested))
            bridge = network.bridge
        elif plan.net.attach is Attachment.EXTERNAL:
            bridge = self.settings.dhcp_bridge
        alloc.allocate_cid(session, vm)
        if plan.net.nic and vm.mac is None:
            vm.mac = alloc.new_mac(session)
        if plan.net.tap and vm.tap is None:
            vm.tap = alloc.tap_name(vm)
        vm.network = {
            "effective": effective.to_json(),
            "plan": plan_network(effective, vm.name).to_json(),
            "bridge": bridge,
        }
        return emptied

    def _release_ip(self, session: Session, vm: VM) -> list[tuple[int, str]]:
        network = alloc.release_ip(session, vm)
        if network is None:
            return []
        emptied = [(network.id, network.bridge)]
        if network.name != DEFAULT_NETWORK:
            session.delete(network)
        return emptied

    def _remove_bridges(self, emptied: list[tuple[int, str]]) -> None:
        """Remove the bridges of networks that lost their last lease (unless a VM took an
        address there meanwhile)."""
        for network_id, bridge in emptied:
            with self._bridge_lock:
                with self.db.read() as session:
                    if (
                        session.scalar(select(IPLease.ip).where(IPLease.network_id == network_id))
                        is not None
                    ):
                        continue
                self.links.delete(bridge)

    def _start(self, name: str, operation: str) -> None:
        """Plan again, allocate what the plan needs, set up the host, boot the VMM. A failure
        leaves the VM `error` with its reason, its tap and process gone, its leases kept."""
        steps = Steps(operation, name)
        try:
            self._boot(name, steps)
        except BaseException as error:
            reason = error.message if isinstance(error, RoostError) else repr(error)
            steps.rollback()
            self._set(name, status=ERROR, status_reason=reason, pid=None, supervisor_pid=None)
            raise

    def _boot(self, name: str, steps: Steps) -> None:
        with self.db.read() as session:
            vm = _vm(session, name)
            current = vm.configs[-1]
            manifest = Manifest.model_validate(current.manifest)
            config = VMConfig.model_validate(current.config)
            artifacts = current.artifacts
        vmm = self._vmm_of(config)
        plan = plan_vm(name, manifest, config, self.default)
        self._check_launchable(plan, manifest, artifacts, vmm)
        driver = self.drivers[vmm]
        vsock_missing = driver.vsock_unavailable() if plan.net.vsock else None
        if vsock_missing:
            log.warning("VM %s starts without a vsock device: %s", name, vsock_missing)

        def allocate(session: Session) -> tuple[VM, list[tuple[int, str]]]:
            vm = _vm(session, name)
            emptied = self._allocate(session, vm, plan)
            vm.status, vm.status_reason, vm.exit_code = STARTING, None, None
            vm.vmm_kind, vm.vsock_unavailable, vm.observed_ip = vmm, vsock_missing, None
            return vm, emptied

        vm, emptied = self.db.transact(allocate)
        self._remove_bridges(emptied)
        net = plan_network(_effective_with_ip(plan, vm), name)
        run_dir = self._run_dir(name)
        run_dir.prepare()
        steps.done("prepared the run dir", run_dir.remove_sockets)

        nic = None
        if net.tap:
            tap, mac, bridge = vm.tap, vm.mac, vm.network["bridge"]
            assert tap is not None and mac is not None
            with self._bridge_lock:
                self._ensure_bridge(bridge, net.attach, vm)
                self.links.create_tap(tap, bridge, alloc.tap_mac(mac))
            steps.done(f"created tap {tap} on {bridge}", lambda: self.links.delete(tap))
            if net.antispoof is not AntiSpoof.NONE:
                only_ip = net.antispoof is AntiSpoof.IP_AND_MAC
                self.firewall.protect(tap, mac, vm.network["effective"]["ip"] if only_ip else None)
                steps.done("added anti-spoofing rules", lambda: self.firewall.release(tap))
            nic = NIC(tap=tap, mac=mac)

        kernel = self._artifact_path(artifacts, "kernel") or self.settings.kernel
        assert kernel is not None and vm.cid_lease is not None
        spec = LaunchSpec(
            name=name,
            run_dir=run_dir,
            kernel=kernel,
            initrd=self._artifact_path(artifacts, "initramfs"),
            rootfs=self._artifact_path(artifacts, "rootfs"),
            boot_args=boot_args(manifest, config, name, net.kernel_ip_arg),
            vcpus=plan.resources.vcpus,
            memory_mib=plan.resources.memory_mib,
            nic=nic,
            vsock=Vsock(vm.cid_lease.cid, run_dir.vsock_socket) if net.vsock else None,
        )
        process = driver.launch(spec, self.worker)
        steps.done(f"started {vmm} (pid {process.pid})", process.kill)
        self._processes[name] = process
        steps.done("tracked the VMM", lambda: self._processes.pop(name, None))
        self._set(name, status=RUNNING, pid=process.pid, supervisor_pid=process.supervisor_pid)
        self.watcher.watch(name, process)
        if net.observe_ip and nic is not None:
            self.observer.watch(name, nic.tap, nic.mac)

    def _ensure_bridge(self, bridge: str, attach: Attachment, vm: VM) -> None:
        if attach is Attachment.EXTERNAL:
            info = self.links.info(bridge)
            if info is None or info.kind != "bridge":
                raise HostError(
                    f"the dhcp bridge {bridge} does not exist (or is not a bridge) in the "
                    "daemon's namespace; create it and connect it to a network with a DHCP server"
                )
            return
        effective = vm.network["effective"]
        subnet = ipaddress.IPv4Network(effective["subnet"])
        address = ipaddress.IPv4Interface(f"{effective['gateway']}/{subnet.prefixlen}")
        self.links.ensure_bridge(bridge, address)

    def _artifact_path(self, artifacts: dict[str, Any], role: str) -> Path | None:
        item = artifacts.get(role)
        return None if item is None else self.store.path(item["sha256"])

    def _live_process(self, name: str, status: str, what: str) -> VMMProcess:
        process = self._processes.get(name)
        if status not in (RUNNING, PAUSED) or process is None:
            raise ConflictError(f"cannot {what} VM {name!r}: it is {status}; start it first")
        return process

    def _vmm_of(self, config: VMConfig) -> str:
        return config.vmm.value if config.vmm is not None else self.settings.vmm

    def _driver_of(self, name: str) -> Driver:
        return self.drivers[self.show_vm(name)["vmm"]["kind"]]

    def _stop(self, name: str, timeout: float | None, force: bool) -> None:
        vm = self.show_vm(name)
        process = self._processes.get(name)
        if process is None:
            return
        self._set(name, status=STOPPING)
        self.watcher.forget(process)
        wait = self.settings.stop_timeout if timeout is None else timeout
        code = self.drivers[vm["vmm"]["kind"]].stop(process, wait, force)
        self._processes.pop(name, None)
        self._release_host(vm)
        self._set(name, status=STOPPED, exit_code=code, pid=None, supervisor_pid=None)

    def _release_host(self, vm: dict[str, Any]) -> None:
        """Remove what only exists while the VMM runs: its tap, its rules and its sockets."""
        self.observer.forget(vm["name"])
        tap = vm["network"]["tap"]
        if tap is not None:
            self.firewall.release(tap)
            self.links.delete(tap)
        self._run_dir(vm["name"]).remove_sockets()

    def _on_exit(self, name: str, process: VMMProcess) -> None:
        self._exits.submit(self._vmm_exited, name, process)

    def _vmm_exited(self, name: str, process: VMMProcess) -> None:
        """A VMM ended without being asked: the VM is `stopped` (exit 0) or `crashed`."""
        with self._operation(name, "exit", wait=True):
            if self._processes.get(name) is not process:
                return
            process.wait(5)
            code = process.exit_code()
            self._processes.pop(name, None)
            self._release_host(self.show_vm(name))
            status = STOPPED if code == 0 else CRASHED
            reason = None if code == 0 else _exit_reason(code)
            self._set(
                name,
                status=status,
                status_reason=reason,
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

        def work(session: Session) -> list[tuple[int, str]]:
            vm = session.scalar(select(VM).where(VM.name == name))
            if vm is None:
                return []
            emptied = self._release_ip(session, vm)
            session.delete(vm)
            return emptied

        vm = self.show_vm(name)
        self._release_host(vm)
        emptied = self.db.transact(work)
        self._remove_bridges(emptied)
        self._run_dir(name).remove()
        self._collect_garbage()

    def _set(self, name: str, **values: Any) -> None:
        def work(session: Session) -> None:
            vm = _vm(session, name)
            for key, value in values.items():
                setattr(vm, key, value)

        self.db.transact(work)

    # ---- recovery after a daemon restart --------------------------------------------------

    def _recover(self) -> None:
        """Bring the records in line with what runs: adopt live VMMs, settle the ended ones."""
        with self.db.read() as session:
            live = [
                (vm.name, vm.status, vm.pid, vm.supervisor_pid)
                for vm in session.scalars(select(VM).where(VM.status.in_(LIVE)))
            ]
        for name, status, pid, supervisor_pid in live:
            run_dir = self._run_dir(name)
            process = None
            if pid is not None and supervisor_pid is not None:
                process = VMMProcess(run_dir.path, pid, supervisor_pid)
            if process is not None and not process.exited() and _is_our_vmm(process.pid, run_dir):
                if status in (STARTING, STOPPING):
                    code = process.kill()
                    self._settle(
                        name,
                        STOPPED if status == STOPPING else ERROR,
                        code,
                        f"the daemon stopped while the VM was {status}",
                    )
                else:
                    self._processes[name] = process
                    self.watcher.watch(name, process)
                    log.info("VM %s: adopted its running VMM (pid %d)", name, pid)
                continue
            code = process.exit_code() if process is not None else None
            self._settle(
                name,
                STOPPED if code == 0 else CRASHED,
                code,
                None if code == 0 else _exit_reason(code),
            )

    def _settle(self, name: str, status: str, code: int | None, reason: str | None) -> None:
        self._release_host(self.show_vm(name))
        self._set(
            name, status=status, exit_code=code, status_reason=reason, pid=None, supervisor_pid=None
        )
        log.info("VM %s: found %s (exit code %s)", name, status, code)


# ---- helpers -------------------------------------------------------------------------------


def _lock_state_dir(state_dir: Path) -> Any:
    handle = (state_dir / "lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StateDirLockedError(
            f"another roost daemon is using {state_dir}; stop it, or give this one its own "
            "--state-dir"
        ) from None
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


def _effective_with_ip(plan: VMPlan, vm: VM) -> EffectiveNetwork:
    ip = vm.network["effective"]["ip"]
    return plan.network if ip is None else plan.network.with_ip(ipaddress.IPv4Address(ip))


def _artifact_progress(progress: InstallProgress | None, role: str) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total: progress(
        {"event": "progress", "role": role, "done": done, "total": total}
    )


def _vm_query() -> Any:
    return select(VM).options(
        selectinload(VM.configs), selectinload(VM.plugin), selectinload(VM.cid_lease)
    )


def _vm(session: Session, name: str) -> VM:
    vm: VM | None = session.scalar(_vm_query().where(VM.name == name))
    if vm is None:
        raise NotFoundError(f"VM {name!r} does not exist (roost vm list shows those that do)")
    return vm


def _plugin(session: Session, name: str, *, missing_ok: bool = False) -> Plugin:
    plugin = session.scalar(
        select(Plugin).options(selectinload(Plugin.artifacts)).where(Plugin.name == name)
    )
    if plugin is None and not missing_ok:
        raise NotFoundError(
            f"plugin {name!r} is not installed (roost plugin install FILE installs it)"
        )
    return plugin  # type: ignore[return-value]


def _vm_names(session: Session, plugin: Plugin) -> list[str]:
    return list(session.scalars(select(VM.name).where(VM.plugin_id == plugin.id).order_by(VM.name)))


def _plugin_exists(name: str) -> ConflictError:
    return ConflictError(
        f"plugin {name!r} is already installed; use --force to replace it (existing VMs keep "
        "the manifest they were created with)",
        code="exists",
    )


def _vm_exists(name: str) -> ConflictError:
    return ConflictError(f"VM {name!r} already exists; choose another name", code="exists")
