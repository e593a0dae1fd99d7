"""The hosts of a cluster as an operator sees and steers them: list, show, cordon, uncordon,
drain. All of it is the database's: any agent answers, and none needs the host it is about to
be reachable (an offline host can be cordoned and drained too).

A drain cordons the host first, in a transaction of its own, so that no create places a VM
there from then on (`Hosts.reserve` refuses a cordoned host, whatever a placement's snapshot
said). Then each of its VMs that has no VMM and no disk copy there has its record moved to
another host chosen as a create's would be (`roost.state.moves`); the others stay, each with
the reason. A moved VM's run dir on the old host (its console log) is that host's to clean:
its recovery removes run dirs of no VM of its own.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Any

from roost.engine.allocation import Allocator
from roost.engine.events import EventBus
from roost.engine.networks import lookup_in
from roost.engine.settings import Settings
from roost.errors import ConflictError, NotFoundError, RoostError
from roost.plan import plan_vm
from roost.plan.needs import need_of, uses_vsock
from roost.plan.placement import Need, chosen, place
from roost.plan.registry import NetworkKind
from roost.spec import Manifest, VMConfig
from roost.state import configs, moves
from roost.state.db import Database
from roost.state.hosts import HostRecord, Hosts, no_host
from roost.state.moves import HostedVM, LeftHostError, NoRoomError
from roost.state.vms import VMStatus

log = logging.getLogger("roost.hosts")

DISK_COPY = "has a disk copy on this host"
PLACEMENTS = 3  # placements tried on fresh snapshots while candidates fill up under it


def not_in_cluster() -> NotFoundError:
    return NotFoundError(
        "this daemon is not part of a cluster (it runs on SQLite, on its own host): it has no "
        "hosts to show or steer; serve with --database-url postgresql+psycopg://... and the "
        "cluster flags to make it one"
    )


class HostAdmin:
    """List, show, cordon, uncordon and drain the cluster's hosts; under SQLite there are
    none (`list` is empty, the rest 404)."""

    def __init__(
        self, settings: Settings, db: Database, events: EventBus, allocator: Allocator
    ) -> None:
        self.cluster = settings.cluster
        self.hosts = Hosts(db)
        self.db = db
        self.events = events
        self.allocator = allocator

    @property
    def offline_after(self) -> float:
        if self.cluster is None:
            raise not_in_cluster()
        return self.cluster.offline_after

    def list(self) -> list[dict[str, Any]]:
        if self.cluster is None:
            return []
        return [host.json() for host in self.hosts.list(self.cluster.offline_after)]

    def show(self, name: str) -> dict[str, Any]:
        return self.hosts.get(name, self.offline_after).json()

    def cordon(self, name: str, cordoned: bool) -> dict[str, Any]:
        """Stop (or resume) placing VMs on host `name`; event `host.cordoned` (or
        `host.uncordoned`) when that changed it."""
        return self._cordon(name, cordoned).json()

    def _cordon(self, name: str, cordoned: bool) -> HostRecord:
        offline_after = self.offline_after
        changed = self.db.transact_core(lambda c: moves.set_cordoned(c, name, cordoned))
        if changed is None:
            raise no_host(name)
        if changed:
            kind = "host.cordoned" if cordoned else "host.uncordoned"
            log.info("%s: host %s", kind, name)
            self.events.publish(kind, host=name)
        return self.hosts.get(name, offline_after)

    def drain(self, name: str) -> dict[str, Any]:
        """Cordon host `name`, then move the records of its VMs that can move to other hosts:
        `{"host", "moved": [{"vm", "to"}], "stayed": [{"vm", "reason"}]}`."""
        host = self._cordon(name, True)
        with self.db.read() as session:
            hosted = moves.vms_on(session, host.id)
        moved: list[dict[str, str]] = []
        stayed: list[dict[str, str]] = []
        for vm in hosted:
            try:
                to, reason = self._move(host, vm)
            except RoostError as error:
                to, reason = None, error.message
            if to is not None:
                log.info("drain %s: moved VM %s to host %s", name, vm.name, to)
                moved.append({"vm": vm.name, "to": to})
            elif reason is not None:
                stayed.append({"vm": vm.name, "reason": reason})
        return {"host": self.show(name), "moved": moved, "stayed": stayed}

    def _move(self, host: HostRecord, vm: HostedVM) -> tuple[str | None, str | None]:
        """Where `vm` went, or why it stayed (neither: it left the host meanwhile)."""
        reason = moves.unmovable(vm.status)
        if reason is not None:
            return None, reason
        if vm.local_networks:
            networks = ", ".join(vm.local_networks)
            return None, f"holds an address on this host's own network(s) {networks}"
        need = self._need(vm)
        if need is None:
            return None, DISK_COPY
        offline_after = self.offline_after
        for _ in range(PLACEMENTS):
            snapshot = [h for h in self.hosts.snapshot(offline_after) if h.id != host.id]
            try:
                candidates = chosen(place(snapshot, need), need)
            except ConflictError as error:
                return None, f"no other host can take it: {error.message}"
            for candidate in candidates:
                try:
                    why = self.db.transact(
                        partial(
                            moves.move,
                            vm=vm,
                            source=host.id,
                            target=candidate.host_id,
                            vcpus=need.vcpus,
                            memory_mib=need.memory_mib,
                            offline_after=offline_after,
                        )
                    )
                except NoRoomError:
                    continue  # filled up (or went away) since the snapshot: the next one
                except LeftHostError:
                    return None, None
                return (candidate.name, None) if why is None else (None, why)
            # every candidate filled up since the snapshot: place again on a fresh one
        return None, "no other host has room for it now (they filled up while it moved)"

    def _need(self, vm: HostedVM) -> Need | None:
        """What `vm` asks of a host, as its create did (its latest config, what it holds of
        its host); None when it has a disk copy on its host: a VM that has booted once from a
        plugin with a rootfs (`roost.engine.disks`), which a record's move would leave
        behind."""
        with self.db.read() as session:
            connection = session.connection()
            versions = configs.history(connection, vm.name)
            if not versions:
                raise NotFoundError(f"VM {vm.name!r} has no config version")
            booted = vm.status != VMStatus.CREATED
            if booted and any("rootfs" in version.artifacts for version in versions):
                return None
            latest = versions[0]
            config = VMConfig.model_validate(latest.config)
            manifest = Manifest.model_validate(latest.manifest)
            lookup = lookup_in(session, anywhere=True)  # where it goes needs its externals
            plan = plan_vm(vm.name, manifest, config, self.allocator.default, lookup)
            registered_cni = {
                name
                for name in _cni_names(plan)
                if (found := lookup(name)) is not None and found.kind is NetworkKind.CNI
            }
        need = need_of(
            plan,
            self.allocator.vmm_of(config),
            vsock=uses_vsock(plan, config.vsock_services),
            registered_cni=registered_cni,
        )
        if vm.reserved_vcpus is None:
            return need
        return dataclasses.replace(
            need, vcpus=vm.reserved_vcpus, memory_mib=vm.reserved_memory_mib or 0
        )


def _cni_names(plan: Any) -> list[str]:
    return [
        interface.effective.cni.network
        for interface in plan.interfaces.interfaces
        if interface.effective.cni is not None
    ]
