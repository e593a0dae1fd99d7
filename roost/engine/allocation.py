"""Plans and holdings: what a VM's config resolves to, whether it can run here, and what it
holds for it — per interface an address, a MAC, a tap name and an IPv6 address; a CID — at
create, at start and at a config patch. Every VM is a list of interfaces (the single `network`
form is one, vsock none), so there is one code path for all.

Every function here runs inside the caller's write transaction, so what a VM holds is
committed with its record, or not at all. No host work happens inside it: a launch gets the
taps to make (`Booting.taps`), made once the transaction has committed, so the write lock is
held only for the database's own work and creates issued together proceed together.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from roost.engine.cni import Added
from roost.engine.hostnet import ALLOW_BOTH, Emptied, TapPlan, tap_policies
from roost.engine.launch import Files, launch_spec
from roost.engine.networks import lookup_in, missing_network_errors
from roost.engine.policies import missing_policy_errors
from roost.engine.settings import DEFAULT_NETWORK, Settings
from roost.errors import ConflictError, InvalidError
from roost.host.cni import vm_namespace
from roost.host.netns import netns_path
from roost.plan import IPAM, Attachment, DefaultNetwork, VMPlan, plan_vm
from roost.plan.interfaces import EffectiveInterface, ResolvedInterfaces
from roost.plan.network import EffectiveNetwork
from roost.plan.policy import TapPolicies
from roost.plan.registry import NetworkLookup
from roost.plan.vm import effective_json, needs_restart
from roost.spec import Manifest, VMConfig, VMConfigPatch
from roost.state import alloc, configs, reservations
from roost.state.artifacts import ArtifactStore
from roost.state.configs import ConfigVersion
from roost.state.db import Database
from roost.state.models import VM
from roost.state.vms import (
    Holding,
    StoredInterface,
    StoredNetwork,
    VMRecords,
    VMStatus,
    no_vm,
)
from roost.vmm.base import NIC, Driver, Early, LaunchSpec, RunDir


@dataclass(frozen=True)
class Booting:
    """What a starting VM holds, as the launch needs it (read once, in the allocating
    transaction; `interfaces` have their addresses and MACs filled in), the config version it
    boots, and what of its launch is already under way: the VMM started early. `watched` are
    the (index, tap, MAC) of the interfaces whose guest address the host learns by watching;
    `taps` the taps to make on their bridges, with their rules and policies, once the
    allocation has committed (its leases then keep their bridges); `cni_taps` the (index, tap)
    of its cni interfaces, made in its namespace before it boots."""

    name: str
    version: int
    spec: LaunchSpec
    interfaces: ResolvedInterfaces
    artifacts: dict[str, Any]
    vmm: str
    watched: tuple[tuple[int, str, str], ...]
    vsock_missing: str | None
    early: Early | None
    shown: dict[str, Any]  # what of its view cannot change while its VMM runs
    services: dict[int, str]  # its vsock_services: guest port -> the host service it reaches
    taps: tuple[TapPlan, ...] = ()
    cni_taps: tuple[tuple[int, str], ...] = ()


TapsPolicies = dict[str, TapPolicies | None]  # tap → what it is attached to (None: nothing)


@dataclass(frozen=True)
class Patched:
    """The outcome of a patch: the latest version (new, or the current one when the patch
    changed nothing), whether the VM's VMM must restart to run it, the networks the patch
    left without leases (whose bridges go once it has committed), and — when it changes the
    policies of a VM whose taps exist, with no restart needed — each tap's policies now and
    before (the record already says now; the taps are to be made to)."""

    version: ConfigVersion
    created: bool
    restart_required: bool
    emptied: Emptied
    policies: TapsPolicies = field(default_factory=dict)
    policies_before: TapsPolicies = field(default_factory=dict)


class Allocator:
    """Plans VMs against the daemon's defaults and the host, and allocates for them."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        records: VMRecords,
        drivers: Mapping[str, Driver],
        store: ArtifactStore,
        disk_path: Callable[[str], Path],
        run_dir: Callable[[str], RunDir],
    ) -> None:
        self.settings = settings
        self.default = DefaultNetwork.from_cidr(
            settings.default_subnet, cluster=settings.cluster is not None
        )
        self.db = db
        self.records = records
        self.drivers = drivers
        self.store = store
        self._disk_path = disk_path
        self._run_dir = run_dir
        self.kept_orphans: set[str] = set()  # run dirs where VMMs no VM accounts for were kept

    # ---- judging ------------------------------------------------------------------------

    def lookup(self, session: Session) -> NetworkLookup:
        """The networks a config may name, as this host sees them (its own external ones
        first, in a cluster)."""
        return lookup_in(session, self.records.host_id)

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
        for interface in plan.interfaces.interfaces:
            on_dhcp_bridge = (
                interface.plan.attach is Attachment.EXTERNAL and interface.effective.network is None
            )
            if on_dhcp_bridge and self.settings.dhcp_bridge is None:
                raise InvalidError.at(
                    f"{_where(plan.interfaces, interface)}.mode",
                    "dhcp VMs need a bridge with a DHCP server behind it, and this daemon has "
                    "none: restart it with --dhcp-bridge NAME, or choose vsock or bridged",
                )
        if "kernel" not in artifacts and self.settings.kernel is None:
            raise InvalidError.at(
                "kernel",
                f"plugin {manifest.name} names no kernel and the daemon has no default; "
                "add a kernel to the manifest or start the daemon with --kernel PATH",
            )
        self.drivers[vmm].check_available()

    # ---- create, start, forget ----------------------------------------------------------

    def record_new(
        self,
        session: Session,
        name: str,
        config: VMConfig,
        vmm: str,
        early: Early | None,
        launch: bool,
        cni: Mapping[int, Added] | None = None,
    ) -> Booting:
        """Record a new VM (`starting` when a `launch` follows, else `created`), allocate what
        its plan needs (its cni interfaces with what ADD gave them, `cni`), and record its
        first config version."""
        connection = session.connection()
        if not launch:
            self.records.check_new(connection, name)
        plugin = self.records.plugin(connection, config.plugin)
        manifest = Manifest.model_validate(plugin.manifest)
        plan = plan_vm(name, manifest, config, self.default, self.lookup(session))
        check_policies_exist(session, plan, self.records.host_id)
        self.check_launchable(plan, manifest, plugin.artifacts, vmm)
        status = VMStatus.STARTING if launch else VMStatus.CREATED
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
            launch,
            shown,
            cni,
            new=True,
        )
        configs.add(
            connection,
            vm.id,
            1,
            config=config_json,
            manifest=plugin.manifest,
            artifacts=plugin.artifacts,
            effective=_effective(plan, booting.interfaces, vmm),
        )
        if vm.host_id is not None:  # last: the host's row stays locked until the commit
            reservations.reserve(
                connection,
                vm.id,
                vm.host_id,
                plan.resources.vcpus,
                plan.resources.memory_mib,
                self._offline_after,
            )
        return booting

    @property
    def _offline_after(self) -> float:
        cluster = self.settings.cluster
        assert cluster is not None, "only a cluster's VMs have a host"
        return cluster.offline_after

    def for_start(
        self,
        session: Session,
        name: str,
        latest: ConfigVersion,
        early: Early | None,
        cni: Mapping[int, Added] | None = None,
    ) -> tuple[Booting, Emptied]:
        """A start of the latest version: the address a patch reserved becomes the VM's
        own (its old one released), then everything the plan needs is held (its cni
        interfaces with what ADD gave them, `cni`)."""
        manifest = Manifest.model_validate(latest.manifest)
        config = VMConfig.model_validate(latest.config)
        vmm = self.vmm_of(config)
        plan = plan_vm(name, manifest, config, self.default, self.lookup(session))
        shown = {"plugin": config.plugin, "config": latest.config, "manifest": latest.manifest}
        vm = self.records.holding(session.connection(), name)
        emptied: Emptied = []
        for index, purpose in alloc.leases_of(session, vm.id):
            if purpose == alloc.RESERVED:
                emptied += alloc.promote_reserved(
                    session, vm, keep_network=DEFAULT_NETWORK, interface=index
                )
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
            True,
            shown,
            cni,
        )
        return booting, emptied + more

    def prepare_start(self, name: str, latest: ConfigVersion) -> str:
        """Judge the latest version before anything is done for its start; its VMM kind."""
        manifest = Manifest.model_validate(latest.manifest)
        config = VMConfig.model_validate(latest.config)
        vmm = self.vmm_of(config)
        with self.db.read() as session:
            plan = plan_vm(name, manifest, config, self.default, self.lookup(session))
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
        launch: bool,
        shown: dict[str, Any],
        cni: Mapping[int, Added] | None = None,
        *,
        new: bool = False,
    ) -> tuple[Booting, Emptied]:
        """Make the VM hold what its plan needs, and nothing else: per interface an address
        (bridged), a MAC, a tap name and an IPv6 address; a CID; record them, the interfaces
        it is planned with and `status`. Also says which networks it left. With `launch`, the
        taps to make once this has committed are in `Booting.taps`. A cni interface takes the
        MAC and addresses ADD gave it (`cni`); its tap is the caller's. A `new` VM (recorded in
        this transaction) holds nothing yet: its leases and NICs are not read."""
        wanted = plan.interfaces.interfaces
        emptied: Emptied = []
        # read once: each interface's release or allocation below touches its own index only
        leases = {} if new else alloc.leases_of(session, vm.id)
        for index, purpose in leases:
            if index >= len(wanted):  # an interface a patch dropped
                emptied += self._release(session, vm, purpose, index)
        filled: list[EffectiveInterface] = []
        stored: list[StoredInterface] = []
        nics: list[NIC] = []
        watched: list[tuple[int, str, str]] = []
        cni_taps: list[tuple[int, str]] = []
        taps: list[TapPlan] = []
        for wanted_one in wanted:
            where = _where(plan.interfaces, wanted_one)
            current = leases.get((wanted_one.index, alloc.CURRENT))
            interface, bridge, nic, network, more = self._hold(
                session, vm, wanted_one, where, current, new=new
            )
            emptied += more
            added = (cni or {}).get(interface.index)
            if added is not None:
                interface = interface.with_cni_result(added.result, added.position, vm.name)
                cni_taps.append((interface.index, nic.tap))
            filled.append(interface)
            stored.append(_stored_interface(interface, bridge))
            if launch and interface.plan.tap and not interface.plan.netns:
                taps.append(self._tap_plan(interface, nic, bridge, network, vmm))
            if interface.plan.nic:
                nics.append(NIC(tap=nic.tap, mac=nic.mac if added is None else added.mac))
            if interface.plan.observe_ip:
                watched.append((interface.index, nic.tap, nic.mac))
        if not new:
            alloc.release_nics_from(session, vm, len(wanted))
        resolved = plan.interfaces.replaced(tuple(filled))
        cid = alloc.allocate_cid(session, vm, new=new)
        vsock_missing = self._vsock_missing(vmm)
        vsock_backend = None if vsock_missing else self.drivers[vmm].vsock_backend()
        self.records.set_planned(
            session.connection(),
            vm.id,
            status=status,
            network=StoredNetwork(resolved.network, tuple(stored)),
            vmm=vmm,
            vsock_unavailable=vsock_missing,
            vsock_backend=vsock_backend,
            new=new,
        )
        files = Files(
            kernel=self.artifact_path(artifacts, "kernel") or _required(self.settings.kernel),
            initrd=self.artifact_path(artifacts, "initramfs"),
            disk=self._disk_path(vm.name) if "rootfs" in artifacts else None,
        )
        spec = launch_spec(
            plan,
            manifest,
            config,
            files,
            self._run_dir(vm.name),
            network_args=resolved.boot_args(vm.name),
            nics=tuple(nics),
            cid=cid,
            vsock_backend=vsock_backend,
            netns=netns_path(vm_namespace(vm.name)) if resolved.netns else None,
        )
        booting = Booting(
            name=vm.name,
            version=version,
            spec=spec,
            interfaces=resolved,
            artifacts=artifacts,
            vmm=vmm,
            watched=tuple(watched),
            vsock_missing=vsock_missing,
            early=early,
            shown={**shown, "cid": cid},
            services=dict(config.vsock_services),
            taps=tuple(taps),
            cni_taps=tuple(cni_taps),
        )
        return booting, emptied

    def _hold(
        self,
        session: Session,
        vm: Holding,
        interface: EffectiveInterface,
        where: str,
        current: alloc.Lease | None,
        *,
        new: bool = False,
    ) -> tuple[EffectiveInterface, str | None, alloc.Nic, alloc.NetworkRow | None, Emptied]:
        """Make one interface hold what it needs to start: its address (its `current` one when
        it still fits), its MAC and tap name, its IPv6 address. The interface so filled in, the
        bridge its tap joins, its NIC, the network it has an address on and the networks its
        old address left. A `new` VM's interface holds nothing yet, so nothing is read."""
        index = interface.index
        emptied: Emptied = []
        if current is not None and (
            interface.plan.ipam is IPAM.NONE or current.subnet != str(interface.subnet)
        ):
            emptied += self._release(session, vm, alloc.CURRENT, index)
        network: alloc.NetworkRow | None = None
        bridge: str | None = None
        if interface.plan.ipam is not IPAM.NONE:
            network = self._network_of(session, interface.effective, where)
            bridge = network.bridge
        elif interface.plan.attach is Attachment.EXTERNAL:
            bridge = self._external_bridge(session, interface.effective, where)
        nic = alloc.hold_nic(session, vm, index, interface.mac, new=new)
        interface = interface.with_mac(nic.mac)
        if network is not None:
            requested = interface.ip if interface.plan.ipam is IPAM.MANUAL else None
            ip = alloc.allocate_ip(session, network, vm.id, requested, interface=index, new=new)
            interface = interface.with_ip(ip, vm.name)
        self._hold_ipv6(session, vm, interface, network, new=new)
        return interface, bridge, nic, network, emptied

    @staticmethod
    def _hold_ipv6(
        session: Session,
        vm: Holding,
        interface: EffectiveInterface,
        network: alloc.NetworkRow | None,
        *,
        new: bool = False,
    ) -> None:
        """Record the IPv6 address the interface holds (none off a network with a prefix)."""
        ipv6 = interface.ipv6_address if network is not None else None
        alloc.hold_ipv6(
            session,
            vm,
            interface.index,
            None if network is None else network.id,
            ipv6,
            network_name=None if network is None else network.name,
            new=new,
        )

    def _tap_plan(
        self,
        interface: EffectiveInterface,
        nic: alloc.Nic,
        bridge: str | None,
        network: alloc.NetworkRow | None,
        vmm: str,
    ) -> TapPlan:
        """One interface's tap: on its bridge, with its own rules (IPv6 let through from its
        own address only on a network with a prefix)."""
        assert bridge is not None
        effective = interface.effective
        gateway = None
        if effective.subnet is not None and effective.gateway is not None:
            gateway = alloc.gateway_interface(effective.gateway, effective.subnet)
        ipv6 = interface.ipv6_address
        return TapPlan(
            tap=nic.tap,
            mac=nic.mac,
            bridge=bridge,
            # only an on-demand network's bridge goes with its last lease
            network_id=_on_demand_id(network),
            network=effective.network,
            attach=interface.plan.attach,
            gateway=gateway,
            antispoof=interface.plan.antispoof,
            ip=None if effective.ip is None else str(effective.ip),
            jailed=vmm == "firecracker" and self.settings.jailer is not None,
            ipv6=None if ipv6 is None else (str(ipv6),),
            policies=interface.policies,
            policy_defaults=interface.policy_defaults or ALLOW_BOTH,
            mtu=effective.mtu,
        )

    def _network_of(
        self, session: Session, effective: EffectiveNetwork, where: str
    ) -> alloc.NetworkRow:
        """The network a bridged interface takes its address on: the one it names, or the one
        its subnet is (made on demand)."""
        assert effective.subnet is not None and effective.gateway is not None
        if effective.network is None:
            return alloc.ensure_network(session, effective.subnet, effective.gateway)
        found = alloc.network_by_name(session, effective.network, self.records.host_id)
        if found is None:
            raise _unregistered(effective.network, where)
        return found

    def _external_bridge(
        self, session: Session, effective: EffectiveNetwork, where: str
    ) -> str | None:
        """The operator's bridge an interface joins: its named network's, else
        --dhcp-bridge's."""
        if effective.network is None:
            return self.settings.dhcp_bridge
        found = self.lookup(session)(effective.network)
        if found is None:
            raise _unregistered(effective.network, where)
        return found.bridge

    def forget(self, session: Session, name: str) -> Emptied:
        """Delete the VM's record and release every address its interfaces hold."""
        emptied: Emptied = []

        def release(vm: alloc.Holder) -> None:
            held = sorted(alloc.leases_of(session, vm.id), key=lambda key: key[1] != "reserved")
            for index, purpose in held:
                emptied.extend(self._release(session, vm, purpose, index))
            reservations.release(session.connection(), vm.id)

        self.records.delete(session, name, release)
        return emptied

    def _release(
        self, session: Session, vm: alloc.Holder, purpose: str = alloc.CURRENT, index: int = 0
    ) -> Emptied:
        """Release the address interface `index` holds for `purpose`; the networks that leaves
        empty."""
        return alloc.release_address(
            session, vm, keep_network=DEFAULT_NETWORK, purpose=purpose, interface=index
        )

    def _vsock_missing(self, vmm: str) -> str | None:
        return self.drivers[vmm].vsock_unavailable()

    def _held_now(self, session: Session, resolved: ResolvedInterfaces, vmm: str) -> dict[str, Any]:
        """The record values that say what a VM with no VMM has now (what its next start
        uses): its interfaces, with the bridges they attach to, its VMM and whether that VMM
        gives it a vsock device."""
        stored = []
        for interface in resolved.interfaces:
            effective, bridge = interface.effective, None
            if interface.plan.attach is Attachment.EXTERNAL:
                where = _where(resolved, interface)
                bridge = self._external_bridge(session, effective, where)
            elif effective.subnet is not None:
                network = alloc.network_by_subnet(session, effective.subnet)
                bridge = None if network is None else network.bridge
            stored.append(_stored_interface(interface, bridge))
        return {
            "network": StoredNetwork(resolved.network, tuple(stored)).to_json(),
            "vmm_kind": vmm,
            "vsock_unavailable": self._vsock_missing(vmm),
        }

    def artifact_path(self, artifacts: dict[str, Any], role: str) -> Path | None:
        item = artifacts.get(role)
        return None if item is None else self.store.path(item["sha256"])

    def latest_planned(self, session: Session, name: str) -> tuple[dict[str, Any], Emptied]:
        """For a VM whose VMM has just ended: when it ran an older version than its latest,
        the addresses that version does not need are released (a reserved one becomes its
        interface's own), and the record values that make it show (and next start) its latest —
        its interfaces with the addresses that version was given, its VMM and its vsock
        availability; else only its interfaces without the CNI results of its run, which DEL
        has given back. Also the networks left without leases."""
        connection = session.connection()
        running = self.records.running_version(connection, name)
        latest = configs.latest(connection, name)
        if running is None or latest is None or latest.version == running:
            return _without_cni_results(session, name), []
        manifest = Manifest.model_validate(latest.manifest)
        config = VMConfig.model_validate(latest.config)
        # every network its latest version names stays registered while it does
        plan = plan_vm(name, manifest, config, self.default, self.lookup(session))
        vm = self.records.holding(connection, name)
        wanted = plan.interfaces.interfaces
        emptied: Emptied = []
        for index, purpose in sorted(alloc.leases_of(session, vm.id)):
            if index >= len(wanted) or wanted[index].plan.ipam is IPAM.NONE:
                emptied += self._release(session, vm, purpose, index)
            elif purpose == alloc.RESERVED:
                emptied += alloc.promote_reserved(
                    session, vm, keep_network=DEFAULT_NETWORK, interface=index
                )
        leases = alloc.leases_of(session, vm.id)
        nics = alloc.nics_of(session, vm.id)
        filled = []
        for interface in wanted:
            lease = leases.get((interface.index, alloc.CURRENT))
            filled.append(_as_held(interface, lease, nics.get(interface.index), name))
        alloc.release_nics_from(session, vm, len(wanted))
        resolved = plan.interfaces.replaced(tuple(filled))
        return self._held_now(session, resolved, str(latest.effective["vmm"])), emptied

    # ---- patches ------------------------------------------------------------------------

    def patch(
        self, session: Session, name: str, patch: VMConfigPatch, *, vmm_runs: bool
    ) -> Patched:
        """Store the config `patch` makes of the VM's latest version as a new version,
        validated exactly as a create is, with the address it needs reserved at once (a taken
        manual address, an overlapping subnet or a full one refuse the patch and change
        nothing). What the VM no longer needs is released now when no VMM runs; a running
        VM keeps its current address until its next start. A running VM whose new version
        needs no restart but changes its taps' policies runs that version at once: its record
        takes the new policies (`Patched.policies` says what the caller makes its taps take)."""
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
        plan = plan_vm(name, manifest, config, self.default, self.lookup(session))
        check_policies_exist(session, plan, self.records.host_id)
        vmm = self.vmm_of(config)
        self.check_launchable(plan, manifest, latest.artifacts, vmm)
        resolved, emptied = self._addresses_for(session, vm, plan, vmm_runs=vmm_runs)
        number = latest.version + 1
        new_effective = _effective(plan, resolved, vmm)
        configs.add(
            connection,
            vm.id,
            number,
            config=config_json,
            manifest=latest.manifest,
            artifacts=latest.artifacts,
            effective=new_effective,
        )
        self._resize(connection, vm, plan)
        if vmm_runs:
            running_version = self.records.running_version(connection, name)
            assert running_version is not None
            running = configs.version(connection, name, running_version)
            assert running is not None
            restart = needs_restart(running.effective, running.config, new_effective, config_json)
            change = None if restart else _policy_change(session, vm, resolved)
            # its taps take the new policies now: the VM runs the new version from then on
            live = (
                {}
                if change is None
                else {"network": change.network.to_json(), "running_version": number}
            )
            self.records.set_latest(
                connection, vm.id, number, restart_required=restart, held_now=live
            )
            if change is not None:
                created = configs.version(connection, name, number)
                assert created is not None
                return Patched(created, True, False, emptied, change.after, change.before)
        else:
            restart = False
            held_now = self._held_now(session, resolved, vmm)
            self.records.set_latest(
                connection, vm.id, number, restart_required=False, held_now=held_now
            )
        created = configs.version(connection, name, number)
        assert created is not None
        return Patched(created, True, restart, emptied)

    def _resize(self, connection: Connection, vm: Holding, plan: VMPlan) -> None:
        """A placed VM holds its new version's resources of its host from the patch on (409
        `no_capacity` when the host has no room for more)."""
        if vm.host_id is not None:
            resources = plan.resources
            reservations.resize(
                connection, vm.id, resources.vcpus, resources.memory_mib, self._offline_after
            )

    def _addresses_for(
        self, session: Session, vm: Holding, plan: VMPlan, *, vmm_runs: bool
    ) -> tuple[ResolvedInterfaces, Emptied]:
        """The addresses, MACs and IPv6 addresses a new version's interfaces need, held now
        (a patch's `interfaces` replace the list as a whole; MACs stay with their index). What
        no version the VM runs or will run needs is released: an interface the patch dropped
        lets go of its addresses now when no VMM runs, else at the next start."""
        wanted = plan.interfaces.interfaces
        emptied: Emptied = []
        for (index, purpose), lease in sorted(alloc.leases_of(session, vm.id).items()):
            dropped = index >= len(wanted) or wanted[index].plan.ipam is IPAM.NONE
            if dropped and (purpose == alloc.RESERVED or not vmm_runs):
                emptied += self._release(session, vm, purpose, index)
            elif not vmm_runs and lease.subnet != str(wanted[index].subnet):
                # nothing runs with it: it goes before the new network is judged (which may
                # overlap its own)
                emptied += self._release(session, vm, purpose, index)
        filled = []
        for planned in wanted:
            nic = alloc.hold_nic(session, vm, planned.index, planned.mac, record=not vmm_runs)
            interface = planned.with_mac(planned.mac or nic.roost_mac)
            network = None
            if interface.plan.ipam is not IPAM.NONE:
                where = _where(plan.interfaces, interface)
                network = self._network_of(session, interface.effective, where)
                ip, more = self._address_for(session, vm, interface, network, vmm_runs=vmm_runs)
                emptied += more
                interface = interface.with_ip(ip, vm.name)
            if vmm_runs:
                self._check_ipv6(session, vm, interface, network)
            else:
                self._hold_ipv6(session, vm, interface, network)
            filled.append(interface)
        if not vmm_runs:
            alloc.release_nics_from(session, vm, len(wanted))
        return plan.interfaces.replaced(tuple(filled)), emptied

    @staticmethod
    def _check_ipv6(
        session: Session,
        vm: Holding,
        interface: EffectiveInterface,
        network: alloc.NetworkRow | None,
    ) -> None:
        """A patch of a running VM: its interface's new IPv6 address must be free (it is held
        at the next start)."""
        ipv6 = interface.ipv6_address if network is not None else None
        if ipv6 is not None and network is not None:
            alloc.check_ipv6_free(session, vm, interface.index, network.id, ipv6, network.name)

    def _address_for(
        self,
        session: Session,
        vm: Holding,
        interface: EffectiveInterface,
        network: alloc.NetworkRow,
        *,
        vmm_runs: bool,
    ) -> tuple[ipaddress.IPv4Address, Emptied]:
        """The address one interface of a new version needs, held now: its own when it fits,
        else a new one (`reserved` while a VMM runs an older version, else `current`)."""
        index = interface.index
        leases = alloc.leases_of(session, vm.id)
        current, reserved = leases.get((index, alloc.CURRENT)), leases.get((index, alloc.RESERVED))
        emptied: Emptied = []

        def release(purpose: str) -> None:
            emptied.extend(self._release(session, vm, purpose, index))

        requested = interface.ip if interface.plan.ipam is IPAM.MANUAL else None

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
            return current.ip, emptied
        if fits(reserved):
            assert reserved is not None
            if not vmm_runs:  # nothing runs with the current one: the reserved one replaces it
                emptied += alloc.promote_reserved(
                    session, vm, keep_network=DEFAULT_NETWORK, interface=index
                )
            return reserved.ip, emptied
        # a new address: leases on other networks go first (their networks may go with
        # them), one on this network is swapped by the allocation or released after it (so
        # this network is never left empty and removed under the new lease)
        purpose = alloc.RESERVED if vmm_runs else alloc.CURRENT
        replaced = [reserved] if vmm_runs else [current, reserved]
        for lease in replaced:
            if lease is not None and lease.network_id != network.id:
                release(lease.purpose)
        ip = alloc.allocate_ip(session, network, vm.id, requested, purpose=purpose, interface=index)
        if not vmm_runs and reserved is not None and reserved.network_id == network.id:
            release(alloc.RESERVED)
        return ip, emptied


def check_policies_exist(session: Session, plan: VMPlan, host_id: int | None = None) -> None:
    """Every policy and registered network the VM's interfaces name (its host `host_id`'s
    own or the cluster's) is stored (422 at each that is not), and stays so until the
    transaction ends: their rows are locked FOR KEY SHARE, so a `policy rm` or `network rm`
    racing this create or patch sees its VM."""
    missing = missing_policy_errors(session, plan.interfaces)
    missing += missing_network_errors(session, plan.interfaces, host_id)
    if missing:
        raise InvalidError.of(missing)


@dataclass(frozen=True)
class PolicyChange:
    """A running VM's policies as a patch changes them at once: its record's interfaces with
    the new policies, and each tap's attachment before and after."""

    network: StoredNetwork
    before: TapsPolicies
    after: TapsPolicies


def _policy_change(
    session: Session, vm: Holding, resolved: ResolvedInterfaces
) -> PolicyChange | None:
    """What a patch needing no restart changes of the policies on a running VM's taps (the
    same interfaces, so index for index); None when it changes none."""
    data = session.execute(select(VM.network).where(VM.id == vm.id)).scalar()
    stored = StoredNetwork.from_json(data or {})
    if stored is None:
        return None
    nics = alloc.nics_of(session, vm.id)
    before: TapsPolicies = {}
    after: TapsPolicies = {}
    interfaces = []
    for held, wanted in zip(stored.interfaces, resolved.interfaces, strict=True):
        effective = replace(
            held.effective, policies=wanted.policies, policy_defaults=wanted.policy_defaults
        )
        interfaces.append(replace(held, effective=effective))
        nic = nics.get(held.index)
        if held.plan.tap and nic is not None:
            tap = nic.tap
            before[tap] = tap_policies(tap, held.effective.policies, held.effective.policy_defaults)
            after[tap] = tap_policies(tap, wanted.policies, wanted.policy_defaults)
    single = stored.network
    if single is not None and resolved.network is not None:
        single = replace(
            single,
            policies=resolved.network.policies,
            policy_defaults=resolved.network.policy_defaults,
        )
    network = StoredNetwork(single, tuple(interfaces))
    if network == stored:
        return None
    return PolicyChange(network, before, after)


def _without_cni_results(session: Session, name: str) -> dict[str, Any]:
    """The record value that shows a cni VM whose VMM has ended without the MACs and
    addresses ADD gave its interfaces (nothing for a VM that has no CNI result)."""
    stored = StoredNetwork.from_json(
        session.execute(select(VM.network).where(VM.name == name)).scalar() or {}
    )
    if stored is None or not any(held.effective.cni for held in stored.interfaces):
        return {}

    def detached(effective: EffectiveNetwork) -> EffectiveNetwork:
        if effective.cni is None:
            return effective
        return replace(effective, cni=replace(effective.cni, result=None, interface=None))

    interfaces = tuple(
        replace(held, effective=detached(held.effective)) for held in stored.interfaces
    )
    single = None if stored.network is None else detached(stored.network)
    return {"network": StoredNetwork(single, interfaces).to_json()}


def _effective(plan: VMPlan, resolved: ResolvedInterfaces, vmm: str) -> dict[str, Any]:
    """A config version's `effective`: its network (null for several interfaces), resources,
    VMM and interfaces, with the addresses and MACs they were given."""
    return effective_json(plan, resolved.network, vmm, resolved)


def _as_held(
    interface: EffectiveInterface, lease: alloc.Lease | None, nic: alloc.Nic | None, name: str
) -> EffectiveInterface:
    """An interface as it is held: with its current address (when its network gives it one)
    and the MAC roost keeps for it (when the user gives none)."""
    if lease is not None and interface.plan.ipam is not IPAM.NONE:
        interface = interface.with_ip(lease.ip, name)
    if interface.mac is None and nic is not None:
        interface = interface.with_mac(nic.roost_mac)
    return interface


def _stored_interface(interface: EffectiveInterface, bridge: str | None) -> StoredInterface:
    ipv6 = None
    if interface.ipv6_prefix is not None:
        source = "static" if interface.ipv6 is not None else "slaac"
        ipv6 = {"prefix": str(interface.ipv6_prefix), "source": source}
    return StoredInterface(
        index=interface.index,
        name=interface.name,
        default_route=interface.default_route,
        effective=interface.effective,
        plan=interface.plan,
        bridge=bridge,
        ipv6=ipv6,
    )


def _on_demand_id(network: alloc.NetworkRow | None) -> int | None:
    return network.id if network is not None and network.kind == alloc.ON_DEMAND else None


def _where(resolved: ResolvedInterfaces, interface: EffectiveInterface) -> str:
    """Where an interface's errors go: `network` for the single form, else its place in
    `interfaces`."""
    return "network" if resolved.single else f"interfaces.{interface.index}"


def _unregistered(name: str, where: str) -> InvalidError:
    return InvalidError.at(
        f"{where}.network",
        f"network {name!r} is no longer registered; roost network create {name} makes it "
        "again, or patch the VM's network",
    )


def _required(kernel: Path | None) -> Path:
    assert kernel is not None, "check_launchable makes sure a kernel is known"
    return kernel
