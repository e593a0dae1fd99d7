"""Check-then-act races that SQLite's single writer rules out and PostgreSQL's READ COMMITTED
does not, on both backends: a removal that checks nothing uses X against a write that checks X
exists (a policy or a network named by a VM, a network a policy names as `@network`, an
on-demand network going with its last lease), and CIDs that concurrent creates on one host take
without waiting for each other.

On PostgreSQL the two sides are real transactions in two threads: the first is held open at the
point that matters (a fake step waits), the second is started and the test waits until it is
blocked on a lock in pg_stat_activity, or done (what happened without the locks), before the
first goes on. On SQLite they run one after the other in both orders, as its single writer
makes them run."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from roost.errors import ConflictError, InvalidError
from roost.plan.registration import parse_network_create
from roost.spec import Manifest, VMConfig
from roost.spec.policy import parse_policy
from roost.state import alloc
from roost.state.db import Database
from roost.state.hosts import HostRegistration, Hosts
from roost.state.models import VM, IPLease, Network, Plugin, VMArtifact
from roost.state.models import Policy as PolicyRow
from roost.state.policies import used_by
from roost.state.vms import VMRecords
from tests.engine_fakes import SUBNET as SUBNET_OF_P
from tests.engine_fakes import FakePolicyFirewall, World
from tests.harness import wait_for

SUBNET = ipaddress.IPv4Network("10.93.0.0/24")
GATEWAY = ipaddress.IPv4Address("10.93.0.1")
BLOCKED = text(
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


@dataclass
class Side:
    """One side of a race, run in its own thread: what it returned or raised."""

    work: Callable[[], Any]
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Side:
        def run() -> None:
            try:
                self.result = self.work()
            except BaseException as error:  # asserted by the test
                self.error = error
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run)
        self.thread.start()
        return self

    def join(self) -> Side:
        assert self.thread is not None
        self.thread.join()
        return self


def blocked(db: Database) -> int:
    with db.read() as session:
        return int(session.execute(BLOCKED).scalar_one())


def postgresql(db: Database) -> bool:
    return db.url.startswith("postgresql")


class Pause:
    """A step that waits, once, until the test lets it go on (`paused` says it got there)."""

    def __init__(self) -> None:
        self.paused, self.go, self.armed = threading.Event(), threading.Event(), True

    def __call__(self) -> None:
        if self.armed:
            self.armed = False
            self.paused.set()
            assert self.go.wait(60), "the test never let the paused side go on"


def race(
    db: Database, first: Callable[[], Any], second: Callable[[], Any], pause: Pause
) -> tuple[Side, Side]:
    """`first` runs until `pause`, then `second` starts; once it is blocked on a lock (or
    done), `first` goes on. On SQLite: one after the other."""
    if not postgresql(db):
        pause.armed = False
        return Side(first).start().join(), Side(second).start().join()
    one = Side(first).start()
    wait_for(lambda: pause.paused.is_set() or one.done.is_set(), what="the first side's pause")
    two = Side(second).start()
    wait_for(lambda: two.done.is_set() or blocked(db) > 0, what="the second side to block")
    pause.go.set()
    return one.join(), two.join()


# ---- VMs naming policies and networks -------------------------------------------------------


@pytest.fixture
def world(tmp_short: Path, database_url: str) -> Iterator[World]:
    instance = World(tmp_short, database_url=database_url)
    instance.engine.policies.firewall = FakePolicyFirewall()
    yield instance
    instance.close()


POLICY = parse_policy({"ingress": [{"action": "drop", "protocol": "icmp4"}]}, "no-ping")
NAMING_POLICY = VMConfig.model_validate({"plugin": "p", "network": {"policies": ["no-ping"]}})


def pause_creates_after_their_checks(world: World, monkeypatch: pytest.MonkeyPatch) -> Pause:
    """A create waits once it has checked what its VM names, before it records the VM."""
    pause = Pause()
    allocator = world.engine.allocator
    check = allocator.check_launchable

    def paused(*args: Any, **kwargs: Any) -> Any:
        pause()
        return check(*args, **kwargs)

    monkeypatch.setattr(allocator, "check_launchable", paused)
    return pause


def policy_stored(world: World) -> bool:
    with world.db.read() as session:
        return session.scalar(select(PolicyRow.name).where(PolicyRow.name == "no-ping")) is not None


def test_policy_rm_racing_a_create_that_names_it_finds_the_vm(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.engine.policies.create(POLICY)
    pause = pause_creates_after_their_checks(world, monkeypatch)
    create, remove = race(
        world.db,
        lambda: world.engine.create_vm("a", NAMING_POLICY, start=False),
        lambda: world.engine.policies.remove("no-ping"),
        pause,
    )
    assert create.error is None
    assert isinstance(remove.error, ConflictError) and remove.error.code == "policy_in_use"
    assert policy_stored(world)
    with world.db.read() as session:
        assert used_by(session, "no-ping") == ["a"]


def test_a_create_naming_a_policy_racing_its_rm_is_refused(world: World) -> None:
    world.engine.policies.create(POLICY)
    pause = Pause()
    firewall = world.engine.policies.firewall
    assert isinstance(firewall, FakePolicyFirewall)
    apply = firewall.apply

    def paused_removal(**kwargs: Any) -> None:
        if kwargs.get("removed_policies"):
            pause()  # the policy's row is deleted and locked; not committed yet
        apply(**kwargs)

    firewall.apply = paused_removal  # type: ignore[method-assign]
    remove, create = race(
        world.db,
        lambda: world.engine.policies.remove("no-ping"),
        lambda: world.engine.create_vm("a", NAMING_POLICY, start=False),
        pause,
    )
    assert remove.error is None
    assert isinstance(create.error, InvalidError)
    assert [detail.loc for detail in create.error.details] == ["network.policies.0"]
    assert not policy_stored(world)
    assert world.engine.records.names() == set()


def external_network(world: World) -> None:
    world.links.links["br-ext"] = "bridge"
    world.engine.networks.create(
        parse_network_create({"name": "ext", "external": True, "bridge": "br-ext"})
    )


NAMING_NETWORK = VMConfig.model_validate(
    {"plugin": "p", "network": {"mode": "dhcp", "network": "ext"}}
)


def network_registered(world: World) -> bool:
    with world.db.read() as session:
        return session.scalar(select(Network.name).where(Network.name == "ext")) is not None


def test_network_rm_racing_a_create_that_names_it_finds_the_vm(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    external_network(world)  # no address is leased on it: nothing but the name refers to it
    pause = pause_creates_after_their_checks(world, monkeypatch)
    create, remove = race(
        world.db,
        lambda: world.engine.create_vm("a", NAMING_NETWORK, start=False),
        lambda: world.engine.networks.remove("ext"),
        pause,
    )
    assert create.error is None
    assert isinstance(remove.error, ConflictError) and remove.error.code == "network_in_use"
    assert network_registered(world)


def test_a_create_naming_a_network_racing_its_rm_is_refused(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from roost.engine import networks

    external_network(world)
    pause = Pause()
    users = networks._users

    def paused_users(session: Session, network: Network) -> set[str]:
        found = users(session, network)
        pause()  # the network's row is locked and found unused; not deleted yet
        return found

    monkeypatch.setattr(networks, "_users", paused_users)
    remove, create = race(
        world.db,
        lambda: world.engine.networks.remove("ext"),
        lambda: world.engine.create_vm("a", NAMING_NETWORK, start=False),
        pause,
    )
    assert remove.error is None
    assert isinstance(create.error, InvalidError)
    assert [detail.loc for detail in create.error.details] == ["network.network"]
    assert not network_registered(world)
    assert world.engine.records.names() == set()


def test_network_rm_racing_a_policy_that_names_it_finds_the_policy(world: World) -> None:
    world.engine.networks.create(parse_network_create({"name": "lab", "subnet": "10.94.0.0/24"}))
    pause = Pause()
    firewall = world.engine.policies.firewall
    assert isinstance(firewall, FakePolicyFirewall)
    apply = firewall.apply

    def paused_make(**kwargs: Any) -> None:
        if kwargs.get("policies"):
            pause()  # the policy is recorded, its @lab checked; not committed yet
        apply(**kwargs)

    firewall.apply = paused_make  # type: ignore[method-assign]
    naming = parse_policy({"ingress": [{"action": "allow", "source": ["@lab"]}]}, "from-lab")
    create, remove = race(
        world.db,
        lambda: world.engine.policies.create(naming),
        lambda: world.engine.networks.remove("lab"),
        pause,
    )
    assert create.error is None
    assert isinstance(remove.error, ConflictError) and "from-lab" in str(remove.error)
    assert world.engine.networks.show("lab")["name"] == "lab"


# ---- the state layer: on-demand networks and CIDs -------------------------------------------


@pytest.fixture
def db(migrated_database_url: str) -> Iterator[Database]:
    database = Database(migrated_database_url)
    yield database
    database.dispose()


def vms(db: Database, count: int, host_id: int | None = None) -> list[int]:
    def work(session: Session) -> list[int]:
        plugin = Plugin(name="p", version="1", manifest={})
        session.add(plugin)
        session.flush()
        made = [
            VM(
                name=f"vm{n}",
                plugin_id=plugin.id,
                status="created",
                vmm_kind="qemu",
                network={},
                host_id=host_id,
            )
            for n in range(count)
        ]
        session.add_all(made)
        session.flush()
        return [vm.id for vm in made]

    return db.transact(work)


@dataclass(frozen=True)
class Held:
    id: int
    host_id: int | None = None


def test_a_create_on_an_on_demand_network_keeps_it_when_a_removal_takes_its_last_lease(
    db: Database,
) -> None:
    old, new = vms(db, 2)
    db.transact(
        lambda session: alloc.allocate_ip(
            session, alloc.ensure_network(session, SUBNET, GATEWAY), old, new=True
        )
    )
    pause = Pause()

    def create() -> str:
        def work(session: Session) -> str:
            network = alloc.ensure_network(session, SUBNET, GATEWAY)
            pause()  # found, not yet leased on
            return str(alloc.allocate_ip(session, network, new, new=True))

        return db.transact(work)

    def remove() -> list[tuple[int, str]]:
        return db.transact(
            lambda session: alloc.release_address(session, Held(old), keep_network="default")
        )

    created, removed = race(db, create, remove, pause)
    assert created.error is None and removed.error is None
    assert removed.result == []  # the network was not emptied: the new lease is on it
    with db.read() as session:
        leases = session.execute(select(IPLease.vm_id, Network.subnet).join(Network)).all()
    assert [tuple(lease) for lease in leases] == [(new, str(SUBNET))]


def test_a_hosts_creates_claim_cids_without_waiting_for_each_others_commits(
    db: Database,
) -> None:
    """On PostgreSQL the second CID is taken while the first is not committed (a lock wait
    would fail the statement after lock_timeout instead of hanging the test); on SQLite the
    second write waits for the first, so there they run in turn."""
    host = (
        Hosts(db)
        .register(HostRegistration("h1", "192.0.2.1", "unix:///h1", {}, 8, 4096, {}))
        .host_id
    )
    first, second, third = (Held(vm_id, host) for vm_id in vms(db, 3, host))
    if postgresql(db):
        with db.write() as one, db.write() as two:
            two.execute(text("SET LOCAL lock_timeout = '10s'"))
            assert alloc.allocate_cid(one, first, new=True) == 3
            assert alloc.allocate_cid(two, second, new=True) == 4
    else:
        for vm in (first, second):
            with db.write() as session:
                alloc.allocate_cid(session, vm, new=True)
    assert db.transact(lambda session: alloc.allocate_cid(session, third, new=True)) == 5


def test_a_host_leaves_alone_the_creates_another_host_has_begun(db: Database) -> None:
    """What a host's CNI reap counts as another's: its VMs and the creates it has begun (a
    create records its CNI attachments before its VM), read anew for each VM reaped."""
    hosts = Hosts(db)
    mine, theirs = (
        hosts.register(HostRegistration(f"h{n}", f"192.0.2.{n}", f"unix:///h{n}", {}, 8, 4096, {}))
        for n in (1, 2)
    )
    here, there = VMRecords(db, mine.host_id), VMRecords(db, theirs.host_id)
    vms(db, 1, theirs.host_id)  # vm0, recorded there
    there.begin_create("begun-there")
    here.begin_create("begun-here")
    assert here.elsewhere() == {"vm0", "begun-there"}
    assert there.elsewhere() == {"begun-here"}
    assert VMRecords(db).elsewhere() == set()  # a single host: nothing is another's


def test_a_forced_install_racing_a_create_keeps_the_artifacts_the_vm_refers_to(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The install replaces the plugin's kernel, then collects what nothing refers to: the
    create that read the old kernel commits first, so its reference keeps the file."""
    kernel = world.root / "vmlinux-2"
    kernel.write_bytes(b"\x7fELF" + bytes(range(64)))
    replacement = Manifest.model_validate(
        {
            "name": "p",
            "version": "2",
            "kernel": {"path": str(kernel)},
            "rootfs": {"path": str(world.root / "rootfs.img")},
            "network": {"mode": "bridged", "subnet": SUBNET_OF_P, "auto_assign": True},
        }
    )
    pause = pause_creates_after_their_checks(world, monkeypatch)
    create, install = race(
        world.db,
        lambda: world.engine.create_vm("a", VMConfig(plugin="p"), start=False),
        lambda: world.engine.plugins.install(replacement, force=True),
        pause,
    )
    assert create.error is None and install.error is None
    with world.db.read() as session:
        referenced = session.scalars(select(VMArtifact.sha256).where(VMArtifact.role == "kernel"))
        digests = list(referenced)
    assert len(digests) == 1
    assert world.store.has(digests[0])
