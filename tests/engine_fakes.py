"""Fakes for the engine's collaborators (links, rules, the VMM), and `World`: an engine built
on them with a real SQLite database, for unit tests of the engine's paths without root."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from roost.engine.core import Engine
from roost.engine.disks import Disks
from roost.engine.hostnet import HostNetwork
from roost.engine.plugins import Plugins
from roost.engine.settings import Settings
from roost.errors import HostError, VMMFailedError
from roost.host.links import LinkInfo
from roost.host.netns import NetnsWorker
from roost.host.policy import Count, Counters
from roost.plan.policy import NetworkLookup, TapPolicies, transaction
from roost.spec import Manifest
from roost.spec.policy import Direction, Policy
from roost.state import alloc
from roost.state.artifacts import ArtifactStore
from roost.state.db import Database, sqlite_url
from roost.vmm.base import Early, LaunchSpec, RunDir, VsockBackend, VsockTarget
from roost.vmm.process import DEVICE_FILES, VMM_FILES, ProcessFiles, VMMProcess

SUBNET = "10.66.0.0/24"
DHCP_BRIDGE = "brdhcp"


class FakeLinks:
    """Links in memory: what a test reads to see what the engine left on the "host"."""

    def __init__(self) -> None:
        self.links: dict[str, str] = {}  # name -> kind ("bridge" or "tap")
        self.owned: set[str] = set()  # taps given to the jailer's uid

    def info(self, name: str) -> LinkInfo | None:
        kind = self.links.get(name)
        return None if kind is None else LinkInfo(name, kind, True, None, "fe:00:00:00:00:01")

    def names(self, prefix: str) -> list[str]:
        return sorted(name for name in self.links if name.startswith(prefix))

    def ensure_bridge(
        self,
        name: str,
        address: ipaddress.IPv4Interface | None,
        *,
        mtu: int | None = None,
        mac: str | None = None,
    ) -> None:
        self.links[name] = "bridge"

    def create_tap(
        self, name: str, bridge: str, mac: str, *, owned: bool = False, mtu: int | None = None
    ) -> None:
        if self.links.get(bridge) != "bridge":
            raise HostError(f"bridge {bridge} does not exist")
        self.links[name] = "tap"
        if owned:
            self.owned.add(name)

    def delete(self, name: str) -> bool:
        return self.links.pop(name, None) is not None


class FakeFirewall:
    """Rules in memory; `fail` makes the next protect fail (after the tap exists)."""

    def __init__(self) -> None:
        self.protected: set[str] = set()
        self.fail = False

    def protect(self, tap: str, mac: str, ip: str | None) -> None:
        if self.fail:
            raise HostError("nftables refused the rules: a fake failure")
        self.protected.add(tap)

    def release(self, tap: str) -> None:
        self.protected.discard(tap)


class FakePolicyFirewall:
    """roost.plan.policy's transactions, planned for real (an unknown `@network` is refused
    as by the real one, so is a tap attached to a policy not made) and recorded instead of
    run; `fail` refuses the next one, which then changes nothing. `counts` are what
    `counters()` reports per rule."""

    def __init__(self) -> None:
        self.policies: dict[str, Policy] = {}
        self.taps: dict[str, str] = {}
        self.transactions: list[list[str]] = []
        self.counts: dict[tuple[str, Direction, int], Count] = {}
        self.fail = False

    def apply(
        self,
        *,
        policies: Sequence[Policy] = (),
        taps: Sequence[TapPolicies] = (),
        removed_taps: Sequence[str] = (),
        removed_policies: Sequence[str] = (),
        lookup: NetworkLookup,
    ) -> None:
        planned = transaction(
            current=self.taps,
            policies=policies,
            taps=taps,
            removed_taps=removed_taps,
            removed_policies=removed_policies,
            lookup=lookup,
        )
        if self.fail:
            self.fail = False
            raise HostError("nftables refused the policy rules: a fake failure")
        made = {*self.policies, *(policy.name for policy in policies)}
        for attached in taps:
            for name in attached.policies:
                if name not in made:
                    raise HostError(f"nftables refused the policy rules: no chains of {name}")
        self.transactions.append(planned.lines)
        self.taps = planned.taps
        self.policies.update((policy.name, policy) for policy in policies)
        for name in removed_policies:
            self.policies.pop(name, None)

    def counters(self) -> Counters:
        return Counters(dict(self.counts), {})

    def release(self, tap: str) -> None:
        """As the real one: nothing at all (no transaction) for a tap not attached."""
        if tap in self.taps:
            self.apply(removed_taps=[tap], lookup=lambda name: None)

    def attached_taps(self) -> set[str]:
        return set(self.taps)

    def made_policies(self) -> set[str]:
        return set(self.policies)


class FakeAdverts:
    """Router advertisements as a record of bridge → prefix; `fail` makes the next start
    fail."""

    def __init__(self) -> None:
        self.advertised: dict[str, ipaddress.IPv6Network] = {}
        self.fail = False

    def start(self, bridge: str, prefix: ipaddress.IPv6Network) -> None:
        if self.fail:
            self.fail = False
            raise HostError(f"fake: cannot advertise {prefix} on {bridge}")
        self.advertised[bridge] = prefix

    def stop(self, bridge: str) -> None:
        self.advertised.pop(bridge, None)

    def reconcile(self, wanted: Mapping[str, ipaddress.IPv6Network]) -> None:
        self.advertised = dict(wanted)


class FakeVMMProcess(VMMProcess):
    """A real child process standing in for a VMM, reaped by the test when killed."""

    def __init__(self, run_dir: Path, files: ProcessFiles = VMM_FILES) -> None:
        self.child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", f"{run_dir}/"]
        )
        super().__init__(run_dir, self.child.pid, self.child.pid, files)

    def kill(self) -> int | None:
        self.child.kill()
        code = self.child.wait()
        if self.device is not None:
            self.device.kill()
        return code

    def end_device(self) -> None:
        if self.device is not None:
            self.device.kill()

    def exit_code(self) -> int | None:
        return self.child.returncode

    def exited(self) -> bool:
        return self.child.poll() is not None

    def wait(self, timeout: float) -> bool:
        """Reaped here, as the supervisor reaps a real VMM."""
        try:
            self.child.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


class FakeEarly:
    def __init__(self, process: FakeVMMProcess) -> None:
        self.process = process

    def result(self) -> VMMProcess:
        return self.process


class FakeDriver:
    """A VMM driver whose boot can die after the VMM was asked to boot the guest."""

    kind = "fake"

    def __init__(self) -> None:
        self.die_during_boot = False
        self.with_device = False  # give each VMM a vsock device process, as roost's QEMU does
        self.devices: list[FakeVMMProcess] = []
        self.started: list[FakeVMMProcess] = []
        self.launched: list[LaunchSpec] = []  # what each launch was asked to boot

    def check_available(self) -> None:
        return None

    def api_socket(self, run_dir: RunDir) -> Path:
        return run_dir.api_socket

    def vsock_unavailable(self) -> str | None:
        return None

    def vsock_backend(self) -> VsockBackend:
        return VsockBackend.FIRECRACKER

    def start_early(
        self, name: str, run_dir: RunDir, worker: NetnsWorker, netns: Path | None = None
    ) -> Early | None:
        """Started before the allocation, as Firecracker is: a failure after this point must
        end it."""
        process = FakeVMMProcess(run_dir.path)
        self.started.append(process)
        return FakeEarly(process)

    def launch(
        self,
        spec: LaunchSpec,
        worker: NetnsWorker,
        *,
        host_ready: Callable[[], object] | None = None,
        early: Early | None = None,
        while_booting: Callable[[VMMProcess], object] | None = None,
    ) -> VMMProcess:
        assert early is not None
        self.launched.append(spec)
        process = early.result()
        if self.with_device:
            process.device = FakeVMMProcess(spec.run_dir.path, DEVICE_FILES)
            self.devices.append(cast(FakeVMMProcess, process.device))
        if host_ready is not None:
            host_ready()
        if while_booting is not None:
            while_booting(process)
        if self.die_during_boot:
            process.kill()
            raise VMMFailedError("the fake VMM died while booting the guest")
        return process

    def stop(self, process: VMMProcess, timeout: float, force: bool) -> int | None:
        return process.kill()

    def pause(self, process: VMMProcess, meanwhile: Callable[[], object] | None = None) -> None:
        if meanwhile is not None:
            meanwhile()

    def resume(self, process: VMMProcess, meanwhile: Callable[[], object] | None = None) -> None:
        if meanwhile is not None:
            meanwhile()


class FakeListeners:
    """Records what the engine asks of the daemon's vsock relays; `fail` makes the next
    `vm_started` fail as a listener that cannot be bound would."""

    def __init__(self) -> None:
        self.listening: dict[str, tuple[VsockTarget, dict[int, str]]] = {}
        self.removed: list[str] = []
        self.fail = False

    def vm_started(self, name: str, target: VsockTarget, services: Mapping[int, str]) -> None:
        if self.fail:
            self.fail = False
            raise HostError("cannot listen on the vsock service socket: a fake failure")
        self.listening[name] = (target, dict(services))

    def vm_stopped(self, name: str) -> None:
        self.listening.pop(name, None)

    def vm_removed(self, name: str) -> None:
        self.listening.pop(name, None)
        self.removed.append(name)


class FakeObserver:
    def watch(self, key: str, tap: str, mac: str) -> None:
        return None

    def forget(self, key: str) -> None:
        return None

    def close(self) -> None:
        return None


class World:
    """An engine on fakes, and what the tests look at."""

    def __init__(
        self,
        root: Path,
        *,
        dhcp_bridge: str | None = None,
        install: bool = True,
        database_url: str | None = None,
    ) -> None:
        """`database_url` is SQLite's under `root` unless given (`database_url` fixture)."""
        self.root = root
        self.db = Database(database_url or sqlite_url(root))
        self.db.migrate()
        self.links, self.firewall, self.driver = FakeLinks(), FakeFirewall(), FakeDriver()
        self.adverts = FakeAdverts()
        self.listeners = FakeListeners()
        self.policy_firewall = FakePolicyFirewall()
        if dhcp_bridge is not None:
            self.links.links[dhcp_bridge] = "bridge"  # the operator's, made before the daemon
        self.worker = NetnsWorker(None)
        self.store = store = ArtifactStore(root / "artifacts")
        settings = Settings(
            state_dir=root, run_dir=root / "run", vmm="fake", dhcp_bridge=dhcp_bridge
        )
        self.settings = settings

        def leased(network_id: int) -> bool:
            with self.db.read() as session:
                return alloc.has_leases(session, network_id)

        self.engine = Engine(
            settings,
            db=self.db,
            store=store,
            plugins=Plugins(self.db, store),
            host=HostNetwork(
                self.links,
                self.firewall,
                leased,
                adverts=self.adverts,
                policies=self.policy_firewall,
            ),
            drivers={"fake": self.driver},
            observer=FakeObserver(),
            disks=Disks(root / "disks"),
            worker=self.worker,
            listeners=self.listeners,
            policy_firewall=self.policy_firewall,
        )
        if install:
            self._install_plugin()

    def _install_plugin(self) -> None:
        root = self.root
        kernel, rootfs = root / "vmlinux", root / "rootfs.img"
        kernel.write_bytes(b"\x7fELF" + bytes(64))
        rootfs.write_bytes(bytes(4096))
        manifest = Manifest.model_validate(
            {
                "name": "p",
                "version": "1",
                "kernel": {"path": str(kernel)},
                "rootfs": {"path": str(rootfs)},
                "network": {"mode": "bridged", "subnet": SUBNET, "auto_assign": True},
            }
        )
        self.engine.plugins.install(manifest, force=False)

    def close(self) -> None:
        for process in [*self.driver.started, *self.driver.devices]:
            process.kill()
        self.engine.close()
        self.worker.close()
        self.db.dispose()

    def leases(self) -> dict[str, list[int]]:
        with self.db.read() as session:
            return {n.subnet: ips for n, ips in alloc.networks_and_leases(session)}

    def assert_nothing_left(self, name: str) -> None:
        assert self.engine.records.names() == set()
        assert self.engine.records.pending_creates() == set()
        assert self.leases() == {}
        assert set(self.links.links) <= {DHCP_BRIDGE}
        assert self.firewall.protected == set()
        assert self.policy_firewall.taps == {}
        assert not (self.root / "run" / "vms" / name).exists()
        assert self.engine.disks.names() == set()
        assert all(process.child.poll() is not None for process in self.driver.started)
        assert self.engine.live == {}


@contextmanager
def failing_commit(db: Database) -> Iterator[list[str]]:
    """The next write transaction does its work, then fails to commit (as a full or broken
    disk would make it); later ones commit."""
    original = db.write
    failed: list[str] = []

    @contextmanager
    def write() -> Iterator[Session]:
        with original() as session:
            yield session
            if not failed:
                failed.append("commit")
                raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    db.write = write  # type: ignore[method-assign]
    try:
        yield failed
    finally:
        db.write = original  # type: ignore[method-assign]
