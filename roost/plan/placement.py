"""Placement: which hosts of a cluster may take a VM, best first, from a snapshot of the hosts.

Pure: the snapshot is read from the database (`roost.state.hosts.Hosts.snapshot`), once per
decision or cached by the caller for about a heartbeat interval; the decision itself is a scan
and a sort of a few dozen hosts (microseconds). The choice is only advice: the capacity is
taken by `Hosts.reserve`, one statement that checks it again, so a stale snapshot can make a
create try a host that has filled up, never overcommit one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from roost.errors import ConflictError, NotFoundError


class HostState(StrEnum):
    """A host as the cluster sees it: `offline` when its heartbeat is older than the
    threshold (computed whenever read), else `cordoned` when an operator said so."""

    ACTIVE = "active"
    CORDONED = "cordoned"
    OFFLINE = "offline"


@dataclass(frozen=True)
class HostSnapshot:
    """What placement reads of one host."""

    id: int
    name: str
    api: str
    state: HostState
    labels: Mapping[str, str]
    facts: Mapping[str, Sequence[str]]
    capacity_vcpus: int
    capacity_memory_mib: int
    allocated_vcpus: int
    allocated_memory_mib: int


@dataclass(frozen=True)
class Need:
    """What a VM asks of its host: resources, a host by name or by labels, and `requires`, per
    kind of fact (`vmms`, `vsock`, `external_networks`, `cni_networks`), the values the host
    must have."""

    vcpus: int
    memory_mib: int
    host: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    requires: Mapping[str, Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """A host with room for the VM; `missing` names what it lacks of the rest (empty: it may
    take the VM)."""

    host_id: int
    name: str
    api: str
    missing: list[str]

    @property
    def eligible(self) -> bool:
        return not self.missing


def missing_on(host: HostSnapshot, need: Need) -> list[str]:
    """What `need` asks that `host` does not have, each named (`label zone=a`, `vmms qemu`)."""
    missing = [
        f"label {key}={value}"
        for key, value in need.labels.items()
        if host.labels.get(key) != value
    ]
    for kind, wanted in need.requires.items():
        offered = host.facts.get(kind, ())
        missing += [f"{kind} {value}" for value in wanted if value not in offered]
    return missing


def _free_share(host: HostSnapshot, need: Need) -> float | None:
    """The share of the host's vCPUs and memory left free once it holds the VM (0..2, higher
    is emptier), None when it has no room."""
    vcpus = host.capacity_vcpus - host.allocated_vcpus - need.vcpus
    memory = host.capacity_memory_mib - host.allocated_memory_mib - need.memory_mib
    if vcpus < 0 or memory < 0:
        return None
    return vcpus / max(host.capacity_vcpus, 1) + memory / max(host.capacity_memory_mib, 1)


def place(snapshot: Iterable[HostSnapshot], need: Need) -> list[Candidate]:
    """The active hosts with room for `need` (the named one only, if it names one), those that
    have everything else it asks first, each group emptiest first (by name on a tie). A host
    `need` names that is not in the snapshot is 404."""
    scored: list[tuple[bool, float, str, Candidate]] = []
    found = need.host is None
    for host in snapshot:
        if need.host is not None and host.name != need.host:
            continue
        found = True
        if host.state is not HostState.ACTIVE:
            continue
        share = _free_share(host, need)
        if share is None:
            continue
        missing = missing_on(host, need)
        scored.append(
            (bool(missing), -share, host.name, Candidate(host.id, host.name, host.api, missing))
        )
    if not found:
        raise NotFoundError(
            f"host {need.host!r} is not in the cluster (roost host list shows those that are)"
        )
    scored.sort(key=lambda item: item[:3])
    return [item[3] for item in scored]


def chosen(candidates: Sequence[Candidate], need: Need) -> list[Candidate]:
    """The eligible candidates, best first; none is 409: `no_capacity` when no host has room
    (or is active), `no_eligible_host` naming what the hosts with room lack."""
    eligible = [candidate for candidate in candidates if candidate.eligible]
    if eligible:
        return eligible
    if not candidates:
        wanted = f"{need.vcpus} vCPUs and {need.memory_mib} MiB"
        what = (
            f"no active host has room for {wanted}"
            if need.host is None
            else f"host {need.host!r} is not active or has no room for {wanted}"
        )
        raise ConflictError(
            f"{what} now; remove VMs, add hosts or ask for less",
            code="no_capacity",
        )
    lacking = "; ".join(f"{c.name}: {', '.join(c.missing)}" for c in candidates)
    raise ConflictError(
        f"no host with room has everything the VM needs ({lacking}); choose another host or "
        "labels, or give a host what it lacks",
        code="no_eligible_host",
    )
