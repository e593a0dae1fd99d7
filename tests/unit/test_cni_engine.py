"""The engine's CNI lifecycle (`roost.engine.cni.CniAttachments`) with named failing fakes for
the runtime, the store, the namespaces and the redirects: whatever fails, an attach rolled
back leaves no namespace, no record and no plugin state; DEL runs with the stored result, is
retried while it fails (and says so), and CHECK reports the plugins' and the redirect's
problems. Namespaces are host-wide: a daemon removes only those of VMs it holds records of,
and its container ids are its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from roost.engine.cni import (
    CniAttachments,
    DatabaseStore,
    Stored,
    Wanted,
    container_id,
    daemon_tag,
)
from roost.engine.events import Event, EventBus
from roost.engine.steps import Steps
from roost.errors import ConflictError, HostError, InvalidError, RoostError
from roost.host.cni import AddUndoneError, Attachment, CniRuntime, NamespaceExistsError
from roost.host.redirect import Redirect
from roost.spec import VMConfig
from roost.spec.cni import CniResult, Conflist, check_container_id, parse_conflist, parse_result
from tests.engine_fakes import World as FakeWorld

MAC = "0a:58:0a:58:00:05"
TAG = daemon_tag(Path("/var/lib/roost"))


def conflist(name: str = "net") -> Conflist:
    return parse_conflist({"cniVersion": "1.0.0", "name": name, "plugins": [{"type": "bridge"}]})


class FakeStore:
    """Attachments in memory, as committed rows keyed by (vm, index)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], Stored] = {}

    def record(self, vm: str, index: int, attachment: Attachment) -> None:
        assert (vm, index) not in self.rows, "a stale attachment must be cleared first"
        self.rows[vm, index] = Stored(vm, index, attachment)

    def set_result(self, vm: str, index: int, result: CniResult) -> None:
        stored = self.rows[vm, index]
        self.rows[vm, index] = Stored(vm, index, stored.attachment, result)

    def forget(self, vm: str, index: int) -> None:
        self.rows.pop((vm, index), None)

    def of_vm(self, vm: str) -> list[Stored]:
        return [stored for (owner, _), stored in sorted(self.rows.items()) if owner == vm]

    def all(self) -> list[Stored]:
        return list(self.rows.values())


class FakeRuntime:
    """Plugins that hold an address per (container id, ifname) until DEL, like host-local."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.held: set[tuple[str, str]] = set()
        self.calls: list[tuple[str, str, CniResult | None]] = []
        self.add_fails_on: str | None = None  # ifname whose ADD fails (undone by itself)
        self.delete_fails = False
        self.check_fails = False
        self.no_sandbox_interface = False
        self.unknown_networks: set[str] = set()

    def attachment(self, **kwargs: Any) -> Attachment:
        network = kwargs.pop("network")
        loc = kwargs.pop("loc", "cni.network")
        if network in self.unknown_networks:
            raise InvalidError.at(loc, f"no CNI conflist named {network!r}")
        kwargs["conflist"] = kwargs["conflist"] or conflist(network)
        kwargs["args"] = kwargs["args"] or {}
        kwargs["capability_args"] = kwargs["capability_args"] or {}
        return Attachment(**kwargs)

    def add(self, attachment: Attachment) -> CniResult:
        # the attachment is committed before the plugins run, so a crash here can be undone
        assert any(s.attachment == attachment for s in self.store.all())
        self.calls.append(("ADD", attachment.ifname, None))
        if attachment.ifname == self.add_fails_on:
            raise AddUndoneError("CNI plugin 'bridge' (ADD on network 'net') failed: no room")
        self.held.add((attachment.container_id, attachment.ifname))
        name = "other" if self.no_sandbox_interface else attachment.ifname
        return parse_result(
            {
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "cni0", "mac": "0a:58:0a:58:00:01"},
                    {"name": name, "mac": MAC, "sandbox": attachment.netns},
                ],
                "ips": [
                    {"address": "10.88.0.5/24", "gateway": "10.88.0.1", "interface": 1},
                    {"address": "fd88::5/64", "interface": 1},
                ],
            }
        )

    def delete(self, attachment: Attachment, result: CniResult | None) -> None:
        self.calls.append(("DEL", attachment.ifname, result))
        if self.delete_fails:
            raise HostError("CNI plugin 'host-local' (DEL on network 'net') failed: disk gone")
        self.held.discard((attachment.container_id, attachment.ifname))

    def check(self, attachment: Attachment, result: CniResult) -> None:
        self.calls.append(("CHECK", attachment.ifname, result))
        if self.check_fails:
            raise HostError("CNI plugin 'bridge' (CHECK on network 'net') failed: veth is gone")


class FakeRedirects:
    def __init__(self) -> None:
        self.taps: dict[str, tuple[str, str]] = {}  # tap -> (netns, interface)
        self.connect_fails = False
        self.cut: set[str] = set()  # taps whose filters were removed by hand

    def connect(
        self, netns: str, interface: str, tap: str, owner: tuple[int, int] | None = None
    ) -> Redirect:
        if self.connect_fails:
            raise HostError(f"cannot connect tap {tap} to {interface} in {netns}: busy")
        self.taps[tap] = (netns, interface)
        return Redirect(netns=netns, interface=interface, tap=tap, mac=MAC, mtu=1500)

    def disconnect(self, netns: str, interface: str, tap: str) -> None:
        self.taps.pop(tap, None)

    def check(self, netns: str, interface: str, tap: str) -> list[str]:
        if tap in self.cut:
            return [f"no tc filter redirects frames from {interface} to {tap} in {netns}"]
        return []


class FakeNamespaces:
    """Namespaces by name, host-wide like /run/netns (a name is made once); the taps in one
    go with it."""

    def __init__(self, redirects: FakeRedirects) -> None:
        self.made: set[str] = set()
        self.redirects = redirects

    def create(self, name: str) -> Path:
        if name in self.made:
            raise NamespaceExistsError(f"network namespace {name} exists already")
        self.made.add(name)
        return Path("/run/netns") / name

    def delete(self, name: str) -> bool:
        found = name in self.made
        self.made.discard(name)
        for tap, (netns, _) in list(self.redirects.taps.items()):
            if netns == name:
                del self.redirects.taps[tap]
        return found


class RecordingBus(EventBus):
    """The events published, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[Event] = []

    def publish(self, type_: str, **fields: Any) -> Event:
        event = super().publish(type_, **fields)
        self.published.append(event)
        return event

    def types(self) -> list[str]:
        return [event.type for event in self.published]


class World:
    def __init__(self) -> None:
        self.store = FakeStore()
        self.runtime = FakeRuntime(self.store)
        self.redirects = FakeRedirects()
        self.namespaces = FakeNamespaces(self.redirects)
        self.events = RecordingBus()
        self.cni = CniAttachments(
            self.runtime,
            self.store,
            tag=TAG,
            events=self.events,
            namespaces=self.namespaces,
            redirects=self.redirects,
        )

    def attach(self, vm: str = "vm", count: int = 1, steps: Steps | None = None) -> Steps:
        steps = steps or Steps("start", vm)
        added = self.cni.add(steps, vm, [Wanted(index, "net") for index in range(count)])
        for index in added:
            self.cni.connect(steps, vm, index, f"rtap1n{index}")
        return steps

    def assert_nothing_left(self) -> None:
        assert self.namespaces.made == set()
        assert self.store.rows == {}
        assert self.runtime.held == set()
        assert self.redirects.taps == {}


@pytest.fixture
def world() -> World:
    return World()


def test_add_gives_each_interface_its_mac_and_every_address_and_stores_the_result(
    world: World,
) -> None:
    steps = Steps("start", "vm")
    added = world.cni.add(steps, "vm", [Wanted(0, "net"), Wanted(1, "net")])

    assert world.namespaces.made == {"roost-vm-vm"}
    assert {index: a.mac for index, a in added.items()} == {0: MAC, 1: MAC}
    assert [str(ip.address) for ip in added[0].ips] == ["10.88.0.5/24", "fd88::5/64"]
    stored = world.store.of_vm("vm")
    assert [(s.index, s.attachment.ifname, s.result is not None) for s in stored] == [
        (0, "eth0", True),
        (1, "eth1", True),
    ]
    assert {s.attachment.container_id for s in stored} == {container_id(TAG, "vm")}
    assert stored[0].attachment.netns == "/run/netns/roost-vm-vm"


def test_a_vm_without_cni_interfaces_gets_no_namespace(world: World) -> None:
    assert world.cni.add(Steps("start", "vm"), "vm", []) == {}
    assert world.namespaces.made == set()


def test_an_add_that_fails_on_the_second_interface_rolls_back_to_nothing(world: World) -> None:
    world.runtime.add_fails_on = "eth1"
    steps = Steps("start", "vm")
    with pytest.raises(HostError, match="no room"):
        world.cni.add(steps, "vm", [Wanted(0, "net"), Wanted(1, "net")])
    steps.rollback()
    world.assert_nothing_left()
    [(_, first_result)] = [(i, r) for c, i, r in world.runtime.calls if (c, i) == ("DEL", "eth0")]
    assert first_result is not None  # the finished ADD's DEL had its stored result


def test_an_add_its_plugins_undid_is_forgotten_so_a_del_that_fails_never_blocks_the_name(
    world: World,
) -> None:
    """A list naming a missing plugin: ADD fails and is undone, and its DEL would fail for
    ever (the plugin is still missing), so nothing may be left for a DEL to do."""
    world.runtime.add_fails_on = "eth0"
    steps = Steps("create", "vm")
    with pytest.raises(HostError, match="no room"):
        world.cni.add(steps, "vm", [Wanted(0, "net")])
    assert world.store.all() == []
    world.runtime.delete_fails = True
    steps.rollback()
    world.assert_nothing_left()
    assert [call for call, _, _ in world.runtime.calls] == ["ADD"]
    world.runtime.add_fails_on = None
    assert set(world.cni.add(Steps("create", "vm"), "vm", [Wanted(0, "net")])) == {0}


def test_an_unknown_conflist_leaves_nothing_after_rollback(world: World) -> None:
    world.runtime.unknown_networks = {"nope"}
    steps = Steps("create", "vm")
    with pytest.raises(InvalidError, match="nope"):
        world.cni.add(steps, "vm", [Wanted(0, "net"), Wanted(1, "nope")])
    steps.rollback()
    world.assert_nothing_left()


def test_a_result_naming_no_interface_in_the_namespace_is_a_host_error_undone_by_del(
    world: World,
) -> None:
    world.runtime.no_sandbox_interface = True
    steps = Steps("start", "vm")
    with pytest.raises(HostError, match="made no interface for the VM"):
        world.cni.add(steps, "vm", [Wanted(0, "net")])
    steps.rollback()
    world.assert_nothing_left()


def test_a_tap_that_cannot_be_connected_rolls_back_the_add_too(world: World) -> None:
    world.redirects.connect_fails = True
    steps = Steps("start", "vm")
    with pytest.raises(HostError, match="busy"):
        world.attach(steps=steps)
    steps.rollback()
    world.assert_nothing_left()


def test_release_dels_with_the_stored_result_and_removes_the_namespace_with_its_taps(
    world: World,
) -> None:
    world.attach(count=2)
    results = {s.index: s.result for s in world.store.of_vm("vm")}

    assert world.cni.release("vm") == []

    world.assert_nothing_left()
    dels = [(ifname, result) for command, ifname, result in world.runtime.calls if command == "DEL"]
    assert dels == [("eth0", results[0]), ("eth1", results[1])]


def test_release_twice_and_of_a_vm_without_cni_does_nothing_more(world: World) -> None:
    world.attach()
    world.cni.release("vm")
    calls = len(world.runtime.calls)
    assert world.cni.release("vm") == []
    assert world.cni.release("other") == []
    assert len(world.runtime.calls) == calls
    world.assert_nothing_left()


def test_an_add_cut_short_before_its_result_is_stored_is_deleted_without_one(
    world: World,
) -> None:
    attachment = world.runtime.attachment(
        container_id="roost-vm",
        netns="/run/netns/roost-vm-vm",
        ifname="eth0",
        network="net",
        conflist=None,
        args=None,
        capability_args=None,
    )
    world.store.record("vm", 0, attachment)  # the daemon died during ADD
    world.runtime.held.add(("roost-vm", "eth0"))
    world.namespaces.create("roost-vm-vm")

    world.cni.release("vm")

    assert world.runtime.calls == [("DEL", "eth0", None)]
    world.assert_nothing_left()


def test_a_del_that_fails_keeps_its_record_and_the_next_start_runs_it_again(
    world: World,
) -> None:
    world.attach()
    world.runtime.delete_fails = True
    [failure] = world.cni.release("vm")
    assert "kept for another try" in failure and "disk gone" in failure
    assert [s.index for s in world.store.of_vm("vm")] == [0]
    assert world.namespaces.made == set()  # the namespace goes all the same

    world.runtime.delete_fails = False
    world.runtime.calls.clear()
    world.attach()
    assert [call[:2] for call in world.runtime.calls] == [("DEL", "eth0"), ("ADD", "eth0")]
    assert len(world.store.of_vm("vm")) == 1


def test_a_stale_attachment_del_cannot_remove_refuses_the_start_and_makes_nothing(
    world: World,
) -> None:
    world.attach()
    world.runtime.delete_fails = True
    world.cni.release("vm")
    with pytest.raises(HostError, match="earlier start that DEL cannot remove"):
        world.cni.add(Steps("start", "vm"), "vm", [Wanted(0, "net")])
    assert world.namespaces.made == set()
    assert [command for command, _, _ in world.runtime.calls].count("ADD") == 1


def test_check_of_a_whole_attachment_is_none(world: World) -> None:
    world.attach()
    assert world.cni.check("vm", {0: "rtap1n0"}) is None
    assert world.runtime.calls[-1][0] == "CHECK"


def test_check_reports_the_plugins_message_and_the_cut_redirect(world: World) -> None:
    world.attach(count=2)
    world.runtime.check_fails = True
    world.redirects.cut = {"rtap1n1"}
    problem = world.cni.check("vm", {0: "rtap1n0", 1: "rtap1n1"})
    assert problem is not None
    assert "interface 0: CNI plugin 'bridge' (CHECK on network 'net') failed" in problem
    assert "interface 1: no tc filter redirects frames from eth1 to rtap1n1" in problem


def test_check_of_an_add_that_never_finished_says_so(world: World) -> None:
    world.store.record(
        "vm",
        0,
        Attachment(conflist=conflist(), container_id="roost-vm", netns="/x", ifname="eth0"),
    )
    assert "never finished" in (world.cni.check("vm", {}) or "")


def test_a_vm_this_daemon_holds_no_attachment_of_never_has_its_namespace_removed(
    world: World,
) -> None:
    """`roost-vm-web` is another daemon's cni VM's: this daemon's VM `web` (no cni
    interface) stops, or is removed, and leaves it be."""
    world.namespaces.create("roost-vm-web")
    assert world.cni.release("web") == []
    assert world.namespaces.made == {"roost-vm-web"}


def test_attaching_a_vm_whose_namespace_is_not_this_daemons_is_a_409_touching_nothing(
    world: World,
) -> None:
    world.namespaces.create("roost-vm-web")  # another daemon's VM `web`, or a leftover
    steps = Steps("create", "web")
    with pytest.raises(ConflictError) as refused:
        world.cni.add(steps, "web", [Wanted(0, "net")])
    message = refused.value.message
    assert "network namespace roost-vm-web exists and is not this daemon's" in message
    assert "another roost daemon" in message and "'ip netns delete roost-vm-web'" in message
    steps.rollback()
    assert world.namespaces.made == {"roost-vm-web"}  # its owner's still
    assert world.store.rows == {}
    assert world.runtime.calls == []  # no ADD into it, no DEL from it


def test_a_namespace_this_daemon_holds_records_of_is_its_own_to_clear_at_the_next_start(
    world: World,
) -> None:
    """A crash after the records and the namespace were made: the next start DELs the
    stale attachment, removes the namespace and makes its own again."""
    attachment = world.runtime.attachment(
        container_id=container_id(TAG, "vm"),
        netns="/run/netns/roost-vm-vm",
        ifname="eth0",
        network="net",
        conflist=None,
        args=None,
        capability_args=None,
    )
    world.store.record("vm", 0, attachment)
    world.namespaces.create("roost-vm-vm")

    world.attach()

    assert [call[:2] for call in world.runtime.calls] == [("DEL", "eth0"), ("ADD", "eth0")]
    assert world.namespaces.made == {"roost-vm-vm"}


def test_two_daemons_give_one_vm_name_different_container_ids_within_the_specs_rules(
    world: World,
) -> None:
    other = daemon_tag(Path("/srv/other-roost"))
    assert other != TAG and len(TAG) == 8 and int(TAG, 16) >= 0
    assert daemon_tag(Path("/var/lib/roost")) == TAG  # stable for the daemon
    ours, theirs = container_id(TAG, "web"), container_id(other, "web")
    assert ours != theirs
    assert check_container_id(ours) == ours and check_container_id(theirs) == theirs
    world.attach("web")
    [stored] = world.store.of_vm("web")
    assert stored.attachment.container_id == ours


def test_an_unknown_conflist_is_refused_before_anything_is_recorded_or_made(
    world: World,
) -> None:
    world.runtime.unknown_networks = {"nope"}
    with pytest.raises(InvalidError) as refused:
        world.cni.add(
            Steps("create", "vm"), "vm", [Wanted(0, "net"), Wanted(1, "nope", loc="x.cni.network")]
        )
    assert [detail.loc for detail in refused.value.details] == ["x.cni.network"]
    assert world.runtime.calls == []
    world.assert_nothing_left()


def test_reap_dels_what_no_running_vm_holds_and_removes_its_own_namespaces_only(
    world: World,
) -> None:
    world.attach("kept")
    world.attach("gone")
    world.namespaces.create("roost-vm-known")  # a VM of this daemon's, without a record
    world.namespaces.create("roost-vm-strangers")

    world.cni.reap(lambda: {"kept"}, no_hold)

    # a namespace of a VM this daemon holds no record of may be another daemon's VM's
    assert world.namespaces.made == {"roost-vm-kept", "roost-vm-known", "roost-vm-strangers"}
    assert [s.vm for s in world.store.all()] == ["kept"]
    assert world.runtime.held == {(container_id(TAG, "kept"), "eth0")}


def test_reap_keeps_a_record_whose_del_fails_for_the_next_start_and_says_so(
    world: World,
) -> None:
    world.attach("gone")
    world.runtime.delete_fails = True
    world.cni.reap(set, no_hold)
    assert [s.vm for s in world.store.all()] == ["gone"]
    assert world.namespaces.made == set()
    [event] = world.events.published
    assert (event.type, event.vm) == ("vm.cni_detach_failed", "gone")


def test_reap_leaves_alone_a_vm_started_while_it_runs(world: World) -> None:
    """A stopped VM whose DEL failed keeps its record; the user starts it again while the
    reap runs (starts of stopped VMs go on during recovery): the reap, which read the stale
    record first, must not DEL the new attachment (same container id and ifname) nor forget
    its record."""
    world.runtime.delete_fails = True
    world.attach("web")
    world.cni.release("web")
    world.runtime.delete_fails = False
    started: set[str] = set()
    held: list[str] = []

    @contextmanager
    def hold(vm: str) -> Iterator[None]:  # the VM's operation lock, after the reap's first look
        world.attach("web")  # the start, which DELs the stale attachment and ADDs anew
        started.add("web")
        held.append(vm)
        yield

    world.cni.reap(lambda: set(started), hold)

    assert world.runtime.held == {(container_id(TAG, "web"), "eth0")}
    assert [(s.vm, s.result is not None) for s in world.store.all()] == [("web", True)]
    assert world.namespaces.made == {"roost-vm-web"}
    assert held == ["web"]


@contextmanager
def no_hold(vm: str) -> Iterator[None]:
    yield


# ---- through the engine (tests/engine_fakes.World: a real database, fake VMM and host) ----

CNI_CONFIG = {"mode": "cni", "cni": {"network": "net"}}


class EngineWorld:
    """The engine of `tests.engine_fakes.World` attaching with the fakes above, its
    attachments kept in its real database."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.store = DatabaseStore(world.db)
        self.runtime = FakeRuntime(self.store)  # type: ignore[arg-type]
        self.redirects = FakeRedirects()
        self.namespaces = FakeNamespaces(self.redirects)
        self.events = RecordingBus()
        world.engine.cni_attachments = CniAttachments(
            self.runtime,
            self.store,
            tag=daemon_tag(world.settings.state_dir),
            events=self.events,
            namespaces=self.namespaces,
            redirects=self.redirects,
        )

    def create(
        self, name: str = "vm", config: dict[str, Any] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        config = config or {"plugin": "p", "network": CNI_CONFIG}
        return self.world.engine.create_vm(name, VMConfig.model_validate(config), **kwargs)

    def assert_detached(self) -> None:
        assert self.namespaces.made == set()
        assert self.store.all() == []
        assert self.runtime.held == set()
        assert self.redirects.taps == {}


@pytest.fixture
def engine(tmp_short: Path) -> Iterator[EngineWorld]:
    world = FakeWorld(tmp_short)
    yield EngineWorld(world)
    world.close()


def test_a_cni_vm_boots_in_its_namespace_with_the_mac_and_addresses_add_gave(
    engine: EngineWorld,
) -> None:
    vm = engine.create()

    assert vm["status"] == "running"
    [spec] = engine.world.driver.launched
    assert spec.netns == Path("/run/netns/roost-vm-vm")
    [nic] = spec.nics
    assert nic.mac == MAC
    assert engine.redirects.taps == {nic.tap: ("roost-vm-vm", "eth0")}
    assert "roost.nic=0a:58:0a:58:00:05,10.88.0.5/24,10.88.0.1" in spec.boot_args
    assert "roost.nic=0a:58:0a:58:00:05,fd88::5/64" in spec.boot_args
    assert vm["network"]["mode"] == "cni"
    assert vm["network"]["addresses"] == ["10.88.0.5/24", "fd88::5/64"]
    assert vm["network"]["mac"] == MAC
    assert vm["network"]["cni"]["network"] == "net"
    assert engine.world.links.links == {}  # nothing on the daemon's namespace's bridges


def test_stopping_a_cni_vm_dels_and_forgets_its_results_then_a_start_adds_again(
    engine: EngineWorld,
) -> None:
    engine.create()
    stopped = engine.world.engine.stop_vm("vm")

    engine.assert_detached()
    assert stopped["network"]["addresses"] is None
    assert stopped["network"]["cni"]["result"] is None
    assert stopped["network"]["mac"] != MAC  # roost's again: the plugins' went with DEL

    started = engine.world.engine.start_vm("vm")
    assert started["network"]["addresses"] == ["10.88.0.5/24", "fd88::5/64"]
    engine.world.engine.destroy_vm("vm")
    engine.assert_detached()
    engine.world.assert_nothing_left("vm")


@pytest.mark.parametrize("failure", ["add", "connect", "boot"])
def test_a_cni_create_that_fails_leaves_nothing(engine: EngineWorld, failure: str) -> None:
    engine.runtime.add_fails_on = "eth0" if failure == "add" else None
    engine.redirects.connect_fails = failure == "connect"
    engine.world.driver.die_during_boot = failure == "boot"
    with pytest.raises(RoostError):
        engine.create()
    engine.assert_detached()
    engine.world.assert_nothing_left("vm")


def test_a_cni_start_that_fails_leaves_the_vm_error_and_nothing_attached(
    engine: EngineWorld,
) -> None:
    engine.create(start=False)
    engine.runtime.add_fails_on = "eth0"
    with pytest.raises(HostError, match="no room"):
        engine.world.engine.start_vm("vm")
    vm = engine.world.engine.show_vm("vm")
    assert vm["status"] == "error"
    assert "no room" in vm["status_reason"]
    engine.assert_detached()


def test_a_del_that_fails_at_stop_is_run_again_by_the_next_daemons_reap(
    engine: EngineWorld,
) -> None:
    engine.create()
    engine.runtime.delete_fails = True
    engine.world.engine.stop_vm("vm")
    assert [stored.vm for stored in engine.store.all()] == ["vm"]

    engine.runtime.delete_fails = False
    engine.world.engine.reap_cni()
    engine.assert_detached()


def test_a_del_that_fails_at_stop_shows_in_the_vms_status_reason_and_an_event(
    engine: EngineWorld,
) -> None:
    engine.create()
    engine.runtime.delete_fails = True

    stopped = engine.world.engine.stop_vm("vm")

    assert stopped["status"] == "stopped"
    assert stopped["status_reason"].startswith(
        "stopped; CNI DEL of interface 0 on network 'net' failed, kept for another try: "
    )
    assert "disk gone" in stopped["status_reason"]
    [event] = engine.events.published
    assert (event.type, event.vm) == ("vm.cni_detach_failed", "vm")
    assert "disk gone" in event.data["failures"][0]
    assert [stored.vm for stored in engine.store.all()] == ["vm"]  # kept for another try

    engine.world.engine.destroy_vm("vm")  # fails again: told, the record kept
    assert engine.events.types() == ["vm.cni_detach_failed", "vm.cni_detach_failed"]
    assert [stored.vm for stored in engine.store.all()] == ["vm"]


def test_a_create_refused_for_what_its_allocation_checks_runs_no_plugin(
    engine: EngineWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable() -> None:
        raise InvalidError.at("vmm", "fake is not installed")

    monkeypatch.setattr(engine.world.driver, "check_available", unavailable)
    with pytest.raises(InvalidError, match="not installed"):
        engine.create()
    assert engine.runtime.calls == []
    engine.assert_detached()
    engine.world.assert_nothing_left("vm")


@pytest.mark.parametrize(
    ("network", "loc"),
    [
        ({"network": {"mode": "cni", "cni": {"network": "nope"}}}, "network.cni.network"),
        ({"interfaces": [{"mode": "cni", "cni": {"network": "nope"}}]}, "interfaces.0.cni.network"),
    ],
)
def test_an_unknown_conflist_is_a_422_at_where_the_config_names_it(
    engine: EngineWorld, tmp_short: Path, network: dict[str, Any], loc: str
) -> None:
    engine.world.engine.cni_attachments.runtime = CniRuntime(
        tmp_short / "net.d", [tmp_short / "bin"], engine.world.worker
    )
    with pytest.raises(InvalidError) as refused:
        engine.create(config={"plugin": "p", **network})
    assert [detail.loc for detail in refused.value.details] == [loc]
    assert "no CNI conflist named 'nope'" in refused.value.message
    engine.assert_detached()
    engine.world.assert_nothing_left("vm")
