"""Stored network policies, and which VMs name them.

A VM names a policy in its interfaces' `policies`, which its config versions' `effective` keep
(`network.policies` for the single form, `interfaces.<i>.policies` for each interface; the key
is there only when the list is not empty). A policy is in use while the latest config version of
a VM names it (what its next start enforces) or the version it runs does (what its tap enforces
now).

Nothing but these names ties a VM to a policy (no foreign key), so on PostgreSQL, whose writers
run side by side under READ COMMITTED, a `policy rm` that found no VM naming a policy and a
create or patch that found it stored could both commit, leaving a VM naming a policy that is
gone. A create or patch therefore locks the rows of the policies it names FOR KEY SHARE, and a
removal locks its row FOR UPDATE before it looks for users: whichever comes second waits for
the other's commit, then sees its VM (409) or the row gone (422). SQLite's single writer needs
neither (the clauses render nothing there).
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


def find(session: Session, name: str, *, for_removal: bool = False) -> PolicyRow | None:
    """The stored policy `name`; `for_removal` locks its row FOR UPDATE until the transaction
    ends, so no create or patch naming it commits between the check for users and the delete."""
    query = select(PolicyRow).where(PolicyRow.name == name)
    return session.scalar(query.with_for_update() if for_removal else query)


def rows(session: Session) -> list[PolicyRow]:
    return list(session.scalars(select(PolicyRow).order_by(PolicyRow.name)))


def existing_names(session: Session, names: Iterable[str]) -> set[str]:
    """Those of `names` that are stored policies, their rows locked FOR KEY SHARE until the
    transaction ends (a VM naming them is recorded before any of them can be removed)."""
    wanted = set(names)
    if not wanted:
        return set()
    held = (
        select(PolicyRow.name)
        .where(PolicyRow.name.in_(wanted))
        .with_for_update(read=True, key_share=True)
    )
    return set(session.scalars(held))


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
    return [row.name for row in rows(session) if network in networks_named(row.body)]


def networks_named(body: dict[str, Any]) -> set[str]:
    """The networks a stored policy's rules name as `@<network>`."""
    return {
        value.removeprefix(NETWORK_REFERENCE)
        for direction in ("ingress", "egress")
        for rule in body.get(direction, ())
        for field in ("source", "destination")
        for value in rule.get(field) or ()
        if value.startswith(NETWORK_REFERENCE)
    }


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
