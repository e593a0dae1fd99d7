"""What the cluster's reconciler reads and writes about hosts whose heartbeat is late, and
what a fenced member reads of its lost VMs (PostgreSQL only: a cluster's database).

Every age is the database's clock (`now() - heartbeat_at`), never an agent's: agents'
clocks may differ, the database's is one. Each write re-checks in its own statement what the
reconciler decided on (the host still late, still at the epoch it saw), so a host that beat
again meanwhile is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Float,
    Interval,
    bindparam,
    delete,
    false,
    func,
    literal_column,
    select,
    true,
    update,
)

from roost.state.models import VM, Host, IPLease, Network, VMNic

LOST = "lost"  # roost.state.vms.VMStatus.LOST, the one stored status a reconciler writes
_SECOND = literal_column("interval '1 second'", Interval())
_AGE = func.extract("epoch", func.now() - Host.heartbeat_at)


def _late(seconds: str) -> Any:
    """Whether a host's heartbeat is older than bound parameter `seconds`."""
    return Host.heartbeat_at < func.now() - bindparam(seconds, type_=Float) * _SECOND


_HOLDING = (
    select(func.count(VM.id))
    .where(VM.host_id == Host.id, VM.status != LOST)
    .correlate(Host)
    .scalar_subquery()
)
_BEATS = select(
    Host.id,
    Host.name,
    Host.epoch,
    Host.offline_noted,
    _AGE.label("age"),
    _HOLDING.label("holding"),
).order_by(Host.id)
_NOTE_OFFLINE = (
    update(Host)
    .where(Host.id == bindparam("host_id"), Host.offline_noted == false(), _late("after"))
    .values(offline_noted=true())
    .returning(Host.id)
)
_NOTE_BACK = (
    update(Host)
    .where(Host.id == bindparam("host_id"), ~_late("after"))
    .values(offline_noted=false())
    .returning(Host.id)
)
_HELD_VMS = (
    select(VM.name).where(VM.host_id == bindparam("host_id"), VM.status != LOST).order_by(VM.name)
)
_FENCE = (
    update(Host)
    .where(Host.id == bindparam("host_id"), Host.epoch == bindparam("seen"), _late("after"))
    .values(epoch=Host.epoch + 1)
    .returning(Host.epoch)
)
# a lost host's gateways are free for a host that has the network's bridge to claim
_FREE_GATEWAYS = (
    update(Network)
    .where(Network.gateway_host_id == bindparam("of_host"))
    .values(gateway_host_id=None)
    .returning(Network.name)
)
_LOSE_VMS = (
    update(VM)
    .where(VM.host_id == bindparam("of_host"), VM.status != LOST)
    .values(
        status=LOST,
        status_reason=bindparam("reason"),
        exit_code=None,
        pid=None,
        supervisor_pid=None,
        running_version=None,
        restart_required=False,
    )
    .returning(VM.id, VM.name)
)
_RELEASE_LEASES = delete(IPLease).where(IPLease.vm_id.in_(bindparam("vm_ids", expanding=True)))
_RELEASE_NICS = (
    update(VMNic)
    .where(VMNic.vm_id.in_(bindparam("vm_ids", expanding=True)))
    .values(observed_ip=None, ipv6=None, ipv6_network_id=None)
)
_OFFLINE = select(Host.id).where(_late("after"))
_SET_FACTS = (
    update(Host)
    .where(Host.id == bindparam("host_id"), Host.epoch == bindparam("seen"))
    .values(facts=bindparam("new_facts", type_=JSON))
)
_LOST_OF = (
    select(VM.name).where(VM.host_id == bindparam("host_id"), VM.status == LOST).order_by(VM.name)
)


@dataclass(frozen=True)
class Heartbeat:
    """One host as the reconciler judges it: its last heartbeat's `age` in seconds (the
    database's clock), whether `host.offline` was written for its current outage, and how many
    VMs it holds that are not lost."""

    id: int
    name: str
    epoch: int
    offline_noted: bool
    age: float
    holding: int


def heartbeats(connection: Connection) -> list[Heartbeat]:
    """Every host, in one query."""
    return [
        Heartbeat(row.id, row.name, row.epoch, row.offline_noted, float(row.age), row.holding)
        for row in connection.execute(_BEATS)
    ]


def note_offline(connection: Connection, host_id: int, offline_after: float) -> list[str] | None:
    """Record that `host.offline` is written for the host's outage, and the names of the VMs
    it holds (now `unknown`); None if it is not late after all or was noted already."""
    noted = connection.execute(_NOTE_OFFLINE, {"host_id": host_id, "after": offline_after})
    if noted.first() is None:
        return None
    return list(connection.execute(_HELD_VMS, {"host_id": host_id}).scalars())


def note_back(connection: Connection, host_id: int, offline_after: float) -> bool:
    """Record that a host noted offline beats again (its heartbeat may have said so already);
    False if it is late after all."""
    back = connection.execute(_NOTE_BACK, {"host_id": host_id, "after": offline_after})
    return back.first() is not None


@dataclass(frozen=True)
class LostHost:
    """What `lose_host` did: the host's new epoch, the VMs it marked lost and the networks
    whose gateway it no longer carries."""

    epoch: int
    vms: list[str]
    gateways: list[str]


def lose_host(
    connection: Connection, host_id: int, seen_epoch: int, lost_after: float, reason: str
) -> LostHost | None:
    """Fence a host late by more than `lost_after` (its epoch moves on, so its heartbeats match
    no row and it knows to stop), mark its VMs `lost` and release their addresses (IPv4 leases,
    IPv6 addresses, observed addresses), keeping their names, MACs, CIDs and reservations
    until they are removed, and free the gateways of the networks that record it (the next
    host with the network's bridge claims each, `alloc.settle_gateway`). Meant for one
    transaction: the caller commits it all or nothing.
    None if the host beat again or was fenced by someone else since it was read."""
    fenced = connection.execute(
        _FENCE, {"host_id": host_id, "seen": seen_epoch, "after": lost_after}
    ).first()
    if fenced is None:
        return None
    lost = connection.execute(_LOSE_VMS, {"of_host": host_id, "reason": reason}).all()
    ids = [row.id for row in lost]
    if ids:
        connection.execute(_RELEASE_LEASES, {"vm_ids": ids})
        connection.execute(_RELEASE_NICS, {"vm_ids": ids})
    gateways = connection.execute(_FREE_GATEWAYS, {"of_host": host_id}).scalars()
    return LostHost(int(fenced.epoch), sorted(row.name for row in lost), sorted(gateways))


def lost_vms(connection: Connection, host_id: int) -> list[str]:
    """The names of the host's VMs the cluster marked lost."""
    return list(connection.execute(_LOST_OF, {"host_id": host_id}).scalars())


def offline_hosts(connection: Connection, offline_after: float) -> frozenset[int]:
    """The ids of the hosts whose heartbeat is older than `offline_after`."""
    return frozenset(connection.execute(_OFFLINE, {"after": offline_after}).scalars())


def set_facts(connection: Connection, host_id: int, epoch: int, facts: dict[str, Any]) -> bool:
    """Record what a host has now (a network registered since it joined); False if it was
    fenced (its epoch moved on)."""
    done = connection.execute(_SET_FACTS, {"host_id": host_id, "seen": epoch, "new_facts": facts})
    return bool(done.rowcount == 1)
