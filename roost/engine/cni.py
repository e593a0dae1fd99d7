"""The CNI side of a VM's life: its `cni` interfaces attached when it starts, detached when its
VMM ends, checked after a daemon restart, and what a crash left behind reaped at start.

A start records the attachment of each interface (committed before anything is made, so a DEL
can follow a crash), makes the VM's namespace `roost-vm-<name>` (one for all its cni
interfaces), runs ADD and stores each result; once the VM's tap names are known, each tap is
made in the namespace and joined to the result's interface by tc redirects. Each step's undo
goes into the operation's `Steps`. Detaching runs DEL with the stored result (None when ADD
never finished: DEL is idempotent and works from what the plugins keep themselves), removes
the namespace, then forgets the records; a DEL that fails keeps its record, so the next start
of the VM, or the next daemon start, runs it again.

The namespaces live in the host's /run/netns, shared by every roost daemon, under a name given
by the VM's name alone: one is this daemon's only while it holds attachment records of that VM
(recorded before the namespace is made, forgotten after it is removed). Only those are ever
removed; making one that exists while this daemon has no record of its VM is a conflict. The
plugins' state is keyed by the container id, which carries a tag of the daemon's state dir so
that two daemons' VMs of one name never share a lease in host-local's directory.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from roost.engine.events import EventBus
from roost.engine.steps import Steps
from roost.errors import ConflictError, HostError
from roost.host import cni as host_cni
from roost.host import redirect as host_redirect
from roost.host.cni import AddUndoneError, Attachment, NamespaceExistsError, vm_namespace
from roost.host.netns import netns_path
from roost.host.redirect import Redirect
from roost.plan.interfaces import ResolvedInterfaces
from roost.plan.registry import NetworkLookup
from roost.spec.cni import CniIP, CniResult, Conflist, parse_result
from roost.state import cni as state_cni
from roost.state.db import Database

log = logging.getLogger("roost.engine")


class Runtime(Protocol):
    """Runs a conflist's plugins (`roost.host.cni.CniRuntime`)."""

    def attachment(
        self,
        *,
        container_id: str,
        netns: str,
        ifname: str,
        network: str | None = None,
        conflist: Conflist | None = None,
        args: dict[str, str] | None = None,
        capability_args: dict[str, Any] | None = None,
        loc: str = "cni.network",
    ) -> Attachment: ...

    def add(self, attachment: Attachment) -> CniResult: ...

    def delete(self, attachment: Attachment, result: CniResult | None) -> None: ...

    def check(self, attachment: Attachment, result: CniResult) -> None: ...


class Namespaces(Protocol):
    """The VMs' network namespaces (`HostNamespaces`): `create` raises
    `NamespaceExistsError` when the name is taken."""

    def create(self, name: str) -> Path: ...

    def delete(self, name: str) -> bool: ...


class Redirects(Protocol):
    """Taps joined to a result's interface (the `roost.host.redirect` module)."""

    def connect(
        self, netns: str, interface: str, tap: str, owner: tuple[int, int] | None = None
    ) -> Redirect: ...

    def disconnect(self, netns: str, interface: str, tap: str) -> None: ...

    def check(self, netns: str, interface: str, tap: str) -> list[str]: ...


@dataclass(frozen=True)
class Stored:
    """An attachment as the database keeps it: whose, which interface, and ADD's result once
    ADD has finished."""

    vm: str
    index: int
    attachment: Attachment
    result: CniResult | None = None


class Store(Protocol):
    """The attachments in the database; each write is committed when it returns."""

    def record(self, vm: str, index: int, attachment: Attachment) -> None: ...

    def set_result(self, vm: str, index: int, result: CniResult) -> None: ...

    def forget(self, vm: str, index: int) -> None: ...

    def of_vm(self, vm: str) -> list[Stored]: ...

    def all(self) -> list[Stored]: ...


class HostNamespaces:
    """The real namespaces under /run/netns."""

    def create(self, name: str) -> Path:
        return host_cni.create_namespace(name)

    def delete(self, name: str) -> bool:
        return host_cni.delete_namespace(name)


@dataclass(frozen=True)
class Wanted:
    """One cni interface of a VM as its plan has it: its index, the CNI network it names (with
    the conflist of the roost network of that name, None to read the conf dir), what the
    plugins are given, and where its config names the network (`loc`, for a 422)."""

    index: int
    network: str
    conflist: Conflist | None = None
    args: Mapping[str, str] = field(default_factory=dict)
    capability_args: Mapping[str, Any] = field(default_factory=dict)
    loc: str = "cni.network"


@dataclass(frozen=True)
class Added:
    """What ADD gave interface `index`: the result, and where in it (`position`, an index in
    `result.interfaces`) the interface the guest's tap is joined to is, whose MAC the guest
    takes with every address the result gives it."""

    index: int
    result: CniResult
    position: int

    @property
    def mac(self) -> str:
        return self.result.interfaces[self.position].mac

    @property
    def ips(self) -> list[CniIP]:
        return self.result.ips_of(self.position)


def wanted_of(interfaces: ResolvedInterfaces, lookup: NetworkLookup) -> list[Wanted]:
    """The cni interfaces of a VM's plan, each with the inline conflist of the registered cni
    network it names (None: the conf dir's conflist of that name)."""
    wanted = []
    for interface in interfaces.interfaces:
        cni = interface.cni
        if cni is None:
            continue
        registered = lookup(cni.network)
        conflist = None if registered is None else registered.conflist
        where = "network" if interfaces.single else f"interfaces.{interface.index}"
        wanted.append(
            Wanted(
                interface.index,
                cni.network,
                conflist,
                cni.args,
                cni.capability_args,
                loc=f"{where}.cni.network",
            )
        )
    return wanted


def daemon_tag(state_dir: Path) -> str:
    """What tells this daemon's CNI container ids from another's: 8 hex digits of a hash of
    its state dir (one daemon per state dir)."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


def container_id(tag: str, vm: str) -> str:
    """CNI_CONTAINERID of a VM's attachments: stable for its name and the daemon (`tag`, a
    `daemon_tag`), so another daemon's VM of that name never shares the plugins' state, and a
    VM's stale attachments are always DELeted before a VM of the same name is attached
    again. A stored attachment keeps the id it was made with."""
    return f"roost-{tag}-{vm}"


def released_reason(reason: str | None, status: str, failures: Sequence[str]) -> str | None:
    """A VM's `status_reason` once its VMM has ended and it was detached: why it ended
    (`reason`; its `status` when there is none) followed by what detaching could not do."""
    if not failures:
        return reason
    return "; ".join([reason or status, *failures])


def ifname(index: int) -> str:
    """CNI_IFNAME of interface `index` inside the VM's namespace."""
    return f"eth{index}"


class CniAttachments:
    """Attaches VMs' cni interfaces with `runtime`, keeping each attachment in `store`, their
    container ids tagged `tag` (a `daemon_tag`); taps are made with `redirects` (owned by
    `owner`, the jailer's uid and gid, when given). A DEL that fails is told to `events`."""

    def __init__(
        self,
        runtime: Runtime,
        store: Store,
        *,
        tag: str,
        events: EventBus | None = None,
        namespaces: Namespaces | None = None,
        redirects: Redirects = host_redirect,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.tag = tag
        self.events = events or EventBus()
        self.namespaces: Namespaces = namespaces or HostNamespaces()
        self.redirects = redirects

    def add(self, steps: Steps, vm: str, wanted: Sequence[Wanted]) -> dict[int, Added]:
        """Record each wanted interface's attachment, make the VM's namespace and ADD each,
        the undo put in `steps`; what each ADD gave, by interface index. What an earlier start
        or a crash left of the VM's attachments is DELeted first (HostError when that fails);
        an unknown conflist is a 422 before anything is made; a namespace of the VM's name that
        is not this daemon's is a 409."""
        if not wanted:
            return {}
        self._clear_stale(vm)
        netns = vm_namespace(vm)
        attachments = [
            (
                one.index,
                self.runtime.attachment(
                    container_id=container_id(self.tag, vm),
                    netns=str(netns_path(netns)),  # fixed by the name, so recorded before
                    ifname=ifname(one.index),
                    network=one.network,
                    conflist=one.conflist,
                    args=dict(one.args),
                    capability_args=dict(one.capability_args),
                    loc=one.loc,
                ),
            )
            for one in wanted
        ]
        self._claim(vm, attachments)
        steps.undoable(
            f"recorded its CNI attachments and made network namespace {netns}",
            lambda: self._undo(vm),
        )
        added = {}
        for index, attachment in attachments:
            try:
                result = self.runtime.add(attachment)
            except AddUndoneError:
                # nothing to DEL later: a DEL of a list naming a missing plugin would fail for
                # ever, keeping the record and refusing every later start of the VM's name
                self.store.forget(vm, index)
                raise
            self.store.set_result(vm, index, result)
            log.info("VM %s: CNI ADD on %s for interface %d", vm, attachment.conflist.name, index)
            added[index] = _added(index, attachment, result)
        return added

    def _claim(self, vm: str, attachments: Sequence[tuple[int, Attachment]]) -> None:
        """Record the attachments, then make the namespace (whose records make it this
        daemon's): when that fails — another daemon's VM of the name holds it, or a leftover
        does — the records go and nothing of that namespace is touched."""
        netns = vm_namespace(vm)
        recorded = []
        try:
            for index, attachment in attachments:
                self.store.record(vm, index, attachment)
                recorded.append(index)
            self.namespaces.create(netns)
        except NamespaceExistsError:
            self._forget(vm, recorded)
            raise ConflictError(
                f"network namespace {netns} exists and is not this daemon's (it holds no CNI "
                f"attachment of a VM {vm!r}): another roost daemon runs a VM of that name with a "
                "cni interface, or it is a leftover; choose another name, or remove a leftover "
                f"with 'ip netns delete {netns}'"
            ) from None
        except BaseException:
            self._forget(vm, recorded)
            raise

    def _forget(self, vm: str, indexes: Sequence[int]) -> None:
        for index in indexes:
            self.store.forget(vm, index)

    def connect(
        self, steps: Steps, vm: str, index: int, tap: str, owner: tuple[int, int] | None = None
    ) -> Redirect:
        """Make tap `tap` in the VM's namespace, joined both ways to interface `index`'s CNI
        interface; its undo (the tap and the redirects removed) put in `steps`."""
        netns = vm_namespace(vm)
        made = self.redirects.connect(netns, ifname(index), tap, owner)
        steps.undoable(
            f"connected tap {tap} in {netns}",
            lambda: self.redirects.disconnect(netns, ifname(index), tap),
        )
        return made

    def release(self, vm: str) -> list[str]:
        """Detach every attachment of the VM (its VMM has ended): DEL run with the stored
        results, the namespace removed (its taps, their redirects and what the plugins left in
        it go with it), then the records that DEL cleared forgotten. A VM this daemon holds no
        record of has no namespace of its own: nothing is done. What failed, each logged and
        told in a `vm.cni_detach_failed` event; a failed DEL's record is kept for the next
        attempt."""
        stored = self.store.of_vm(vm)
        if not stored:
            return []
        return self._told(vm, self._detach(vm, stored))

    def _told(self, vm: str, failures: list[str]) -> list[str]:
        for failure in failures:
            log.error("VM %s: %s", vm, failure)
        if failures:
            self.events.publish("vm.cni_detach_failed", vm=vm, failures=failures)
        return failures

    def _detach(self, vm: str, stored: Sequence[Stored]) -> list[str]:
        """DEL each of `stored`, remove the VM's namespace, then forget those DEL cleared
        (all kept when the namespace stays: it is this daemon's while they are); what
        failed."""
        failures = []
        cleared = []
        for one in stored:
            failure = self._delete(one)
            if failure is None:
                cleared.append(one.index)
            else:
                failures.append(failure)
        try:
            self.namespaces.delete(vm_namespace(vm))
        except HostError as error:
            return [*failures, error.message]
        self._forget(vm, cleared)
        return failures

    def check(self, vm: str, taps: Mapping[int, str]) -> str | None:
        """What is wrong with a running VM's attachments (None when nothing is): each
        plugin's CHECK with the stored result, and roost's own redirect, which the plugins
        cannot see."""
        problems = []
        netns = vm_namespace(vm)
        for stored in sorted(self.store.of_vm(vm), key=lambda s: s.index):
            network = stored.attachment.conflist.name
            if stored.result is None:
                problems.append(
                    f"interface {stored.index}: CNI ADD on network {network!r} never finished; "
                    "restart the VM"
                )
                continue
            try:
                self.runtime.check(stored.attachment, stored.result)
            except HostError as error:
                problems.append(f"interface {stored.index}: {error.message}")
            tap = taps.get(stored.index)
            if tap is None:
                continue
            try:
                broken = self.redirects.check(netns, stored.attachment.ifname, tap)
            except HostError as error:
                broken = [error.message]
            if broken:
                problems.append(f"interface {stored.index}: {'; '.join(broken)}")
        return "; ".join(problems) or None

    def reap(
        self,
        in_use: Callable[[], Collection[str]],
        hold: Callable[[str], AbstractContextManager[object]],
    ) -> None:
        """At daemon start: DEL every stored attachment of a VM `in_use()` does not name (no
        VMM runs or starts for it, or it no longer exists), and remove its namespace. A
        namespace of a VM this daemon holds no record of is another daemon's (or a leftover
        for the operator), and stays. Each VM is reaped while `hold(vm)` keeps its operations
        out, and only if it is still not in use then, with its records as they are then: a
        start of a stopped VM may run meanwhile, and its new attachment has the container id
        and ifname of the stale one. Failures are logged and told; a failed DEL's record stays
        for the next start."""
        for vm in sorted({stored.vm for stored in self.store.all()}):
            with hold(vm):
                if vm in in_use():
                    continue
                self._reap_vm(vm)

    def _reap_vm(self, vm: str) -> None:
        stored = self.store.of_vm(vm)
        if not stored:
            return
        if not self._told(vm, self._detach(vm, stored)):
            log.info(
                "DELeted the CNI attachments of %s and removed %s, which no running VM holds",
                vm,
                vm_namespace(vm),
            )

    def _clear_stale(self, vm: str) -> None:
        stale = self.store.of_vm(vm)
        failures = self._detach(vm, stale) if stale else []
        if failures:
            raise HostError(
                f"VM {vm!r} still has a CNI attachment from an earlier start that DEL cannot "
                f"remove: {'; '.join(failures)}; fix the plugin's problem and start it again"
            )

    def _undo(self, vm: str) -> None:
        """Undo an attach: DEL what it recorded, remove the namespace it made."""
        failures = self._detach(vm, self.store.of_vm(vm))
        if failures:
            raise HostError("; ".join(failures))

    def _delete(self, stored: Stored) -> str | None:
        """DEL one attachment; the failure (its record to be kept), or None."""
        try:
            self.runtime.delete(stored.attachment, stored.result)
        except HostError as error:
            return (
                f"CNI DEL of interface {stored.index} on network "
                f"{stored.attachment.conflist.name!r} failed, kept for another try: "
                f"{error.message}"
            )
        return None


def _added(index: int, attachment: Attachment, result: CniResult) -> Added:
    """ADD's result for one interface, which must name the interface it put in the VM's
    namespace (the one the tap is joined to)."""
    try:
        position, interface = result.sandbox_interface(attachment.ifname, attachment.netns)
    except ValueError as error:
        raise HostError(
            f"CNI network {attachment.conflist.name!r} made no interface for the VM: {error}"
        ) from None
    if not interface.mac:  # the guest's NIC takes it
        raise HostError(
            f"CNI network {attachment.conflist.name!r} gave interface {attachment.ifname} "
            "no MAC address in its result; the guest needs it"
        )
    return Added(index, result, position)


class DatabaseStore:
    """The attachments in the daemon's database (`roost.state.cni`), each write its own
    committed transaction: those of cluster host `host_id` (set once the agent has joined;
    None on a single host)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.host_id: int | None = None

    def record(self, vm: str, index: int, attachment: Attachment) -> None:
        self.db.transact(
            lambda session: state_cni.record(
                session, vm, index, attachment.conflist.name, attachment.to_json(), self.host_id
            )
        )

    def set_result(self, vm: str, index: int, result: CniResult) -> None:
        self.db.transact(
            lambda session: state_cni.set_result(session, vm, index, result.to_json(), self.host_id)
        )

    def forget(self, vm: str, index: int) -> None:
        self.db.transact(lambda session: state_cni.forget(session, vm, index, self.host_id))

    def of_vm(self, vm: str) -> list[Stored]:
        with self.db.read() as session:
            return [_stored(one) for one in state_cni.of_vm(session, vm, self.host_id)]

    def all(self) -> list[Stored]:
        with self.db.read() as session:
            return [_stored(one) for one in state_cni.every(session, self.host_id)]


def _stored(one: state_cni.StoredAttachment) -> Stored:
    result = None if one.result is None else parse_result(one.result)
    return Stored(one.vm, one.index, Attachment.from_json(one.attachment), result)
