"""A daemon's start-up: prove it is alone, then build the engine and its collaborators.

A daemon locks its network namespace, its run dir and its state dir before it touches anything
else; a daemon refused any of them changes nothing and leaves nothing (a directory it made only
to lock it is removed again). Only then does it open the database, check what runs against it
(`Recovery.check`) and build the engine.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

from sqlalchemy import select
from sqlalchemy.orm import Session

from roost.engine.artifact_peers import PeerArtifacts, peers_in
from roost.engine.cluster import Cluster, agent_url
from roost.engine.clusterevents import SharedEventBus
from roost.engine.clusternet import ClusterNetworks
from roost.engine.core import Engine
from roost.engine.disks import Disks
from roost.engine.events import EventBus
from roost.engine.hostnet import HostNetwork
from roost.engine.plugins import Plugins
from roost.engine.recovery import Recovery
from roost.engine.relays import VsockRelays
from roost.engine.settings import DEFAULT_BRIDGE, DEFAULT_NETWORK, Settings
from roost.errors import ConflictError, HostError, InvalidError
from roost.host.firewall import Firewall
from roost.host.links import Links
from roost.host.nat import Masquerade, remove_table
from roost.host.netns import NetnsWorker, namespace_file
from roost.host.observe import LeaseObserver
from roost.host.policy import PolicyFirewall, kernel_gaps
from roost.host.ra import RouterAdverts
from roost.plan import DefaultNetwork
from roost.state import alloc
from roost.state.artifacts import ArtifactStore, is_elf
from roost.state.db import Database, sqlite_url
from roost.state.hosts import Hosts
from roost.state.models import Network
from roost.vmm.base import Driver, RunDir, VsockTarget
from roost.vmm.cloud_hypervisor import CloudHypervisorDriver, find_cloud_hypervisor
from roost.vmm.firecracker import FirecrackerDriver, Jail, find_firecracker
from roost.vmm.qemu import Accel, Machine, QemuDriver, VsockChoice, check_vsock_choice

log = logging.getLogger("roost.daemon")


class Locks:
    """What a daemon must hold alone for its whole life: its network namespace, its run dir
    and its state dir (the kernel releases the locks if the daemon dies)."""

    def __init__(self) -> None:
        self._held: list[int] = []
        self._made: list[Path] = []

    @classmethod
    def acquire(cls, settings: Settings) -> Locks:
        locks = cls()
        try:
            # the namespace itself (its nsfs file) is the lock: nothing is made for it
            locks._lock(
                namespace_file(settings.netns),
                f"another roost daemon manages network namespace {settings.netns or 'of the host'}"
                "; one daemon per namespace",
            )
            locks._lock_dir(
                settings.run_dir,
                f"another roost daemon uses run dir {settings.run_dir} (its VMs' sockets and "
                "status files); give this one its own --run-dir",
            )
            locks._lock_dir(
                settings.state_dir,
                f"another roost daemon uses state dir {settings.state_dir}; stop it, or give "
                "this one its own --state-dir",
            )
        except BaseException:
            locks.release(remove_made=True)
            raise
        settings.state_dir.chmod(0o700)  # the database and the artifacts are root's business
        return locks

    def _lock_dir(self, path: Path, message: str) -> None:
        missing = []
        parent = path
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                continue
            except OSError as error:
                raise HostError(f"cannot make {directory}: {error.strerror}") from None
            self._made.append(directory)
        self._lock(path, message)

    def _lock(self, path: Path, message: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise HostError(f"cannot open {path} to lock it: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConflictError(message, code="locked") from None
        self._held.append(fd)

    def release(self, *, remove_made: bool = False) -> None:
        """Let the locks go; with `remove_made`, remove the (still empty) directories that
        were made only to be locked."""
        while self._held:
            os.close(self._held.pop())
        if remove_made:
            for directory in reversed(self._made):
                with contextlib.suppress(OSError):
                    directory.rmdir()
        self._made.clear()


class Daemon:
    """The engine and everything it was built from, closed in the reverse order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._closers: list[Callable[[], object]] = []
        self.engine: Engine | None = None
        self.recovery: Recovery | None = None
        self.relays: VsockRelays | None = None
        self.cluster: Cluster | None = None  # this agent's membership, in a cluster

    @classmethod
    def open(cls, settings: Settings) -> Daemon:
        """Lock, build and check: a daemon ready to listen, whose recovery has not begun."""
        DefaultNetwork.from_cidr(settings.default_subnet)  # judged before anything is made
        _check_settings(settings)
        daemon = cls(settings)
        locks = Locks.acquire(settings)
        daemon._closers.append(locks.release)
        try:
            daemon._build()
        except BaseException:
            daemon.close()
            raise
        return daemon

    def _build(self) -> None:
        settings = self.settings
        url = settings.database_url or sqlite_url(settings.state_dir)
        db = Database(url if settings.cluster is None else agent_url(url, settings.cluster))
        self._closers.append(db.dispose)
        db.migrate()
        store = ArtifactStore(settings.state_dir / "artifacts")
        store.remove_incomplete()
        worker = NetnsWorker(settings.netns)
        self._closers.append(worker.close)
        jail = _jail(settings)
        links = Links(worker, None if jail is None else (jail.uid, jail.gid))
        self._closers.append(links.close)
        nat = Masquerade(worker) if settings.nat else None
        adverts = RouterAdverts(worker, settings.run_dir)
        self._closers.append(adverts.close)
        if nat is None:
            remove_table(worker)

        def leased(network_id: int) -> bool:
            with db.read() as session:
                return alloc.has_leases(session, network_id)

        def observed(name: str, ip: str) -> None:
            engine.address_observed(name, ip)

        drivers: dict[str, Driver] = {
            "firecracker": FirecrackerDriver(find_firecracker(settings.firecracker), jail),
            "qemu": QemuDriver(
                machine=cast(Machine, settings.qemu_machine),
                accel=cast(Accel, settings.accel),
                vsock=cast(VsockChoice, settings.qemu_vsock),
            ),
            "cloud-hypervisor": CloudHypervisorDriver(
                find_cloud_hypervisor(settings.cloud_hypervisor), settings.chroot
            ),
        }

        def vsock_target(name: str) -> VsockTarget:  # asked per forwarded connection
            return engine.vsock_target(name)

        relays = VsockRelays(db, vsock_target)
        self._closers.append(relays.close)
        events = EventBus()  # one for the daemon's life: its history is what readers resume
        if settings.cluster is not None:  # the cluster's: in the database, tailed by every agent
            shared = SharedEventBus(db, settings.cluster.host_name)
            shared.start()
            self._closers.append(shared.stop)  # after the engine's and the cluster's last events
            events = shared
        policy_gaps = kernel_gaps(worker)
        for gap in policy_gaps:
            log.warning("network policies cannot be enforced here: %s", gap)
        # one firewall: the registry makes policies in it, the host attaches taps to them
        policy_firewall = None if policy_gaps else PolicyFirewall(worker)
        gateways = None if settings.cluster is None else ClusterNetworks(db, settings.cluster)
        missing_artifacts = None
        if settings.cluster is not None:  # a plugin's files this host lacks come from peers
            missing_artifacts = PeerArtifacts(
                store,
                peers_in(Hosts(db), settings.cluster.host_name, settings.cluster.offline_after),
                token=settings.token,
                ca=settings.ca,
            )
        engine = Engine(
            settings,
            db=db,
            store=store,
            plugins=Plugins(db, store, settings.artifact_dirs, events),
            host=HostNetwork(
                links,
                Firewall(worker),
                leased,
                nat,
                adverts,
                policy_firewall,
                policy_gaps,
                gateways,
            ),
            drivers=drivers,
            observer=LeaseObserver(worker, observed, lease_file=settings.dhcp_leases),
            disks=Disks(settings.state_dir / "disks"),
            worker=worker,
            listeners=relays,
            events=events,
            policy_firewall=policy_firewall,
            policy_gaps=policy_gaps,
            missing_artifacts=missing_artifacts,
        )
        self._closers.append(engine.close)
        _ensure_default_network(db, engine.allocator.default)
        engine.networks.restore()
        if settings.cluster is not None:
            # registered before recovery looks at what runs: it ends its lost VMs' VMMs first
            self.cluster = Cluster.open(settings, engine)
            joined = self.cluster.member.membership
            assert joined is not None, "Cluster.open registers this host"
            engine.act_as_host(joined.host_id)
            engine.networks.register_dhcp()  # this host's own: registered once it has an id
            relays.host_id = joined.host_id
            self._closers.append(self.cluster.close)
            self.cluster.start()
        if gateways is not None:  # once this host is registered: it may claim gateways
            gateways.settle = engine.host.settle_gateways
            self._closers.append(gateways.stop)
            gateways.start(worker)
        recovery = Recovery(engine, settings.orphans)
        recovery.check()
        self.engine, self.recovery, self.relays = engine, recovery, relays

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:
                log.exception("closing the daemon: %s failed", closer)


def _check_settings(settings: Settings) -> None:
    dhcp = settings.dhcp_bridge
    if dhcp is not None and (dhcp == DEFAULT_BRIDGE or dhcp.startswith(alloc.BRIDGE_PREFIX)):
        raise InvalidError.at(
            "dhcp_bridge",
            f"{dhcp} is a bridge roost manages; name the operator's bridge that has a "
            "DHCP server behind it",
        )
    kernel = settings.kernel
    if kernel is not None and not is_elf(kernel):
        raise InvalidError.at(
            "kernel", f"{kernel} is not an uncompressed ELF vmlinux (or is not readable)"
        )
    RunDir(settings.run_dir / "vms" / "x", settings.chroot("x")).check_length()
    check_vsock_choice(settings.qemu_vsock)


def _jail(settings: Settings) -> Jail | None:
    """The jailer Firecracker VMs run under (`--jailer`), or None."""
    if settings.jailer is None or settings.jail_uid is None or settings.jail_gid is None:
        return None
    base = settings.state_dir / "jail"
    return Jail(settings.jailer, settings.jail_uid, settings.jail_gid, base)


def _ensure_default_network(db: Database, default: DefaultNetwork) -> None:
    """The daemon's default network, as `--default-subnet` says (moved only while no VM
    holds an address on it)."""

    def work(session: Session) -> None:
        network = session.scalar(select(Network).where(Network.name == DEFAULT_NETWORK))
        subnet = str(default.subnet)
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
                default.subnet,
                default.gateway,
                name=DEFAULT_NETWORK,
                bridge=DEFAULT_BRIDGE,
            )

    db.transact(work)
