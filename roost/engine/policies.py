"""The registry of network policies: `policy create|apply|show|list|rm`, and the check that the
policies a VM names exist.

A policy's chains are made when it is stored and re-made when it is replaced, each in one
nftables transaction taken inside the database transaction that records it: if nftables refuses
the rules, nothing is recorded, and every tap attaching the policy sees the new rules at once.
A daemon whose kernel lacks what policies need has no firewall here: it still stores policies,
and what must enforce one says what the kernel lacks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy.orm import Session

from roost.engine.events import EventBus
from roost.engine.networks import hold_networks
from roost.errors import ConflictError, ErrorDetail, HostError, NotFoundError
from roost.host.policy import Count, Counters
from roost.plan.interfaces import ResolvedInterfaces
from roost.plan.policy import NetworkAddresses, TapPolicies, policy_ruleset
from roost.plan.policy import NetworkLookup as AddressLookup
from roost.plan.registry import NetworkLookup
from roost.spec.policy import Direction, Policy
from roost.state import policies as stored
from roost.state.db import Database
from roost.state.models import Policy as PolicyRow
from roost.state.models import timestamp

log = logging.getLogger("roost.engine")

RuleKey = tuple[str, Direction, int]  # policy, direction, rule index


class PolicyFirewallLike(Protocol):
    """What the registry needs of roost.host.policy.PolicyFirewall."""

    def apply(
        self,
        *,
        policies: Sequence[Policy] = (),
        taps: Sequence[TapPolicies] = (),
        removed_taps: Sequence[str] = (),
        removed_policies: Sequence[str] = (),
        lookup: AddressLookup,
    ) -> None: ...

    def counters(self) -> Counters: ...


def missing_policy_errors(session: Session, resolved: ResolvedInterfaces) -> list[ErrorDetail]:
    """Each policy a VM's interfaces name that is not stored, at `network.policies.<j>` (the
    single form) or `interfaces.<i>.policies.<j>`."""
    named: list[tuple[str, str]] = []
    for interface in resolved.interfaces:
        base = "network" if resolved.single else f"interfaces.{interface.index}"
        named += [(f"{base}.policies.{j}", name) for j, name in enumerate(interface.policies)]
    existing = stored.existing_names(session, (name for _, name in named))
    return [
        ErrorDetail(
            loc,
            f"policy {name!r} does not exist; roost policy list shows those that do, and roost "
            "policy create makes one",
        )
        for loc, name in named
        if name not in existing
    ]


def no_policy(name: str) -> NotFoundError:
    return NotFoundError(f"policy {name!r} does not exist (roost policy list shows those that do)")


def addresses_of(lookup: NetworkLookup) -> AddressLookup:
    """A network lookup as policies read it: a network's IPv4 subnet and IPv6 prefix."""

    def addresses(name: str) -> NetworkAddresses | None:
        network = lookup(name)
        return None if network is None else (network.subnet, network.ipv6_prefix)

    return addresses


class PolicyRegistry:
    """Stores, shows and removes policies, and keeps their chains in the firewall (None when
    the kernel lacks what policies need: `gaps` says what)."""

    def __init__(
        self,
        db: Database,
        firewall: PolicyFirewallLike | None,
        events: EventBus,
        network_lookup: Callable[[Session], NetworkLookup],
        *,
        gaps: Sequence[str] = (),
    ) -> None:
        self.db = db
        self.firewall = firewall
        self.events = events
        self.network_lookup = network_lookup
        self.gaps = tuple(gaps)
        # one change at a time: the check that no VM names a policy, and the firewall's
        # transaction, see the same stored policies
        self._lock = threading.Lock()

    def addresses(self, session: Session) -> AddressLookup:
        """`@network` references resolved in `session`'s transaction."""
        return addresses_of(self.network_lookup(session))

    def require_firewall(self) -> PolicyFirewallLike:
        """The firewall, or a HostError saying why this daemon cannot enforce policies."""
        if self.firewall is not None:
            return self.firewall
        lacks = "; ".join(self.gaps) or "the daemon was built without a policy firewall"
        raise HostError(f"network policies cannot be enforced on this host: {lacks}")

    def stored(self, session: Session) -> list[Policy]:
        """Every stored policy (what a daemon's start makes in the firewall)."""
        return [stored.policy_of(row) for row in stored.rows(session)]

    # ---- reading ------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            users = stored.users(session)
            return [
                policy_view(row, sorted(users.get(row.name, ()))) for row in stored.rows(session)
            ]

    def show(self, name: str) -> dict[str, Any]:
        """The policy, the VMs naming it, and each rule's counters (None where the firewall
        is missing)."""
        with self.db.read() as session:
            row = stored.find(session, name)
            if row is None:
                raise no_policy(name)
            view = policy_view(row, stored.used_by(session, name))
        counts = self.rule_counters() if self.firewall is not None else None
        for direction in Direction:
            for index, rule in enumerate(view[direction]):
                count = None if counts is None else counts.get((name, direction, index))
                rule["counters"] = None if counts is None else _count_json(count)
        return view

    def rule_counters(self) -> Mapping[RuleKey, Count]:
        """Every policy rule's counters (none without a firewall, or when nftables cannot be
        read: a scrape reports what it can)."""
        if self.firewall is None:
            return {}
        try:
            return self.firewall.counters().rules
        except HostError as error:
            log.warning("policy counters: %s", error)
            return {}

    # ---- writing ------------------------------------------------------------------------

    def create(self, policy: Policy) -> dict[str, Any]:
        """Store a new policy (409 `exists`), its chains made in the same transaction."""
        with self._lock:
            undo: list[Callable[[], None]] = []

            def work(session: Session) -> dict[str, Any]:
                undo.clear()
                if stored.find(session, policy.name) is not None:
                    raise ConflictError(
                        f"policy {policy.name!r} exists; roost policy apply replaces it",
                        code="exists",
                    )
                row = stored.add(session, policy)
                self._make(session, policy)
                undo.append(lambda: self._unmake(policy.name))
                return policy_view(row, [])

            view: dict[str, Any] = self._recorded(work, undo)
        self.events.publish("policy.created", policy=policy.name)
        return view

    def apply(self, policy: Policy) -> tuple[dict[str, Any], bool]:
        """Create or replace (PUT); a replace re-makes the policy's chains in one firewall
        transaction, which every tap attaching it sees at once. Returns the view and whether
        the policy was created; the same policy again changes nothing."""
        with self._lock:
            undo: list[Callable[[], None]] = []

            def work(session: Session) -> tuple[dict[str, Any], str | None]:
                undo.clear()
                row = stored.find(session, policy.name)
                if row is None:
                    row = stored.add(session, policy)
                    self._make(session, policy)
                    undo.append(lambda: self._unmake(policy.name))
                    return policy_view(row, []), "policy.created"
                if row.body == stored.stored_body(policy):
                    return policy_view(row, stored.used_by(session, policy.name)), None
                before = stored.policy_of(row)
                stored.replace(row, policy)
                session.flush()
                self._make(session, policy)
                undo.append(lambda: self._remake(before))
                return policy_view(row, stored.used_by(session, policy.name)), "policy.changed"

            view, event = self._recorded(work, undo)
        if event is not None:
            self.events.publish(event, policy=policy.name)
        return view, event == "policy.created"

    def remove(self, name: str) -> None:
        """Remove a policy no VM names (409 `policy_in_use` naming them), its chains with it."""
        with self._lock:
            undo: list[Callable[[], None]] = []

            def work(session: Session) -> None:
                undo.clear()
                row = stored.find(session, name, for_removal=True)
                if row is None:
                    raise no_policy(name)
                users = stored.used_by(session, name)
                if users:
                    raise ConflictError(
                        f"policy {name!r} is used by VM(s) {', '.join(users)}; patch their "
                        "policies (or remove them) first",
                        code="policy_in_use",
                    )
                before = stored.policy_of(row)
                session.delete(row)
                session.flush()
                self._unmake(name)
                undo.append(lambda: self._remake(before))

            self._recorded(work, undo)
        self.events.publish("policy.removed", policy=name)

    def _recorded(self, work: Callable[[Session], Any], undo: Sequence[Callable[[], None]]) -> Any:
        """`work`'s transaction; when it fails after the firewall took its change (at the
        commit), the firewall is put back as the database still has it."""
        try:
            return self.db.transact(work)
        except BaseException:
            for step in undo:
                try:
                    step()
                except HostError as error:
                    log.error("policies: cannot undo a firewall change: %s", error)
            raise

    def _remake(self, policy: Policy) -> None:
        with self.db.read() as session:
            self._make(session, policy)

    def _make(self, session: Session, policy: Policy) -> None:
        """(Re)make the policy's chains; without a firewall, only check its `@network`s
        (422 at the reference's loc for one that does not exist). The networks it names stay
        registered until the transaction ends (`hold_networks`)."""
        hold_networks(session, stored.networks_named(stored.stored_body(policy)))
        lookup = self.addresses(session)
        if self.firewall is None:
            policy_ruleset(policy, lookup)
            return
        self.firewall.apply(policies=[policy], lookup=lookup)

    def _unmake(self, name: str) -> None:
        if self.firewall is not None:
            self.firewall.apply(removed_policies=[name], lookup=lambda _: None)


def _count_json(count: Count | None) -> dict[str, int]:
    count = count or Count(0, 0)
    return {"packets": count.packets, "bytes": count.bytes}


def policy_view(row: PolicyRow, used_by: list[str]) -> dict[str, Any]:
    """A stored policy as the API shows it, with the VMs that name it."""
    body = row.body
    return {
        "name": row.name,
        "description": body.get("description", ""),
        Direction.INGRESS.value: [dict(rule) for rule in body.get("ingress", [])],
        Direction.EGRESS.value: [dict(rule) for rule in body.get("egress", [])],
        "used_by": used_by,
        "created_at": timestamp(row.created_at),
        "updated_at": timestamp(row.updated_at),
    }
