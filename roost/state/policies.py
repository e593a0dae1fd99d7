"""Stored network policies, and which VMs name them.

A VM names a policy in its interfaces' `policies`, which its config versions' `effective` keep
(`network.policies` for the single form, `interfaces.<i>.policies` for each interface; the key
is there only when the list is not empty). A policy is in use while the latest config version of
a VM names it (what its next start enforces) or the version it runs does (what its tap enforces
now).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, or_, select
from sqlalchemy.orm import Session

from roost.spec.policy import NETWORK_REFERENCE, Policy
from roost.state.models import VM, VMConfigVersion, utcnow
from roost.state.models import Policy as PolicyRow


def stored_body(policy: Policy) -> dict[str, Any]:
    return policy.model_dump(mode="json")


def policy_of(row: PolicyRow) -> Policy:
    """A stored policy, as it was given (it was judged when it was stored)."""
    return Policy.model_validate(row.body)


def find(session: Session, name: str) -> PolicyRow | None:
    return session.scalar(select(PolicyRow).where(PolicyRow.name == name))


def rows(session: Session) -> list[PolicyRow]:
    return list(session.scalars(select(PolicyRow).order_by(PolicyRow.name)))


def existing_names(session: Session, names: Iterable[str]) -> set[str]:
    """Those of `names` that are stored policies."""
    wanted = set(names)
    if not wanted:
        return set()
    return set(session.scalars(select(PolicyRow.name).where(PolicyRow.name.in_(wanted))))


def add(session: Session, policy: Policy) -> PolicyRow:
    row = PolicyRow(name=policy.name, body=stored_body(policy))
    session.add(row)
    session.flush()
    return row


def replace(row: PolicyRow, policy: Policy) -> None:
    row.body = stored_body(policy)
    row.updated_at = utcnow()


def naming_network(session: Session, network: str) -> list[str]:
    """The policies (sorted) a rule of which names `@<network>`: their chains hold its
    addresses, so the network may not go while they do."""
    reference = NETWORK_REFERENCE + network
    return [
        row.name
        for row in rows(session)
        if any(
            reference in (rule.get(field) or ())
            for direction in ("ingress", "egress")
            for rule in row.body.get(direction, ())
            for field in ("source", "destination")
        )
    ]


def named_policies(effective: dict[str, Any]) -> set[str]:
    """The policies a config version's `effective` names, on its network or any interface."""
    names = set((effective.get("network") or {}).get("policies") or ())
    for interface in effective.get("interfaces") or ():
        names.update(interface.get("policies") or ())
    return names


def users(connection: Session | Connection) -> dict[str, set[str]]:
    """Policy name → the VMs whose latest or running config version names it."""
    versions = select(VM.name, VMConfigVersion.effective).join(
        VMConfigVersion,
        (VMConfigVersion.vm_id == VM.id)
        & or_(
            VMConfigVersion.version == VM.config_version,
            VMConfigVersion.version == VM.running_version,
        ),
    )
    found: dict[str, set[str]] = {}
    for vm_name, effective in connection.execute(versions):
        for policy in named_policies(effective or {}):
            found.setdefault(policy, set()).add(vm_name)
    return found


def used_by(connection: Session | Connection, name: str) -> list[str]:
    """The VMs (sorted) whose latest or running config version names policy `name`."""
    return sorted(users(connection).get(name, set()))
