"""CNI in the database: networks of kind `cni` (an inline conflist, no bridge, no subnet) and
each VM interface's attachment to a CNI network.

An attachment is recorded before ADD runs (what ADD runs with, exactly as
`roost.host.cni.Attachment.to_json` gives it), gets ADD's result once ADD has finished, and is
forgotten only once DEL has run. It is keyed by the VM's name and interface index and outlives
the VM's record (its `vm_id` then turns None): a daemon that died between ADD and DEL, or whose
DEL failed, finds it and runs DEL again. In a cluster an attachment is the host's that ran ADD
(`host_id`): every function below sees only the attachments of the host it is given (None: a
single host's), so no host ever DELs what another host's plugins made. Every function runs
inside the caller's transaction (`Database.transact`, or `Database.read` for the readers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select
from sqlalchemy.orm import Session

from roost.errors import ConflictError
from roost.state import alloc
from roost.state.db import hold_lock
from roost.state.models import VM, CniAttachment, Network

CNI = "cni"  # a network's kind
# the fields of `roost.host.cni.Attachment.to_json`, each a column
ATTACHMENT_FIELDS = ("conflist", "container_id", "netns", "ifname", "args", "capability_args")


def _on_host(host_id: int | None) -> ColumnElement[bool]:
    """The attachments of host `host_id`, by their unique index's expression (host 0: none)."""
    return func.coalesce(CniAttachment.host_id, 0) == (host_id or 0)


def _of(vm: str, index: int, host_id: int | None) -> tuple[ColumnElement[bool], ...]:
    return (CniAttachment.vm == vm, CniAttachment.index == index, _on_host(host_id))


@dataclass(frozen=True)
class StoredAttachment:
    """An attachment as recorded: `attachment` is what `Attachment.from_json` reads; `result`
    is ADD's (None until ADD finished); `vm_id` is None once the VM's record is gone."""

    vm: str
    index: int
    network: str
    attachment: dict[str, Any]
    result: dict[str, Any] | None
    vm_id: int | None


def add_network(session: Session, name: str, conflist: dict[str, Any]) -> Network:
    """Record cni network `name` running `conflist` (as `roost.spec.cni.Conflist.to_json`
    gives it); 409 `conflict` when another network has the name (on any host: a cni network
    is the cluster's)."""
    hold_lock(session.connection(), alloc.NETWORKS_LOCK)
    alloc.check_name_free(session, name)
    network = Network(name=name, kind=CNI, bridge=None, conflist=conflist)
    session.add(network)
    session.flush()
    return network


def record(
    session: Session,
    vm: str,
    index: int,
    network: str,
    attachment: dict[str, Any],
    host_id: int | None = None,
) -> None:
    """Record interface `index` of VM `vm` as attached to CNI network `network` with
    `attachment` on host `host_id`, before ADD runs. An interface has one attachment at a time
    on a host: 409 while it still has one (DEL it and `forget` it first)."""
    held = session.scalar(select(CniAttachment.network).where(*_of(vm, index, host_id)))
    if held is not None:
        raise ConflictError(
            f"interface {index} of VM {vm!r} still has a CNI attachment to {held!r}; it must be "
            "deleted (CNI DEL) before another is made"
        )
    vm_id = session.scalar(select(VM.id).where(VM.name == vm))
    fields = {field: attachment[field] for field in ATTACHMENT_FIELDS}
    session.add(
        CniAttachment(vm=vm, vm_id=vm_id, index=index, network=network, host_id=host_id, **fields)
    )
    session.flush()


def set_result(
    session: Session, vm: str, index: int, result: dict[str, Any], host_id: int | None = None
) -> None:
    """Keep ADD's `result` (as `CniResult.to_json` gives it): what CHECK and DEL are given."""
    row = session.scalar(select(CniAttachment).where(*_of(vm, index, host_id)))
    if row is None:
        raise ConflictError(
            f"interface {index} of VM {vm!r} has no CNI attachment recorded to keep a result for"
        )
    row.result = result


def forget(session: Session, vm: str, index: int, host_id: int | None = None) -> None:
    """Drop an attachment once DEL has run (nothing of it is left on the host); nothing
    when there is none."""
    session.execute(delete(CniAttachment).where(*_of(vm, index, host_id)))


def of_vm(session: Session, vm: str, host_id: int | None = None) -> list[StoredAttachment]:
    """VM `vm`'s attachments on host `host_id` (its record's, or left from a VM of that
    name), by index."""
    return _stored(session, vm, host_id)


def every(session: Session, host_id: int | None = None) -> list[StoredAttachment]:
    """Every attachment of host `host_id`, by VM name and index: what a starting daemon
    checks or DELs."""
    return _stored(session, None, host_id)


def _stored(session: Session, vm: str | None, host_id: int | None) -> list[StoredAttachment]:
    query = (
        select(CniAttachment)
        .where(_on_host(host_id))
        .order_by(CniAttachment.vm, CniAttachment.index)
    )
    if vm is not None:
        query = query.where(CniAttachment.vm == vm)
    return [
        StoredAttachment(
            vm=row.vm,
            index=row.index,
            network=row.network,
            attachment={field: getattr(row, field) for field in ATTACHMENT_FIELDS},
            result=row.result,
            vm_id=row.vm_id,
        )
        for row in session.scalars(query)
    ]
