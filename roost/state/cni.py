"""CNI in the database: networks of kind `cni` (an inline conflist, no bridge, no subnet) and
each VM interface's attachment to a CNI network.

An attachment is recorded before ADD runs (what ADD runs with, exactly as
`roost.host.cni.Attachment.to_json` gives it), gets ADD's result once ADD has finished, and is
forgotten only once DEL has run. It is keyed by the VM's name and interface index and outlives
the VM's record (its `vm_id` then turns None): a daemon that died between ADD and DEL, or whose
DEL failed, finds it and runs DEL again. Every function runs inside the caller's transaction
(`Database.transact`, or `Database.read` for the readers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from roost.errors import ConflictError
from roost.state.models import VM, CniAttachment, Network

CNI = "cni"  # a network's kind
# the fields of `roost.host.cni.Attachment.to_json`, each a column
ATTACHMENT_FIELDS = ("conflist", "container_id", "netns", "ifname", "args", "capability_args")


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
    gives it); 409 `conflict` when another network has the name."""
    if session.scalar(select(Network.id).where(Network.name == name)) is not None:
        raise ConflictError(f"network {name!r} already exists; choose another name")
    network = Network(name=name, kind=CNI, bridge=None, conflist=conflist)
    session.add(network)
    session.flush()
    return network


def record(session: Session, vm: str, index: int, network: str, attachment: dict[str, Any]) -> None:
    """Record interface `index` of VM `vm` as attached to CNI network `network` with
    `attachment`, before ADD runs. An interface has one attachment at a time: 409 while it
    still has one (DEL it and `forget` it first)."""
    held = session.scalar(
        select(CniAttachment.network).where(CniAttachment.vm == vm, CniAttachment.index == index)
    )
    if held is not None:
        raise ConflictError(
            f"interface {index} of VM {vm!r} still has a CNI attachment to {held!r}; it must be "
            "deleted (CNI DEL) before another is made"
        )
    vm_id = session.scalar(select(VM.id).where(VM.name == vm))
    fields = {field: attachment[field] for field in ATTACHMENT_FIELDS}
    session.add(CniAttachment(vm=vm, vm_id=vm_id, index=index, network=network, **fields))
    session.flush()


def set_result(session: Session, vm: str, index: int, result: dict[str, Any]) -> None:
    """Keep ADD's `result` (as `CniResult.to_json` gives it): what CHECK and DEL are given."""
    row = _row(session, vm, index)
    if row is None:
        raise ConflictError(
            f"interface {index} of VM {vm!r} has no CNI attachment recorded to keep a result for"
        )
    row.result = result


def forget(session: Session, vm: str, index: int) -> None:
    """Drop an attachment once DEL has run (nothing of it is left on the host); nothing
    when there is none."""
    session.execute(
        delete(CniAttachment).where(CniAttachment.vm == vm, CniAttachment.index == index)
    )


def of_vm(session: Session, vm: str) -> list[StoredAttachment]:
    """VM `vm`'s attachments (its record's, or left from a VM of that name), by index."""
    return _stored(session, vm)


def every(session: Session) -> list[StoredAttachment]:
    """Every attachment, by VM name and index: what a starting daemon checks or DELs."""
    return _stored(session, None)


def _row(session: Session, vm: str, index: int) -> CniAttachment | None:
    return session.scalar(
        select(CniAttachment).where(CniAttachment.vm == vm, CniAttachment.index == index)
    )


def _stored(session: Session, vm: str | None) -> list[StoredAttachment]:
    query = select(CniAttachment).order_by(CniAttachment.vm, CniAttachment.index)
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
