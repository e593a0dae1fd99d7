"""What a placed VM holds of its host's capacity (a cluster's; nothing on a single host): taken
in the transaction that records the VM, changed by a resources patch in the patch's, given back
in the one that removes it. The host's `allocated_*` stays the sum of its VMs' `reserved_*`.

The host's row is locked by `Hosts.reserve` until the caller commits, so the callers here run
last in their transactions: creates on one host queue on that row only for their commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, bindparam, func, select, update

from roost.errors import ConflictError
from roost.state.hosts import Hosts
from roost.state.models import VM, Host
from roost.state.vms import VMStatus

_HELD = select(VM.host_id, VM.reserved_vcpus, VM.reserved_memory_mib).where(
    VM.id == bindparam("vm_id")
)
_SET_HELD = (
    update(VM)
    .where(VM.id == bindparam("vm_id"))
    .values(reserved_vcpus=bindparam("new_vcpus"), reserved_memory_mib=bindparam("new_memory_mib"))
)
# a VM's host as a request for it is routed: one lookup by the unique index on vms.name
_HOST_OF = (
    select(
        VM.host_id,
        Host.name,
        Host.api,
        (func.now() - Host.heartbeat_at >= bindparam("offline_after")).label("offline"),
        (VM.status == VMStatus.LOST.value).label("lost"),
    )
    .join(Host, Host.id == VM.host_id)
    .where(VM.name == bindparam("vm_name"))
)


@dataclass(frozen=True)
class VMHost:
    """The host a VM lives on, as a request for the VM is routed; `lost`: the cluster
    declared the VM lost."""

    id: int
    name: str
    api: str
    offline: bool
    lost: bool


def host_of(connection: Connection, vm_name: str, offline_after: float) -> VMHost | None:
    """The host VM `vm_name` lives on (None: no such VM, or one with no host); `offline` when
    its heartbeat is older than `offline_after` seconds by the database's clock."""
    found = connection.execute(
        _HOST_OF, {"vm_name": vm_name, "offline_after": timedelta(seconds=offline_after)}
    ).first()
    if found is None:
        return None
    return VMHost(found.host_id, found.name, found.api, bool(found.offline), bool(found.lost))


def no_capacity(host: str | int, vcpus: int, memory_mib: int) -> ConflictError:
    return ConflictError(
        f"host {host} has no room for {vcpus} vCPUs and {memory_mib} MiB now (or is not "
        "active); remove VMs, choose another host or ask for less",
        code="no_capacity",
    )


def reserve(
    connection: Connection,
    vm_id: int,
    host_id: int,
    vcpus: int,
    memory_mib: int,
    offline_after: float,
) -> None:
    """Take `vcpus` and `memory_mib` of host `host_id` for new VM `vm_id`, in the caller's
    transaction; 409 `no_capacity` (nothing taken) when the host has no room or is not active."""
    if not Hosts.reserve(connection, host_id, vcpus, memory_mib, offline_after):
        raise no_capacity(_name(connection, host_id), vcpus, memory_mib)
    connection.execute(
        _SET_HELD, {"vm_id": vm_id, "new_vcpus": vcpus, "new_memory_mib": memory_mib}
    )


def resize(
    connection: Connection, vm_id: int, vcpus: int, memory_mib: int, offline_after: float
) -> None:
    """Make VM `vm_id` hold `vcpus` and `memory_mib` of its host (a resources patch), in the
    caller's transaction: more is taken only if the host has room now (409 `no_capacity`),
    less is given back. Nothing for a VM that holds no reservation (a single host's)."""
    held = connection.execute(_HELD, {"vm_id": vm_id}).first()
    if held is None or held.host_id is None or held.reserved_vcpus is None:
        return
    more_vcpus = vcpus - held.reserved_vcpus
    more_memory = memory_mib - (held.reserved_memory_mib or 0)
    if more_vcpus == 0 and more_memory == 0:
        return
    if more_vcpus > 0 or more_memory > 0:
        if not Hosts.reserve(connection, held.host_id, more_vcpus, more_memory, offline_after):
            raise no_capacity(_name(connection, held.host_id), vcpus, memory_mib)
    else:
        Hosts.release(connection, held.host_id, -more_vcpus, -more_memory)
    connection.execute(
        _SET_HELD, {"vm_id": vm_id, "new_vcpus": vcpus, "new_memory_mib": memory_mib}
    )


def release(connection: Connection, vm_id: int) -> None:
    """Give back what VM `vm_id` holds of its host, in the transaction that removes it. Its
    row is locked first (as a drain's move locks it): a move that committed meanwhile is read,
    so its new host's share is given back, not its old host's a second time."""
    held = connection.execute(_HELD.with_for_update(), {"vm_id": vm_id}).first()
    if held is None or held.host_id is None or held.reserved_vcpus is None:
        return
    Hosts.release(connection, held.host_id, held.reserved_vcpus, held.reserved_memory_mib or 0)


def _name(connection: Connection, host_id: int) -> str:
    name = connection.execute(select(Host.name).where(Host.id == host_id)).scalar()
    return repr(name) if name is not None else f"#{host_id}"
