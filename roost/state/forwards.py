"""Forwards the daemon holds for VMs (`vm forward --persist`): a loopback TCP address whose
connections are relayed to a guest's vsock port. The rows say what to listen on, so a
restarted daemon listens again; a VM's rows go with its record (the foreign key cascades). An
address is held on one host: in a cluster a forward records its VM's host (`host_id`, moved with
the VM), and two hosts may listen on the same address.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from roost.errors import ConflictError, NotFoundError
from roost.state.models import VM, VsockForward
from roost.state.vms import no_vm

MAX_ID = 2**63 - 1  # SQLite's largest integer
_COLUMNS = (VsockForward.id, VM.name, VsockForward.listen, VsockForward.guest_port)
_ALL = select(*_COLUMNS).join(VM, VM.id == VsockForward.vm_id).order_by(VsockForward.id)
_OF_VM = _ALL.where(VM.name == bindparam("name"))
_HOLDER = _ALL.where(
    VsockForward.listen == bindparam("listen"),
    func.coalesce(VsockForward.host_id, 0) == bindparam("host"),
)
_VM_ID = select(VM.id).where(VM.name == bindparam("name"))
_VM_HOST = select(VM.id, VM.host_id).where(VM.name == bindparam("name"))
_ADD = insert(VsockForward).returning(VsockForward.id)
_REMOVE = delete(VsockForward).where(
    VsockForward.id == bindparam("forward_id"), VsockForward.vm_id == bindparam("vm_id")
)


@dataclass(frozen=True)
class Forward:
    """One persisted forward: `listen` (`ADDR:PORT`) relayed to `guest_port` of VM `vm`."""

    id: int
    vm: str
    listen: str
    guest_port: int

    def to_json(self) -> dict[str, Any]:
        """The API's object for a forward (its VM is in the route)."""
        return {"id": self.id, "listen": self.listen, "guest_port": self.guest_port}


def _vm_id(connection: Connection, name: str) -> int:
    vm_id = connection.execute(_VM_ID, {"name": name}).scalar()
    if vm_id is None:
        raise no_vm(name)
    return int(vm_id)


def taken(holder: Forward, listen: str) -> ConflictError:
    """The error for an address that forward `holder` already listens on."""
    return ConflictError(
        f"{listen} is already forward {holder.id} of VM {holder.vm!r} (to its vsock port "
        f"{holder.guest_port}); remove it first (roost vm unforward {holder.vm} {holder.id}) "
        "or choose another address"
    )


def holder(connection: Connection, listen: str, host_id: int | None = None) -> Forward | None:
    """The forward that holds address `listen` on host `host_id` (None: a single host), if
    one does."""
    row = connection.execute(_HOLDER, {"listen": listen, "host": host_id or 0}).first()
    return None if row is None else Forward(*row)


def add(connection: Connection, name: str, listen: str, guest_port: int) -> Forward:
    """Record a forward of VM `name` on its host (in `Database.transact`); `NotFoundError`
    without the VM, `ConflictError` naming the forward that holds `listen` there already."""
    vm = connection.execute(_VM_HOST, {"name": name}).first()
    if vm is None:
        raise no_vm(name)
    found = holder(connection, listen, vm.host_id)
    if found is not None:
        raise taken(found, listen)
    # a writer that took `listen` meanwhile breaks the unique constraint: `Database.transact`
    # runs this again, which then finds the holder
    values = {"vm_id": vm.id, "listen": listen, "guest_port": guest_port, "host_id": vm.host_id}
    forward_id = connection.execute(_ADD, values).scalar_one()
    return Forward(forward_id, name, listen, guest_port)


def of_vm(connection: Connection, name: str) -> list[Forward]:
    """VM `name`'s forwards, oldest first; `NotFoundError` without the VM."""
    _vm_id(connection, name)
    return [Forward(*row) for row in connection.execute(_OF_VM, {"name": name})]


def every(connection: Connection, host_id: int | None = None) -> list[Forward]:
    """Every VM's forwards, or those of host `host_id`'s VMs (a cluster's agent): what a
    starting daemon listens on again."""
    found = _ALL if host_id is None else _ALL.where(VsockForward.host_id == host_id)
    return [Forward(*row) for row in connection.execute(found)]


def remove(connection: Connection, name: str, forward_id: int) -> None:
    """Delete forward `forward_id` of VM `name`; `NotFoundError` when either does not exist."""
    vm_id = _vm_id(connection, name)
    if (
        not 0 < forward_id <= MAX_ID  # else no row: SQLite cannot even hold the number
        or connection.execute(_REMOVE, {"forward_id": forward_id, "vm_id": vm_id}).rowcount == 0
    ):
        raise NotFoundError(
            f"VM {name!r} has no forward {forward_id}; list them with roost vm forwards {name}"
        )


def clash_on(connection: Connection, vm_id: int, host_id: int) -> Forward | None:
    """A forward on host `host_id` holding an address one of VM `vm_id`'s forwards listens on
    (what keeps the VM from moving there), if there is one."""
    own = select(VsockForward.listen).where(VsockForward.vm_id == vm_id)
    row = connection.execute(
        _ALL.where(VsockForward.host_id == host_id, VsockForward.listen.in_(own)).limit(1)
    ).first()
    return None if row is None else Forward(*row)


def move(connection: Connection, vm_id: int, host_id: int) -> None:
    """VM `vm_id`'s forwards listen on host `host_id` from now on (its record moved there)."""
    connection.execute(
        update(VsockForward).where(VsockForward.vm_id == vm_id).values(host_id=host_id)
    )
