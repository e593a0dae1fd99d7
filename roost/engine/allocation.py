"""Plans and holdings: what a VM's config resolves to, whether it can run here, and what it
holds for it — address, CID, MAC, tap name — at create, at start and at a config patch.

Every function here runs inside the caller's write transaction, so what a VM holds is
committed with its record, or not at all. With a `Steps` (a launch follows), the VM's tap and
rules are made inside that transaction too, their undoing recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from roost.engine.hostnet import Emptied, HostNetwork, TapPlan
from roost.engine.launch import Files, launch_spec
from roost.engine.networks import lookup_in
from roost.engine.settings import DEFAULT_NETWORK, Settings
from roost.engine.steps import Steps
from roost.errors import ConflictError, InvalidError
from roost.plan import IPAM, Attachment, DefaultNetwork, VMPlan, plan_vm
from roost.plan.network import EffectiveNetwork, NetworkPlan, plan_network
from roost.plan.vm import effective_json, needs_restart
from roost.spec import Manifest, VMConfig, VMConfigPatch
from roost.state import alloc, configs
from roost.state.artifacts import ArtifactStore
from roost.state.configs import ConfigVersion
from roost.state.db import Database
from roost.state.vms import Holding, StoredNetwork, VMRecords, VMStatus, no_vm
from roost.vmm.base import Driver, Early, LaunchSpec, RunDir

T = TypeVar("T")


@dataclass(frozen=True)
class Booting:
    """What a starting VM holds, as the launch needs it (read once, in the allocating
    transaction; `net` is the plan with the allocated address filled in), the config version
    it boots, and what of its launch is already under way: the VMM started early."""

    name: str
    version: int
    spec: LaunchSpec
    net: NetworkPlan
    artifacts: dict[str, Any]
    vmm: str
    mac: str | None
    tap: str | None
    vsock_missing: str | None
    early: Early | None
    shown: dict[str, Any]  # what of its view cannot change while its VMM runs
    effective: EffectiveNetwork
    services: dict[int, str]  # its vsock_services: guest port -> the host service it reaches


@dataclass(frozen=True)
class Patched:
    """The outcome of a patch: the latest version (new, or the current one when the patch
    changed nothing), whether the VM's VMM must restart to run it, and the networks the patch
    left without leases (whose bridges go once it has committed)."""

    version: ConfigVersion
    created: bool
    restart_required: bool
    emptied: Emptied


class Allocator:
    """Plans VMs against the daemon's defaults and the host, and allocates for them."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        records: VMRecords,
        host: HostNetwork,
        drivers: Mapping[str, Driver],
        store: ArtifactStore,
        disk_path: Callable[[str], Path],
        run_dir: Callable[[str], RunDir],
    ) -> None:
        self.settings = settings
        self.default = DefaultNetwork.from_cidr(settings.default_subnet)
        self.db = db
        self.records = records
        self.host = host
        self.drivers = drivers
        self.store = store
        self._disk_path = disk_path
        self._run_dir = run_dir
        self.kept_orphans: set[str] = set()  # run dirs where VMMs no VM accounts for were kept

    # ---- judging ------------------------------------------------------------------------

    def vmm_of(self, config: VMConfig) -> str:
        return config.vmm.value if config.vmm is not None else self.settings.vmm

    def check_run_dir_free(self, name: str) -> None:
        if name in self.kept_orphans:
            raise ConflictError(
                f"a VMM that no VM accounts for runs in the run dir of {name!r} (kept by "
                "--keep-orphans); end it, or restart the daemon with --reap-orphans, first"
            )

    def check_launchable(
        self, plan: VMPlan, manifest: Manifest, artifacts: dict[str, Any], vmm: str
    ) -> None:
        """Everything that would make a start fail for a reason the user can fix, checked
        before anything is allocated (at create, at patch and at start alike)."""
        self.check_run_dir_free(plan.name)
        self._run_dir(plan.name).check_length()
        on_dhcp_bridge = plan.net.attach is Attachment.EXTERNAL and plan.network.network is None
        if on_dhcp_bridge and self.settings.dhcp_bridge is None:
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

    # ---- transactions -------------------------------------------------------------------

    def transact(self, work: Callable[[Session], T], host: Steps | None) -> T:
        """Run allocating transaction `work`. With `host` (a launch follows), `work` also
        makes the VM's tap and rules, recorded in `host`; the bridge lock is then held until it
        has committed, so no bridge is removed for lack of a lease that is not visible yet.
        Host work of a failed attempt is undone."""
        if host is None:
            return self.db.transact(work)
        before = host.mark()

        def attempt(session: Session) -> T:
            host.rollback(before)  # what an earlier attempt made, had its commit failed
            return work(session)

        with self.host.lock:
            try:
                return self.db.transact(attempt)
            except BaseException:
                host.rollback(before)
                raise

    # ---- create, start, forget ----------------------------------------------------------

    def record_new(
        self,
        session: Session,
        name: str,
        config: VMConfig,
        vmm: str,
        early: Early | None,
        host: Steps | None,
    ) -> Booting:
        """Record a new VM (`starting` when `host` is given, else `created`), allocate what
        its plan needs, and record its first config version."""
        connection = session.connection()
        if host is None:
            self.records.check_new(connection, name)
        plugin = self.records.plugin(connection, config.plugin)
        manifest = Manifest.model_validate(plugin.manifest)
        plan = plan_vm(name, manifest, config, self.default, lookup_in(session))
        self.check_launchable(plan, manifest, plugin.artifacts, vmm)
        status = VMStatus.STARTING if host is not None else VMStatus.CREATED
        config_json = config.model_dump(mode="json", exclude_none=True)
        vm = self.records.add(connection, name=name, plugin_id=plugin.id, status=status, vmm=vmm)
        shown = {"plugin": config.plugin, "config": config_json, "manifest": plugin.manifest}
        booting, _ = self.allocate(
            session,
            vm,
            status,
            1,
            plan,
            manifest,
            config,
            plugin.artifacts,
            vmm,
            early,
            host,
            shown,
        )
        configs.add(
            connection,
            vm.id,
            1,
            config=config_json,
            manifest=plugin.manifest,
            artifacts=plugin.artifacts,
            effective=effective_json(plan, booting.effective, vmm),
        )
        return booting

    def for_start(
        self, session: Session, name: str, latest: ConfigVersion, early: Early | None, host: Steps
    ) -> tuple[Booting, Emptied]:
        """A start of the latest version: the address a patch reserved becomes the VM's
        own (its old one released), then everything the plan needs is held."""
        manifest = Manifest.model_validate(latest.manifest)
        config = VMConfig.model_validate(latest.config)
        vmm = self.vmm_of(config)
        plan = plan_vm(name, manifest, config, self.default, lookup_in(session))
        shown = {"plugin": config.plugin, "config": latest.config, "manifest": latest.manifest}
        connection = session.connection()
        held = self.records.holding(connection, name)
        emptied = alloc.promote_reserved(session, held, keep_network=DEFAULT_NETWORK)
        vm = self.records.holding(connection, name)
        booting, more = self.allocate(
            session,
            vm,
            VMStatus.STARTING,
            latest.version,
            plan,
            manifest,
            config,
            latest.artifacts,
            vmm,
            early,
            host,
            shown,
        )
        return booting, emptied + more

    def prepare_start(self, name: str, latest: ConfigVersion) -> str:
        """Judge the latest version before anything is done for its start; its VMM kind."""
        manifest = Manifest.model_validate(latest.manifest)
        config = VMConfig.model_validate(latest.config)
        vmm = self.vmm_of(config)
        with self.db.read() as session:
            plan = plan_vm(name, manifest, config, self.default, lookup_in(session))
        self.check_launchable(plan, manifest, latest.artifacts, vmm)
        return vmm

    def allocate(
        self,
        session: Session,
        vm: Holding,
        status: VMStatus,
        version: int,
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
            emptied += self._release(session, vm)
        if plan.net.ipam is not IPAM.NONE:
            network = self._network_of(session, effective)
            bridge = network.bridge
        elif plan.net.attach is Attachment.EXTERNAL:
            bridge = self._external_bridge(session, effective)
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
            gateway = None
            if effective.subnet is not None and effective.gateway is not None:
                gateway = alloc.gateway_interface(effective.gateway, effective.subnet)
            self.host.attach(
                host,
                TapPlan(
                    tap=tap,
                    mac=mac,
                    bridge=bridge,
                    # only an on-demand network's bridge goes with its last lease
                    network_id=_on_demand_id(network),
                    network=effective.network,
                    attach=net.attach,
                    gateway=gateway,
                    antispoof=net.antispoof,
                    ip=None if effective.ip is None else str(effective.ip),
                    jailed=vmm == "firecracker" and self.settings.jailer is not None,
                ),
            )
        cid = alloc.allocate_cid(session, vm)
        vsock_missing = self._vsock_missing(vmm, net)
        vsock_backend = None if vsock_missing else self.drivers[vmm].vsock_backend()
        self.records.set_planned(
            session.connection(),
            vm.id,
            status=status,
            mac=mac,
            tap=tap,
            network=StoredNetwork(effective, net, bridge),
            vmm=vmm,
            vsock_unavailable=vsock_missing,
            vsock_backend=vsock_backend,
        )
        files = Files(
            kernel=self.artifact_path(artifacts, "kernel") or _required(self.settings.kernel),
            initrd=self.artifact_path(artifacts, "initramfs"),
            disk=self._disk_path(vm.name) if "rootfs" in artifacts else None,
        )
        spec = launch_spec(
            plan,
            net,
            manifest,
            config,
            files,
            self._run_dir(vm.name),
            tap=tap if net.tap else None,
            mac=mac,
            cid=cid,
            vsock_backend=vsock_backend,
        )
        booting = Booting(
            name=vm.name,
            version=version,
            spec=spec,
            net=net,
            artifacts=artifacts,
            vmm=vmm,
            mac=mac if net.nic else None,
            tap=tap if net.tap else None,
            vsock_missing=vsock_missing,
            early=early,
            shown={**shown, "cid": cid},
            effective=effective,
            services=dict(config.vsock_services),
        )
        return booting, emptied

    def _network_of(self, session: Session, effective: EffectiveNetwork) -> alloc.NetworkRow:
        """The network a bridged VM takes its address on: the one it names, or the one its
        subnet is (made on demand)."""
        assert effective.subnet is not None and effective.gateway is not None
        if effective.network is None:
            return alloc.ensure_network(session, effective.subnet, effective.gateway)
        found = alloc.network_by_name(session, effective.network)
        if found is None:
            raise _unregistered(effective.network)
        return found

    def _external_bridge(self, session: Session, effective: EffectiveNetwork) -> str | None:
        """The operator's bridge a VM joins: its named network's, else --dhcp-bridge's."""
        if effective.network is None:
            return self.settings.dhcp_bridge
        found = lookup_in(session)(effective.network)
        if found is None:
            raise _unregistered(effective.network)
        return found.bridge

    def forget(self, session: Session, name: str) -> Emptied:
        """Delete the VM's record and release every address it holds."""
        emptied: Emptied = []

        def release(vm: alloc.Holder) -> None:
            for purpose in (alloc.RESERVED, alloc.CURRENT):
                emptied.extend(self._release(session, vm, purpose))

        self.records.delete(session, name, release)
        return emptied

    def _release(self, session: Session, vm: alloc.Holder, purpose: str = alloc.CURRENT) -> Emptied:
        """Release the VM's address held for `purpose`; the networks that leaves empty."""
        return alloc.release_address(session, vm, keep_network=DEFAULT_NETWORK, purpose=purpose)

    def _vsock_missing(self, vmm: str, net: NetworkPlan) -> str | None:
        return self.drivers[vmm].vsock_unavailable() if net.vsock else None

    def _held_now(
        self, session: Session, name: str, effective: EffectiveNetwork, vmm: str
    ) -> dict[str, Any]:
        """The record values that say what a VM with no VMM has now (what its next start
        uses): its network, with the bridge it attaches to, its VMM and whether that VMM gives
        it a vsock device."""
        net = plan_network(effective, name)
        bridge = None
        if net.attach is Attachment.EXTERNAL:
            bridge = self._external_bridge(session, effective)
        elif effective.subnet is not None:
            network = alloc.network_by_subnet(session, effective.subnet)
            bridge = None if network is None else network.bridge
        return {
            "network": StoredNetwork(effective, net, bridge).to_json(),
            "vmm_kind": vmm,
            "vsock_unavailable": self._vsock_missing(vmm, net),
        }

    def artifact_path(self, artifacts: dict[str, Any], role: str) -> Path | None:
        item = artifacts.get(role)
        return None if item is None else self.store.path(item["sha256"])

    def latest_planned(self, session: Session, name: str) -> tuple[dict[str, Any], Emptied]:
        """For a VM whose VMM has just ended: when it ran an older version than its latest,
        the addresses that version does not need are released (a reserved one becomes its
        own), and the record values that make it show (and next start) its latest — its
        network with the address that version was given, its VMM and its vsock availability;
        else nothing. Also the networks left without leases."""
        connection = session.connection()
        running = self.records.running_version(connection, name)
        latest = configs.latest(connection, name)
        if running is None or latest is None or latest.version == running:
            return {}, []
        effective = EffectiveNetwork.from_json(latest.effective["network"])
        vm = self.records.holding(connection, name)
        emptied: Emptied = []
        if effective.ip is None:
            for purpose in (alloc.RESERVED, alloc.CURRENT):
                emptied += self._release(session, vm, purpose)
        else:
            emptied += alloc.promote_reserved(session, vm, keep_network=DEFAULT_NETWORK)
        return self._held_now(session, name, effective, str(latest.effective["vmm"])), emptied

    # ---- patches ------------------------------------------------------------------------

    def patch(
        self, session: Session, name: str, patch: VMConfigPatch, *, vmm_runs: bool
    ) -> Patched:
        """Store the config `patch` makes of the VM's latest version as a new version,
        validated exactly as a create is, with the address it needs reserved at once (a taken
        manual address, an overlapping subnet or a full one refuse the patch and change
        nothing). What the VM no longer needs is released now when no VMM runs; a running
        VM keeps its current address until its next start."""
        connection = session.connection()
        vm = self.records.holding(connection, name)
        latest = configs.latest(connection, name)
        if latest is None:
            raise no_vm(name)
        config = patch.apply(VMConfig.model_validate(latest.config))
        config_json = config.model_dump(mode="json", exclude_none=True)
        if config_json == latest.config:
            return Patched(latest, False, self.records.restart_required(connection, name), [])
        manifest = Manifest.model_validate(latest.manifest)
        plan = plan_vm(name, manifest, config, self.default, lookup_in(session))
        vmm = self.vmm_of(config)
        self.check_launchable(plan, manifest, latest.artifacts, vmm)
        effective, emptied = self._address_for(session, vm, plan, vmm_runs=vmm_runs)
        number = latest.version + 1
        new_effective = effective_json(plan, effective, vmm)
        configs.add(
            connection,
            vm.id,
            number,
            config=config_json,
            manifest=latest.manifest,
            artifacts=latest.artifacts,
            effective=new_effective,
        )
        if vmm_runs:
            running_version = self.records.running_version(connection, name)
            assert running_version is not None
            running = configs.version(connection, name, running_version)
            assert running is not None
            restart = needs_restart(running.effective, running.config, new_effective, config_json)
            self.records.set_latest(connection, vm.id, number, restart_required=restart)
        else:
            restart = False
            held_now = self._held_now(session, name, effective, vmm)
            self.records.set_latest(
                connection, vm.id, number, restart_required=False, held_now=held_now
            )
        created = configs.version(connection, name, number)
        assert created is not None
        return Patched(created, True, restart, emptied)

    def _address_for(
        self, session: Session, vm: Holding, plan: VMPlan, *, vmm_runs: bool
    ) -> tuple[EffectiveNetwork, Emptied]:
        """The address a new version needs, held now: the VM's own when it fits, else a new
        one (`reserved` while a VMM runs an older version, else `current`); what no version
        the VM runs or will run needs is released."""
        effective = plan.network
        leases = alloc.leases_of(session, vm.id)
        current, reserved = leases.get(alloc.CURRENT), leases.get(alloc.RESERVED)
        emptied: Emptied = []

        def release(purpose: str) -> None:
            emptied.extend(self._release(session, vm, purpose))

        if plan.net.ipam is IPAM.NONE:
            if reserved is not None:
                release(alloc.RESERVED)
            if current is not None and not vmm_runs:
                release(alloc.CURRENT)
            return effective, emptied
        assert effective.subnet is not None
        if not vmm_runs:  # nothing runs with them: leases on other subnets go before the new
            for lease in (reserved, current):  # network is judged (it may overlap theirs)
                if lease is not None and lease.subnet != str(effective.subnet):
                    release(lease.purpose)
            leases = alloc.leases_of(session, vm.id)
            current, reserved = leases.get(alloc.CURRENT), leases.get(alloc.RESERVED)
        network = self._network_of(session, effective)
        requested = effective.ip if plan.net.ipam is IPAM.MANUAL else None

        def fits(lease: alloc.Lease | None) -> bool:
            return (
                lease is not None
                and lease.network_id == network.id
                and requested in (None, lease.ip)
            )

        if fits(current):
            assert current is not None
            if reserved is not None:
                release(alloc.RESERVED)
            return effective.with_ip(current.ip), emptied
        if fits(reserved):
            assert reserved is not None
            if not vmm_runs:  # nothing runs with the current one: the reserved one replaces it
                emptied += alloc.promote_reserved(session, vm, keep_network=DEFAULT_NETWORK)
            return effective.with_ip(reserved.ip), emptied
        # a new address: leases on other networks go first (their networks may go with
        # them), one on this network is swapped by the allocation or released after it (so
        # this network is never left empty and removed under the new lease)
        purpose = alloc.RESERVED if vmm_runs else alloc.CURRENT
        replaced = [reserved] if vmm_runs else [current, reserved]
        for lease in replaced:
            if lease is not None and lease.network_id != network.id:
                release(lease.purpose)
        ip = alloc.allocate_ip(session, network, vm.id, requested, purpose=purpose)
        if not vmm_runs and reserved is not None and reserved.network_id == network.id:
            release(alloc.RESERVED)
        return effective.with_ip(ip), emptied


def _on_demand_id(network: alloc.NetworkRow | None) -> int | None:
    return network.id if network is not None and network.kind == alloc.ON_DEMAND else None


def _unregistered(name: str) -> InvalidError:
    return InvalidError.at(
        "network.network",
        f"network {name!r} is no longer registered; roost network create {name} makes it "
        "again, or patch the VM's network",
    )


def _required(kernel: Path | None) -> Path:
    assert kernel is not None, "check_launchable makes sure a kernel is known"
    return kernel
