"""Moving a VM's record from one host of a cluster to another (a drain): only the record, for
a VM whose VMM does not run, so nothing of it runs anywhere while it moves.

One transaction per VM: its row is locked and judged again (a start on its host writes
`starting` to that row first, so of the two one sees the other's), then the VM gets a CID on
its new host, the new host's capacity is taken (`Hosts.reserve`: only an active host with room)
and the old host's given back. The locks are taken in the order creates, patches and removals
take theirs (the VM's row, the new host's CID lock, host rows by id), so a move never deadlocks
with them. The VM keeps its name, addresses and MACs (tap names are unique in the cluster).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.orm import Session

from roost.state import alloc, forwards
from roost.state.hosts import Hosts
from roost.state.models import VM, Host, IPLease, Network
from roost.state.vms import LIVE, Holding, VMStatus

# a VM in one of these has no VMM: its record may move
MOVABLE = frozenset({VMStatus.CREATED, VMStatus.STOPPED, VMStatus.CRASHED, VMStatus.ERROR})

_ON_HOST = (
    select(VM.id, VM.name, VM.status, VM.reserved_vcpus, VM.reserved_memory_mib)
    .where(VM.host_id == bindparam("host_id"))
    .order_by(VM.name)
)
_LOCKED = (
    select(VM.host_id, VM.status, VM.reserved_vcpus, VM.reserved_memory_mib)
    .where(VM.id == bindparam("vm_id"))
    .with_for_update()
)
_LOCAL_NETWORKS = (
    select(Network.name)
    .join(IPLease, IPLease.network_id == Network.id)
    .where(IPLease.vm_id == bindparam("vm_id"), Network.host_id.is_not(None))
    .distinct()
    .order_by(Network.name)
)
_LOCK_HOSTS = (
    select(Host.id)
    .where(Host.id.in_(bindparam("host_ids", expanding=True)))
    .order_by(Host.id)
    .with_for_update()
)
_MOVE = (
    update(VM)
    .where(VM.id == bindparam("vm_id"))
    .values(
        host_id=bindparam("to_host"),
        reserved_vcpus=bindparam("new_vcpus"),
        reserved_memory_mib=bindparam("new_memory_mib"),
    )
)


@dataclass(frozen=True)
class HostedVM:
    """A VM of the host being drained, as the drain judges it."""

    id: int
    name: str
    status: str
    reserved_vcpus: int | None
    reserved_memory_mib: int | None
    local_networks: list[str]


class NoRoomError(Exception):
    """The new host had no room (or was no longer active) when the move tried to take it."""


class LeftHostError(Exception):
    """The VM left the host meanwhile: removed, or moved by another drain."""


def set_cordoned(connection: Connection, name: str, cordoned: bool) -> bool | None:
    """Cordon (or uncordon) host `name`: whether that changed it (None: no such host)."""
    changed = connection.execute(
        update(Host)
        .where(Host.name == name, Host.cordoned != cordoned)
        .values(cordoned=cordoned)
        .returning(Host.id)
    ).first()
    if changed is not None:
        return True
    known = connection.execute(select(Host.id).where(Host.name == name)).first()
    return None if known is None else False


def vms_on(session: Session, host_id: int) -> list[HostedVM]:
    """The VMs recorded on host `host_id`, by name, with the host-local networks (`external`,
    `dhcp`: that host's own) they hold addresses on."""
    connection = session.connection()
    return [
        HostedVM(
            row.id,
            row.name,
            row.status,
            row.reserved_vcpus,
            row.reserved_memory_mib,
            list(connection.execute(_LOCAL_NETWORKS, {"vm_id": row.id}).scalars()),
        )
        for row in connection.execute(_ON_HOST, {"host_id": host_id})
    ]


def unmovable(status: str) -> str | None:
    """Why a VM in `status` cannot move (None: it can)."""
    if status in LIVE:
        return "running: stop it or remove it"
    if status == VMStatus.LOST:
        return "lost: its host was offline past the grace; remove it"
    if status not in MOVABLE:
        return f"{status}: only a VM without a VMM moves"
    return None


def move(
    session: Session,
    vm: HostedVM,
    source: int,
    target: int,
    vcpus: int,
    memory_mib: int,
    offline_after: float,
) -> str | None:
    """Move `vm` from host `source` to host `target`, where it takes `vcpus` and `memory_mib`
    (in the caller's transaction). Why it stays, if its status changed since it was judged
    (None: it moved); `LeftHostError` if it is no longer on `source`, `NoRoomError` when
    `target` cannot take it now (the caller rolls back).

    The drain judged "no disk copy" from `vm.status`: a VM judged `created` that was started
    and stopped since may have one now, so any change of status keeps it here (its status
    never returns to `created`, and its artifacts never change, so an unchanged status keeps
    that judgement true)."""
    connection = session.connection()
    now = connection.execute(_LOCKED, {"vm_id": vm.id}).first()
    if now is None or now.host_id != source:
        raise LeftHostError(vm.name)
    reason = unmovable(now.status)
    if reason is not None:
        return reason
    if now.status != vm.status:
        return f"{now.status}: changed while the drain judged it; drain again"
    clash = forwards.clash_on(connection, vm.id, target)
    if clash is not None:
        return (
            f"its forward on {clash.listen} is held there by VM {clash.vm!r}: remove one of "
            "them (roost vm unforward)"
        )
    alloc.allocate_cid(session, Holding(vm.id, vm.name, target))  # its old one stays there
    connection.execute(_LOCK_HOSTS, {"host_ids": sorted({source, target})}).all()
    if not Hosts.reserve(connection, target, vcpus, memory_mib, offline_after):
        raise NoRoomError(target)
    if now.reserved_vcpus is not None:
        Hosts.release(connection, source, now.reserved_vcpus, now.reserved_memory_mib or 0)
    connection.execute(
        _MOVE,
        {"vm_id": vm.id, "to_host": target, "new_vcpus": vcpus, "new_memory_mib": memory_mib},
    )
    forwards.move(connection, vm.id, target)
    return None
