"""The CNI side of a VM's life: its `cni` interfaces attached when it starts, detached when its
VMM ends, checked after a daemon restart, and what a crash left behind reaped at start.

A start makes the VM's namespace `roost-vm-<name>` (one for all its cni interfaces), then per
interface records the attachment (committed before ADD, so a DEL can follow a crash in the
middle of it), runs ADD and stores the result; once the VM's tap names are known, each tap is
made in the namespace and joined to the result's interface by tc redirects. Each step's undo
goes into the operation's `Steps`. Detaching runs DEL with the stored result (None when ADD
never finished: DEL is idempotent and works from what the plugins keep themselves), removes
the namespace and forgets the records; a DEL that fails keeps its record, so the next start of
the VM, or the next daemon start, runs it again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from roost.engine.steps import Steps
from roost.errors import HostError
from roost.host import cni as host_cni
from roost.host import redirect as host_redirect
from roost.host.cni import VM_NAMESPACE_PREFIX, AddUndoneError, Attachment, vm_namespace
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
    ) -> Attachment: ...

    def add(self, attachment: Attachment) -> CniResult: ...

    def delete(self, attachment: Attachment, result: CniResult | None) -> None: ...

    def check(self, attachment: Attachment, result: CniResult) -> None: ...


class Namespaces(Protocol):
    """The VMs' network namespaces (`HostNamespaces`)."""

    def create(self, name: str) -> Path: ...

    def delete(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...


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

    def names(self) -> list[str]:
        return host_cni.namespaces()


@dataclass(frozen=True)
class Wanted:
    """One cni interface of a VM as its plan has it: its index, the CNI network it names (with
    the conflist of the roost network of that name, None to read the conf dir), and what the
    plugins are given."""

    index: int
    network: str
    conflist: Conflist | None = None
    args: Mapping[str, str] = field(default_factory=dict)
    capability_args: Mapping[str, Any] = field(default_factory=dict)


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
        wanted.append(Wanted(interface.index, cni.network, conflist, cni.args, cni.capability_args))
    return wanted


def container_id(vm: str) -> str:
    """CNI_CONTAINERID of a VM's attachments: stable for its name (a VM's stale attachments
    are always DELeted before a VM of the same name is attached again)."""
    return f"roost-{vm}"


def ifname(index: int) -> str:
    """CNI_IFNAME of interface `index` inside the VM's namespace."""
    return f"eth{index}"


class CniAttachments:
    """Attaches VMs' cni interfaces with `runtime`, keeping each attachment in `store`; taps
    are made with `redirects` (owned by `owner`, the jailer's uid and gid, when given)."""

    def __init__(
        self,
        runtime: Runtime,
        store: Store,
        *,
        namespaces: Namespaces | None = None,
        redirects: Redirects = host_redirect,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.namespaces: Namespaces = namespaces or HostNamespaces()
        self.redirects = redirects

    def add(self, steps: Steps, vm: str, wanted: Sequence[Wanted]) -> dict[int, Added]:
        """Make the VM's namespace and ADD each wanted interface, every step's undo put in
        `steps`; what each ADD gave, by interface index. What an earlier start or a crash left
        of the VM's attachments is DELeted first (HostError when that fails)."""
        if not wanted:
            return {}
        self._clear_stale(vm)
        netns = vm_namespace(vm)
        path = self.namespaces.create(netns)
        steps.undoable(f"made network namespace {netns}", lambda: self.namespaces.delete(netns))
        added = {}
        for one in wanted:
            attachment = self.runtime.attachment(
                container_id=container_id(vm),
                netns=str(path),
                ifname=ifname(one.index),
                network=one.network,
                conflist=one.conflist,
                args=dict(one.args),
                capability_args=dict(one.capability_args),
            )
            self.store.record(vm, one.index, attachment)
            steps.undoable(
                f"recorded CNI attachment {one.index} to {attachment.conflist.name}",
                functools.partial(self._undo_attachment, vm, one.index),
            )
            try:
                result = self.runtime.add(attachment)
            except AddUndoneError:
                # nothing to DEL later: a DEL of a list naming a missing plugin would fail for
                # ever, keeping the record and refusing every later start of the VM's name
                self.store.forget(vm, one.index)
                raise
            self.store.set_result(vm, one.index, result)
            log.info(
                "VM %s: CNI ADD on %s for interface %d", vm, attachment.conflist.name, one.index
            )
            added[one.index] = _added(one.index, attachment, result)
        return added

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
        results, the records that DEL cleared forgotten, then the namespace removed (its taps,
        their redirects and what the plugins left in it go with it). What failed, each logged;
        a failed DEL's record is kept for the next attempt."""
        failures = [f for f in map(self._delete, self.store.of_vm(vm)) if f is not None]
        try:
            self.namespaces.delete(vm_namespace(vm))
        except HostError as error:
            failures.append(error.message)
        for failure in failures:
            log.error("VM %s: %s", vm, failure)
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
        ours: Callable[[], Collection[str]],
        hold: Callable[[str], AbstractContextManager[object]],
    ) -> None:
        """At daemon start: DEL every stored attachment of a VM `in_use()` does not name (no
        VMM runs or starts for it, or it no longer exists), and remove the namespaces of this
        daemon's VMs (`ours()`, and those with a stored attachment) that are not in use.
        Namespaces are the host's while a daemon is its network namespace's: one of a VM this
        daemon does not know is another daemon's, and stays. Each VM is reaped while `hold(vm)`
        keeps its operations out, and only if it is still not in use then, with its records as
        they are then: a start of a stopped VM may run meanwhile, and its new attachment has
        the container id and ifname of the stale one. Failures are logged; a failed DEL's
        record stays for the next start."""
        stale = {stored.vm for stored in self.store.all()}
        netnses = set(self.namespaces.names())
        known = set(ours()) | stale
        named = {netns.removeprefix(VM_NAMESPACE_PREFIX) for netns in netnses}
        for vm in sorted(stale | named & known):
            with hold(vm):
                if vm in in_use():
                    continue
                self._reap_vm(vm, vm_namespace(vm) in netnses)

    def _reap_vm(self, vm: str, has_namespace: bool) -> None:
        for stored in self.store.of_vm(vm):
            failure = self._delete(stored)
            if failure is None:
                log.info(
                    "DELeted CNI attachment %d of %s, which no running VM holds", stored.index, vm
                )
            else:
                log.error("VM %s: %s", vm, failure)
        if not has_namespace:
            return
        try:
            self.namespaces.delete(vm_namespace(vm))
            log.info("removed network namespace %s, which no running VM uses", vm_namespace(vm))
        except HostError as error:
            log.error("%s", error.message)

    def _clear_stale(self, vm: str) -> None:
        failures = [f for f in map(self._delete, self.store.of_vm(vm)) if f is not None]
        if failures:
            raise HostError(
                f"VM {vm!r} still has a CNI attachment from an earlier start that DEL cannot "
                f"remove: {'; '.join(failures)}; fix the plugin's problem and start it again"
            )

    def _delete(self, stored: Stored) -> str | None:
        """DEL one attachment and forget it; the failure, its record kept, or None."""
        try:
            self.runtime.delete(stored.attachment, stored.result)
        except HostError as error:
            return (
                f"CNI DEL of interface {stored.index} on network "
                f"{stored.attachment.conflist.name!r} failed, kept for another try: "
                f"{error.message}"
            )
        self.store.forget(stored.vm, stored.index)
        return None

    def _undo_attachment(self, vm: str, index: int) -> None:
        for stored in self.store.of_vm(vm):
            if stored.index == index:
                failure = self._delete(stored)
                if failure is not None:
                    raise HostError(failure)


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
    committed transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, vm: str, index: int, attachment: Attachment) -> None:
        self.db.transact(
            lambda session: state_cni.record(
                session, vm, index, attachment.conflist.name, attachment.to_json()
            )
        )

    def set_result(self, vm: str, index: int, result: CniResult) -> None:
        self.db.transact(lambda session: state_cni.set_result(session, vm, index, result.to_json()))

    def forget(self, vm: str, index: int) -> None:
        self.db.transact(lambda session: state_cni.forget(session, vm, index))

    def of_vm(self, vm: str) -> list[Stored]:
        with self.db.read() as session:
            return [_stored(one) for one in state_cni.of_vm(session, vm)]

    def all(self) -> list[Stored]:
        with self.db.read() as session:
            return [_stored(one) for one in state_cni.every(session)]


def _stored(one: state_cni.StoredAttachment) -> Stored:
    result = None if one.result is None else parse_result(one.result)
    return Stored(one.vm, one.index, Attachment.from_json(one.attachment), result)
