"""Allocation of what VMs hold: networks, IP addresses (per interface), vsock CIDs, and per
interface a MAC, a tap name and an IPv6 address.

Every function runs inside the caller's write transaction (`Database.transact`), so an
allocation is committed with the record that holds it, or not at all. Uniqueness is enforced by
the schema; the code only finds a free value.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import secrets
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sqlalchemy import (
    ColumnElement,
    Connection,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.orm import Session

from roost.errors import ConflictError
from roost.plan.network import OVERLAY_MTU
from roost.state.db import hold_lock
from roost.state.models import VM, CIDLease, Host, IPLease, IPPoolEntry, Network, VMNic, utcnow

MIN_CID = 3  # 0-2 are the hypervisor, local and host
MAX_CID = 2**32 - 2  # 2**32 - 1 is VMADDR_CID_ANY
BATCH = 512
TAP_PREFIX = "rtap"
BRIDGE_PREFIX = "rbr"
# 02:xx: locally administered unicast for guests; fe:xx for their taps (as libvirt does).
GUEST_MAC_PREFIX = "02"
TAP_MAC_PREFIX = "fe"


ON_DEMAND, MANAGED, EXTERNAL = "on-demand", "managed", "external"  # a network's kind
NETWORKS_LOCK = "networks"  # held by a transaction adding a network (see `db.hold_lock`)
MAX_VNI = 2**24 - 1  # a VXLAN id has 24 bits; 0 is left unused


@dataclass(frozen=True)
class NetworkRow:
    """A network with a subnet as allocation reads it (a plain row: loading the ORM entity
    costs several times the query, on the path of every bridged boot)."""

    id: int
    name: str
    bridge: str
    subnet: str
    gateway: str
    first: int
    last: int
    next_hint: int
    kind: str = ON_DEMAND

    @classmethod
    def of(cls, row: Any) -> NetworkRow:
        """A row of `_NETWORK_COLUMNS` (of a network that has a subnet)."""
        assert row.subnet is not None, f"network {row.name!r} has no subnet to allocate from"
        return cls(
            row.id,
            row.name,
            row.bridge,
            row.subnet,
            row.gateway,
            row.first,
            row.last,
            row.next_hint,
            row.kind,
        )


class Holder(Protocol):
    """What allocation needs of a VM: its id (a `VM`, or any row or record that has one)."""

    @property
    def id(self) -> int: ...


class Hosted(Holder, Protocol):
    """A VM and the host it lives on (None: the single host), for what is unique per host."""

    @property
    def host_id(self) -> int | None: ...


def first_gap(taken: Iterable[int], start: int, end: int) -> int | None:
    """The lowest value in [start, end] not in `taken` (ascending, all ≥ start)."""
    candidate = start
    for value in taken:
        if value > candidate:
            break
        candidate = value + 1
    return candidate if candidate <= end else None


# Hot-path statements, built once: allocation runs per VM, and SQLAlchemy's ORM layer costs more
# than SQLite itself here, so these go straight to the session's connection.
CURRENT, RESERVED = "current", "reserved"  # an IP lease's purpose (see models.IPLease)
_HELD = select(IPLease.network_id, IPLease.ip).where(
    IPLease.vm_id == bindparam("vm_id"),
    IPLease.interface == bindparam("interface"),
    IPLease.purpose == bindparam("purpose"),
)
_LEASED = (
    select(IPLease.ip)
    .where(
        IPLease.network_id == bindparam("network_id"),
        IPLease.ip >= bindparam("low"),
        IPLease.ip <= bindparam("high"),
    )
    .order_by(IPLease.ip)
    .limit(BATCH)
)
_HOLDER = (
    select(VM.name)
    .join(IPLease, IPLease.vm_id == VM.id)
    .where(IPLease.network_id == bindparam("network_id"), IPLease.ip == bindparam("ip"))
)
_NETWORK_COLUMNS = (
    Network.id,
    Network.name,
    Network.bridge,
    Network.subnet,
    Network.gateway,
    Network.first,
    Network.last,
    Network.next_hint,
    Network.kind,
)
_NETWORK = select(*_NETWORK_COLUMNS).where(Network.subnet == bindparam("subnet"))
# PostgreSQL: the network's row kept from removal until the transaction ends (what a lease's
# foreign key takes anyway), so an on-demand network found here is not removed with its last
# lease by a concurrent release before this transaction's lease is committed
_NETWORK_KEPT = _NETWORK.with_for_update(read=True, key_share=True)  # FOR KEY SHARE
_CID_OF = select(CIDLease.cid, CIDLease.host_id).where(CIDLease.vm_id == bindparam("vm_id"))
_DROP_CID = delete(CIDLease).where(CIDLease.vm_id == bindparam("vm_id"))
# a host's CIDs, by the expression of their unique index (a single host's count as host 0)
_ON_HOST = func.coalesce(CIDLease.host_id, 0) == bindparam("host")
_HIGHEST_CID = select(func.max(CIDLease.cid)).where(_ON_HOST)
_CIDS_FROM = (
    select(CIDLease.cid)
    .where(_ON_HOST, CIDLease.cid >= bindparam("low"))
    .order_by(CIDLease.cid)
    .limit(BATCH)
)
_ADD_CID = insert(CIDLease)
# PostgreSQL: the first of the CIDs after its host's highest that no concurrent allocation has
# taken (a transaction advisory lock per (host, CID), tried, never waited for: each claims its
# own at once), inserted unless a committed lease has it (the highest read was stale); no row
# when every candidate was taken. Two-key advisory locks, apart from `hold_lock`'s one-key ones
CID_CANDIDATES = 64
_CLAIM_CID = text(
    """
    WITH highest AS (
        SELECT coalesce(max(cid), :min_cid - 1) AS cid FROM cid_leases
        WHERE coalesce(host_id, 0) = :host
    )
    INSERT INTO cid_leases (cid, vm_id, host_id)
    SELECT candidate, :vm_id, :host_id
    FROM highest, generate_series(highest.cid + 1, least(highest.cid + :candidates, :max_cid))
        AS candidate
    WHERE pg_try_advisory_xact_lock(CAST(:host AS integer), CAST(candidate - 2147483648 AS integer))
    LIMIT 1
    ON CONFLICT DO NOTHING
    RETURNING cid
    """
)
CID_CLAIM_ROUNDS = 8
_MAC_USED = select(VMNic.vm_id).where(
    or_(VMNic.mac == bindparam("mac"), VMNic.user_mac == bindparam("mac"))
)
_DROP_LEASE = delete(IPLease).where(
    IPLease.vm_id == bindparam("vm_id"),
    IPLease.interface == bindparam("interface"),
    IPLease.purpose == bindparam("purpose"),
)
_ADD_LEASE = insert(IPLease)
_NICS_OF = select(
    VMNic.index, VMNic.mac, VMNic.user_mac, VMNic.tap, VMNic.observed_ip, VMNic.ipv6
).where(VMNic.vm_id == bindparam("vm_id"))
_ADD_NIC = insert(VMNic)
_ONE_NIC = (VMNic.vm_id == bindparam("nic_vm_id"), VMNic.index == bindparam("nic_index"))
_SET_USER_MAC = update(VMNic).where(*_ONE_NIC).values(user_mac=bindparam("user_mac"))
_SET_IPV6 = (
    update(VMNic)
    .where(*_ONE_NIC)
    .values(ipv6_network_id=bindparam("ipv6_network_id"), ipv6=bindparam("ipv6"))
)
_HINT = select(Network.next_hint).where(Network.id == bindparam("network_id"))
# PostgreSQL: a network's free address freed longest ago (never held first, lowest first), its
# row locked until the transaction ends; concurrent allocations skip rows others hold, so each
# claims its own at once
_POOLED = (
    select(IPPoolEntry.ip)
    .where(IPPoolEntry.network_id == bindparam("network_id"))
    .order_by(IPPoolEntry.released, IPPoolEntry.ip)
    .limit(1)
)
_CLAIM = _POOLED.with_for_update(skip_locked=True)
_CLAIM_WAITING = _POOLED.with_for_update()  # once every free one is held: wait for one to end
_CLAIM_REQUESTED = (
    select(IPPoolEntry.ip)
    .where(IPPoolEntry.network_id == bindparam("network_id"), IPPoolEntry.ip == bindparam("ip"))
    .with_for_update()
)
_SET_HINT = (
    update(Network).where(Network.id == bindparam("network_id")).values(next_hint=bindparam("hint"))
)


def _leased_from(connection: Connection, network_id: int, start: int, end: int) -> Iterator[int]:
    """The addresses leased in [start, end], ascending, fetched in batches as needed."""
    low = start
    while True:
        batch = list(
            connection.execute(
                _LEASED, {"network_id": network_id, "low": low, "high": end}
            ).scalars()
        )
        yield from batch
        if len(batch) < BATCH:
            return
        low = batch[-1] + 1


def network_by_subnet(
    session: Session, subnet: ipaddress.IPv4Network, *, keep: bool = False
) -> NetworkRow | None:
    """The network of `subnet`; `keep` holds its row from removal until the transaction ends
    (a removal waits for the commit, then finds this transaction's lease)."""
    query = _NETWORK_KEPT if keep else _NETWORK
    row = session.connection().execute(query, {"subnet": str(subnet)}).first()
    return None if row is None else NetworkRow.of(row)


def seen_from(host_id: int | None) -> ColumnElement[bool]:
    """The networks host `host_id` sees: the cluster's own and its host-local ones (`external`
    and `dhcp`, whose `host_id` is theirs). Every network when `host_id` is None: a single
    host's (all its networks), or a cluster network, which spans every host."""
    if host_id is None:
        return true()
    return or_(Network.host_id.is_(None), Network.host_id == host_id)


def own_first(host_id: int | None) -> ColumnElement[int]:
    """An ORDER BY key putting host `host_id`'s networks first, then the cluster's, then
    other hosts' (what a name resolves to, from that host)."""
    return case((Network.host_id == host_id, 0), (Network.host_id.is_(None), 1), else_=2)


def named(name: str, host_id: int | None, *, anywhere: bool = False) -> Any:
    """The query for the network `name` resolves to on host `host_id`: its own host-local
    network of that name, else the cluster's; with `anywhere`, else another host's (what
    placement plans with before it knows the host). Select what you need from it."""
    query = select(Network).where(Network.name == name)
    if not anywhere:
        query = query.where(seen_from(host_id))
    return query.order_by(own_first(host_id)).limit(1)


def network_by_name(session: Session, name: str, host_id: int | None = None) -> NetworkRow | None:
    """The network with a subnet `name` resolves to on host `host_id` (None for a name no
    such network has)."""
    query = select(*_NETWORK_COLUMNS).where(Network.name == name, seen_from(host_id))
    row = session.connection().execute(query.order_by(own_first(host_id)).limit(1)).first()
    return None if row is None or row.subnet is None else NetworkRow.of(row)


def check_no_overlap(
    session: Session, subnet: ipaddress.IPv4Network, host_id: int | None = None
) -> None:
    """409 `subnet_overlap` naming the network whose subnet overlaps `subnet`, if one does
    (of those host `host_id` sees, for a host-local network; of all, for the cluster's)."""
    first, last = int(subnet.network_address), int(subnet.broadcast_address)
    clash = session.scalar(
        select(Network)
        .where(Network.first <= last, Network.last >= first, seen_from(host_id))
        .limit(1)
    )
    if clash is not None:
        raise ConflictError(
            f"subnet {subnet} overlaps network {clash.name!r} ({clash.subnet}); "
            "choose a subnet that does not overlap it",
            code="subnet_overlap",
        )


def ensure_network(
    session: Session,
    subnet: ipaddress.IPv4Network,
    gateway: ipaddress.IPv4Address,
    *,
    name: str | None = None,
    bridge: str | None = None,
) -> NetworkRow:
    """The network for `subnet`, created (on demand) if new. A different gateway on the same
    subnet, a subnet overlapping another network, or one of an external network (whose bridge
    roost may not give an address) is a conflict naming that network."""
    found = network_by_subnet(session, subnet, keep=True)
    if found is None:  # or made by a create that held the lock while this one waited for it
        hold_lock(session.connection(), NETWORKS_LOCK)
        found = network_by_subnet(session, subnet, keep=True)
    if found is not None:
        if found.kind == EXTERNAL:
            raise ConflictError(
                f"subnet {subnet} is external network {found.name!r}; name it "
                f'("network": "{found.name}") instead of giving its subnet',
            )
        if found.gateway != str(gateway):
            raise ConflictError(
                f"subnet {subnet} is network {found.name!r} with gateway {found.gateway}, "
                f"not {gateway}; use gateway {found.gateway} or another subnet",
            )
        return found
    network = add_network(
        session,
        name or f"net-{subnet.network_address}-{subnet.prefixlen}".replace(".", "-"),
        ON_DEMAND,
        bridge,
        subnet,
        gateway,
    )
    return NetworkRow.of(network)


def add_network(
    session: Session,
    name: str,
    kind: str,
    bridge: str | None,
    subnet: ipaddress.IPv4Network | None,
    gateway: ipaddress.IPv4Address | None,
    ipv6_prefix: str | None = None,
    host_id: int | None = None,
) -> Network:
    """Record a new network (its bridge `rbr<id>` unless named); a subnet overlapping another
    network's, or its IPv6 prefix, is 409 `subnet_overlap`, a name or bridge another network
    has 409 `conflict`. On PostgreSQL (a cluster's database) a managed or on-demand network
    spans hosts: it gets the lowest free VNI and the overlay's MTU. A host-local one (an
    external network in a cluster: `host_id`, its host) clashes only with that host's
    networks and the cluster's; the cluster's clash with every host's."""
    hold_lock(session.connection(), NETWORKS_LOCK)  # what the checks find stays true until commit
    check_name_free(session, name, host_id)
    if subnet is not None:
        check_no_overlap(session, subnet, host_id)
    if ipv6_prefix is not None:  # /64s overlap only when equal
        holder = session.scalar(select(Network.name).where(Network.ipv6_prefix == ipv6_prefix))
        if holder is not None:
            raise ConflictError(
                f"IPv6 prefix {ipv6_prefix} is network {holder!r}'s; choose another /64 "
                "(or auto for a random one)",
                code="subnet_overlap",
            )
    holder = bridge_holder(session, bridge, host_id) if bridge else None
    if holder is not None:
        raise ConflictError(
            f"network {holder!r} already has bridge {bridge}; choose another bridge"
        )
    first = None if subnet is None else int(subnet.network_address)
    network = Network(
        name=name,
        kind=kind,
        bridge=bridge or "",
        subnet=None if subnet is None else str(subnet),
        gateway=None if gateway is None else str(gateway),
        first=first,
        last=None if subnet is None else int(subnet.broadcast_address),
        next_hint=None if first is None else first + 1,
        ipv6_prefix=ipv6_prefix,
        host_id=host_id,
    )
    if kind in (ON_DEMAND, MANAGED) and session.connection().dialect.name == "postgresql":
        network.vni, network.mtu = lowest_free_vni(session), OVERLAY_MTU
    session.add(network)
    session.flush()
    if not network.bridge:
        network.bridge = f"{BRIDGE_PREFIX}{network.id}"
        session.flush()
    return network


def check_name_free(session: Session, name: str, host_id: int | None = None) -> None:
    """409 `conflict` when a network host `host_id` sees (every network, for a cluster
    network: None) has `name`, naming its host when it is another's."""
    holder = session.execute(
        select(Network.kind, Host.name)
        .outerjoin(Host, Host.id == Network.host_id)
        .where(Network.name == name, seen_from(host_id))
        .limit(1)
    ).first()
    if holder is None:
        return
    kind, host = holder
    where = "" if host is None else f" on host {host}"
    raise ConflictError(f"network {name!r} already exists{where} ({kind}); choose another name")


def adopt_external(session: Session, host_id: int) -> list[str]:
    """Make the external networks that have no host (registered before the database was a
    cluster's) host `host_id`'s: the first agent to start takes them. Their names."""
    hold_lock(session.connection(), NETWORKS_LOCK)
    adopted = session.scalars(
        update(Network)
        .where(Network.kind == EXTERNAL, Network.host_id.is_(None))
        .values(host_id=host_id)
        .returning(Network.name)
    )
    return sorted(adopted)


def bridge_holder(session: Session, bridge: str, host_id: int | None = None) -> str | None:
    """The name of the network host `host_id` sees (any, for None) on bridge `bridge`."""
    return session.scalar(
        select(Network.name)
        .where(Network.bridge == bridge, seen_from(host_id))
        .order_by(own_first(host_id))
        .limit(1)
    )


def lowest_free_vni(session: Session) -> int:
    """The lowest VXLAN id (1..2**24-1) no network has; the caller holds `NETWORKS_LOCK`."""
    taken = session.scalars(
        select(Network.vni).where(Network.vni.is_not(None)).order_by(Network.vni)
    )
    vni = first_gap((value for value in taken if value is not None), 1, MAX_VNI)
    if vni is None:
        raise ConflictError(
            f"all {MAX_VNI} VXLAN ids are taken by networks; remove networks no VM uses",
            code="network_full",
        )
    return vni


def span_networks(session: Session) -> list[str]:
    """Give every managed and on-demand network without a VNI one (and the overlay's MTU): those
    made before the database was a cluster's. The names of those given one."""
    hold_lock(session.connection(), NETWORKS_LOCK)
    spanned = []
    unspanned = select(Network).where(Network.kind.in_((ON_DEMAND, MANAGED)), Network.vni.is_(None))
    for network in list(session.scalars(unspanned.order_by(Network.id))):
        network.vni, network.mtu = lowest_free_vni(session), OVERLAY_MTU
        session.flush()
        spanned.append(network.name)
    return spanned


def carries_gateway(session: Session, bridge: str, host_name: str) -> bool:
    """Whether host `host_name`'s bridge `bridge` (of a cluster network) carries the network's
    gateway address: it does when the network records that host, or records none yet (the
    host claims it then, in one UPDATE that only an unclaimed network takes), so two hosts
    never answer for one gateway. A network that does not span hosts always does."""
    me = select(Host.id).where(Host.name == host_name).scalar_subquery()
    connection = session.connection()
    connection.execute(
        update(Network)
        .where(
            Network.bridge == bridge,
            Network.vni.is_not(None),
            Network.gateway_host_id.is_(None),
        )
        .values(gateway_host_id=me)
    )
    found = connection.execute(
        select(Network.vni, Network.gateway_host_id == me).where(Network.bridge == bridge)
    ).first()
    return found is None or found[0] is None or bool(found[1])


def allocate_ip(
    session: Session,
    network: NetworkRow,
    vm_id: int,
    requested: ipaddress.IPv4Address | None = None,
    *,
    purpose: str = CURRENT,
    interface: int = 0,
    new: bool = False,
) -> ipaddress.IPv4Address:
    """An address on `network` for the VM's interface `interface`, held for `purpose`:
    `requested` if free, else on SQLite the next free one after the last handed out (wrapping),
    on PostgreSQL the one free longest that no concurrent allocation holds. Asking
    again for the same interface and purpose returns its own lease. A `new` VM (recorded in
    this transaction) holds none, so its leases are not read."""
    connection = session.connection()
    key = {"vm_id": vm_id, "interface": interface, "purpose": purpose}
    held = None if new else connection.execute(_HELD, key).first()
    if held is not None:
        if held.network_id != network.id:
            raise ValueError(
                f"VM {vm_id} holds a lease on another network for interface {interface}; "
                "release it first"
            )
        if requested in (None, ipaddress.IPv4Address(held.ip)):
            return ipaddress.IPv4Address(held.ip)
        connection.execute(_DROP_LEASE, key)
    pooled = connection.dialect.name == "postgresql"
    if requested is not None:
        value = int(requested)
        _check_free(connection, network, requested, pooled=pooled)
    elif pooled:
        value = _claimed_free(connection, network)
    else:
        value = _next_free(connection, network)
    connection.execute(
        _ADD_LEASE,
        {
            "network_id": network.id,
            "ip": value,
            "vm_id": vm_id,
            "interface": interface,
            "purpose": purpose,
            "created_at": utcnow(),
        },
    )
    if requested is None and not pooled:
        hint = value + 1 if value + 1 < network.last else network.first + 1
        connection.execute(_SET_HINT, {"network_id": network.id, "hint": hint})
    return ipaddress.IPv4Address(value)


def _check_free(
    connection: Connection, network: NetworkRow, requested: ipaddress.IPv4Address, *, pooled: bool
) -> None:
    """409 `ip_taken` naming the VM that holds `requested`. On PostgreSQL its pool row is
    locked first, waiting for a transaction that holds it: of two creates asking for one
    address, the second finds it gone once the first has committed, and then its holder."""
    key = {"network_id": network.id, "ip": int(requested)}
    if pooled and _claimed(connection, _CLAIM_REQUESTED, **key) is not None:
        return
    holder = connection.execute(_HOLDER, key).scalar()
    if holder is not None:
        raise ConflictError(
            f"{requested} is already held by VM {holder!r} on network {network.name!r}; "
            "choose another address or let roost assign one",
            code="ip_taken",
        )


def _claimed(connection: Connection, claim: Any, **key: int) -> int | None:
    found = connection.execute(claim, key).scalar()
    return None if found is None else int(found)


def _claimed_free(connection: Connection, network: NetworkRow) -> int:
    """A free address of the network's pool (PostgreSQL), locked until the transaction ends:
    one no other transaction holds, else (every free one is held) the first one whose holder
    ends without taking it."""
    found = _claimed(connection, _CLAIM, network_id=network.id)
    if found is None:
        found = _claimed(connection, _CLAIM_WAITING, network_id=network.id)
    if found is None:
        raise _full(network)
    return found


def _full(network: NetworkRow) -> ConflictError:
    return ConflictError(
        f"network {network.name!r} ({network.subnet}) has no free address left; "
        "remove a VM or use a larger subnet",
        code="network_full",
    )


def _next_free(connection: Connection, network: NetworkRow) -> int:
    """SQLite's single writer: the next free address after the network's hint, wrapping."""
    low, high = network.first + 1, network.last - 1
    gateway = int(ipaddress.IPv4Address(network.gateway))

    def search(start: int, end: int) -> int | None:
        reserved = [gateway] if start <= gateway <= end else []
        leased = _leased_from(connection, network.id, start, end)
        return first_gap(heapq.merge(leased, reserved), start, end)

    next_hint = connection.execute(_HINT, {"network_id": network.id}).scalar_one()
    assert next_hint is not None, f"network {network.name!r} has a subnet and so a hint"
    hint = min(max(next_hint, low), high)
    found = search(hint, high)
    if found is None and hint > low:
        found = search(low, hint - 1)
    if found is None:
        raise _full(network)
    return found


def release_ip(
    session: Session, vm: Holder, purpose: str = CURRENT, interface: int = 0
) -> Network | None:
    """Drop the address the VM's interface holds for `purpose`; returns its network when no
    lease is left on it."""
    lease = session.scalar(
        select(IPLease).where(
            IPLease.vm_id == vm.id, IPLease.interface == interface, IPLease.purpose == purpose
        )
    )
    if lease is None:
        return None
    network = session.get(Network, lease.network_id)
    session.delete(lease)
    session.flush()
    if network is not None and not network_in_use(session, network):
        return network
    return None


def network_in_use(session: Session, network: Network) -> bool:
    return has_leases(session, network.id)


def has_leases(session: Session, network_id: int) -> bool:
    return (
        session.scalar(select(IPLease.ip).where(IPLease.network_id == network_id).limit(1))
        is not None
    )


def release_address(
    session: Session,
    vm: Holder,
    *,
    keep_network: str,
    purpose: str = CURRENT,
    interface: int = 0,
) -> list[tuple[int, str]]:
    """Drop the address the VM's interface holds for `purpose`; an on-demand network left
    without leases is removed (unless it is `keep_network`, the daemon's default). Returns the
    (id, bridge) of such a network, whose bridge the caller removes once this has committed. A
    named network (managed or external) stays, and so does its bridge."""
    network = release_ip(session, vm, purpose, interface)
    if network is None or network.kind != ON_DEMAND:
        return []
    emptied = [(network.id, bridge_of(network))]
    if network.name != keep_network:
        session.delete(network)
    return emptied


def networks_and_leases(session: Session) -> list[tuple[Network, list[int]]]:
    """Every network, with the addresses leased on it (ascending)."""
    networks = list(session.scalars(select(Network).order_by(Network.id)))
    leased: dict[int, list[int]] = {network.id: [] for network in networks}
    for network_id, ip in session.execute(
        select(IPLease.network_id, IPLease.ip).order_by(IPLease.ip)
    ):
        leased[network_id].append(ip)
    return [(network, leased[network.id]) for network in networks]


def bridges_in_use(session: Session) -> set[str]:
    """The bridges roost must keep: those of networks on which some VM holds an address, and
    every named managed network's (kept until `network rm`)."""
    leased = set(session.scalars(select(Network.bridge).join(IPLease).distinct()))
    managed = set(session.scalars(select(Network.bridge).where(Network.kind == MANAGED)))
    return {bridge for bridge in leased | managed if bridge is not None}


def bridge_of(network: Network) -> str:
    """The bridge of a network that has one: every kind but `cni`."""
    assert network.bridge is not None, f"network {network.name!r} ({network.kind}) has no bridge"
    return network.bridge


def allocate_cid(session: Session, vm: Hosted, *, new: bool = False) -> int:
    """A vsock CID (≥ 3) for `vm` on its host (`vm.host_id`), or the one it already holds
    there (a `new` VM holds none, so that is not read; one it held on another host is given
    up): the one after the highest its host's VMs hold (an index lookup, however many VMs hold
    one), so a CID is not handed out again until the highest reaches the top of the range; then
    the lowest free one. Hosts' CIDs are independent: two hosts' VMs may hold the same one.
    On PostgreSQL concurrent creates on one host each claim a different CID after the highest
    without waiting for one another (`_claimed_cid`); SQLite's single writer takes turns."""
    connection = session.connection()
    host = vm.host_id or 0
    if not new:
        held = connection.execute(_CID_OF, {"vm_id": vm.id}).first()
        if held is not None and (held.host_id or 0) == host:
            return int(held.cid)
        if held is not None:  # it moved: its CID stays with the host it left
            connection.execute(_DROP_CID, {"vm_id": vm.id})
    if connection.dialect.name == "postgresql":
        claimed = _claimed_cid(connection, vm, host)
        if claimed is not None:
            return claimed
    # one allocation per host at a time, else concurrent creates all choose the highest + 1:
    # SQLite's path, and PostgreSQL's once its host's CIDs reach the top of the range
    hold_lock(connection, f"cid_leases:{host}")
    highest = connection.execute(_HIGHEST_CID, {"host": host}).scalar()
    following = MIN_CID if highest is None else int(highest) + 1
    cid = (
        following
        if following <= MAX_CID
        else first_gap(_cids_from(connection, host), MIN_CID, MAX_CID)
    )
    if cid is None:
        raise ConflictError("no vsock CID is free on this host", code="cid_exhausted")
    connection.execute(_ADD_CID, {"cid": cid, "vm_id": vm.id, "host_id": vm.host_id})
    return cid


def _claimed_cid(connection: Connection, vm: Hosted, host: int) -> int | None:
    """PostgreSQL: a CID after the highest its host's VMs hold, claimed without waiting for any
    other allocation (creates on one host no longer take turns through each commit); None once
    the host's highest is at the top of the range (or, improbably, every candidate of several
    rounds was taken), for the locked search of the lowest free one."""
    key = {
        "vm_id": vm.id,
        "host_id": vm.host_id,
        "host": host,
        "min_cid": MIN_CID,
        "max_cid": MAX_CID,
        "candidates": CID_CANDIDATES,
    }
    for _ in range(CID_CLAIM_ROUNDS):
        cid = connection.execute(_CLAIM_CID, key).scalar()
        if cid is not None:
            return int(cid)
        highest = connection.execute(_HIGHEST_CID, {"host": host}).scalar()
        if highest is not None and highest >= MAX_CID:
            return None
    return None


def _cids_from(connection: Connection, host: int) -> Iterator[int]:
    """The CIDs held on `host` (0: the single host), ascending, fetched in batches as needed."""
    low = MIN_CID
    while True:
        batch = list(connection.execute(_CIDS_FROM, {"host": host, "low": low}).scalars())
        yield from batch
        if len(batch) < BATCH:
            return
        low = batch[-1] + 1


def new_mac(session: Session) -> str:
    """A random locally administered unicast MAC no interface has (roost's or a user's)."""
    connection = session.connection()
    while True:
        mac = ":".join([GUEST_MAC_PREFIX, *(f"{b:02x}" for b in secrets.token_bytes(5))])
        if connection.execute(_MAC_USED, {"mac": mac}).first() is None:
            return mac


def gateway_interface(
    gateway: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network
) -> ipaddress.IPv4Interface:
    """The address a managed bridge carries: its network's gateway, with the subnet's prefix."""
    return ipaddress.IPv4Interface(f"{gateway}/{subnet.prefixlen}")


def gateway_recorded(session: Session, bridge: str, host_name: str) -> bool:
    """Whether the network on `bridge` exists and records host `host_name` as the one whose
    bridge carries its gateway."""
    found = session.execute(
        select(Network.id)
        .join(Host, Host.id == Network.gateway_host_id)
        .where(Network.bridge == bridge, Host.name == host_name)
    ).first()
    return found is not None


@dataclass(frozen=True)
class SpannedBridge:
    """A cluster network's bridge as a host has it: the gateway address it would carry, its
    MTU, and the host the network records as carrying its gateway (None: no host now)."""

    bridge: str
    gateway: ipaddress.IPv4Interface
    mtu: int | None
    holder: str | None


def spanned_bridges(session: Session, bridges: Collection[str]) -> list[SpannedBridge]:
    """The cluster networks (with a VNI and a gateway) on `bridges`, by bridge."""
    found = session.execute(
        select(Network.bridge, Network.gateway, Network.subnet, Network.mtu, Host.name)
        .outerjoin(Host, Host.id == Network.gateway_host_id)
        .where(
            Network.bridge.in_(list(bridges)),
            Network.vni.is_not(None),
            Network.gateway.is_not(None),
            Network.subnet.is_not(None),
        )
        .order_by(Network.bridge)
    )
    return [
        SpannedBridge(
            row.bridge,
            gateway_interface(
                ipaddress.IPv4Address(row.gateway), ipaddress.IPv4Network(row.subnet)
            ),
            row.mtu,
            row.name,
        )
        for row in found
    ]


def gateway_mac(bridge: str) -> str:
    """The MAC of the bridge that carries a cluster network's gateway, the same on whichever
    host does, so peers know where to send to it: 06: (locally administered, unlike guests'
    02: and taps' fe:) and five bytes of the bridge name's hash."""
    digest = hashlib.sha256(bridge.encode()).digest()[:5]
    return ":".join(["06", *(f"{byte:02x}" for byte in digest)])


def tap_mac(guest_mac: str) -> str:
    """The tap's own MAC: the guest's with another locally administered prefix."""
    return TAP_MAC_PREFIX + guest_mac[2:]


def tap_name(vm: Holder, index: int = 0) -> str:
    """A tap name ≤ 15 bytes (`rtap` and an id of up to 9 digits, then `n<index>` for every
    interface but the first), unique because VM ids are never reused, and recognisable."""
    return f"{TAP_PREFIX}{vm.id}" if index == 0 else f"{TAP_PREFIX}{vm.id}n{index}"


@dataclass(frozen=True)
class Lease:
    """An address a VM's interface holds, for which purpose, and on which network."""

    interface: int
    purpose: str
    network_id: int
    subnet: str
    ip: ipaddress.IPv4Address


def leases_of(session: Session, vm_id: int) -> dict[tuple[int, str], Lease]:
    """The VM's leases by (interface, purpose)."""
    found = session.execute(
        select(IPLease.interface, IPLease.purpose, IPLease.network_id, Network.subnet, IPLease.ip)
        .join(Network, Network.id == IPLease.network_id)
        .where(IPLease.vm_id == vm_id)
    )
    return {
        (row.interface, row.purpose): Lease(
            row.interface, row.purpose, row.network_id, row.subnet, ipaddress.IPv4Address(row.ip)
        )
        for row in found
    }


def promote_reserved(
    session: Session, vm: Holder, *, keep_network: str, interface: int = 0
) -> list[tuple[int, str]]:
    """An interface that starts with the address a patch reserved: its current address is
    released (its network removed if that was its last lease), the reserved one is current."""
    reserved = session.scalar(
        select(IPLease).where(
            IPLease.vm_id == vm.id, IPLease.interface == interface, IPLease.purpose == RESERVED
        )
    )
    if reserved is None:
        return []
    emptied = release_address(session, vm, keep_network=keep_network, interface=interface)
    reserved.purpose = CURRENT
    session.flush()
    return emptied


@dataclass(frozen=True)
class Nic:
    """One interface a VM holds (`models.VMNic`): `mac` is the guest's (the user's, else
    roost's, which it keeps for life with its tap name)."""

    index: int
    roost_mac: str
    user_mac: str | None
    tap: str
    observed_ip: str | None
    ipv6: str | None

    @property
    def mac(self) -> str:
        return self.user_mac or self.roost_mac


def nics_of(session: Session, vm_id: int) -> dict[int, Nic]:
    """The VM's interfaces by index."""
    found = session.connection().execute(_NICS_OF, {"vm_id": vm_id})
    return {row[0]: Nic(*row) for row in found}


def hold_nic(
    session: Session,
    vm: Holder,
    index: int,
    user_mac: str | None,
    *,
    record: bool = True,
    new: bool = False,
) -> Nic:
    """The VM's interface `index`, made the first time (roost's MAC and its tap name, kept for
    the VM's life) and, when `record` (no VMM runs with the old one), given the user's MAC
    (None: roost's). A MAC another interface has is 409 `conflict` naming its holder. A `new`
    VM (recorded in this transaction) has no interface yet, so none is read."""
    if user_mac is not None:
        check_mac_free(session, user_mac, vm.id, index)
    connection = session.connection()
    nic = None if new else nics_of(session, vm.id).get(index)
    if nic is None:
        made = Nic(
            index, new_mac(session), user_mac if record else None, tap_name(vm, index), None, None
        )
        connection.execute(
            _ADD_NIC,
            {
                "vm_id": vm.id,
                "index": index,
                "mac": made.roost_mac,
                "user_mac": made.user_mac,
                "tap": made.tap,
            },
        )
        return made
    if record and nic.user_mac != user_mac:
        key = {"nic_vm_id": vm.id, "nic_index": index, "user_mac": user_mac}
        connection.execute(_SET_USER_MAC, key)
        return replace(nic, user_mac=user_mac)
    return nic


def check_mac_free(session: Session, mac: str, vm_id: int, index: int) -> None:
    """409 `conflict` naming the VM whose interface (other than this one) has `mac`."""
    holder = session.execute(
        select(VM.name, VMNic.vm_id, VMNic.index.label("nic"))
        .join(VM, VM.id == VMNic.vm_id)
        .where(or_(VMNic.mac == mac, VMNic.user_mac == mac))
    ).first()
    if holder is not None and (holder.vm_id, holder.nic) != (vm_id, index):
        raise ConflictError(
            f"MAC {mac} is already held by interface {holder.nic} of VM {holder.name!r}; "
            "choose another MAC or let roost pick one",
        )


def hold_ipv6(
    session: Session,
    vm: Holder,
    index: int,
    network_id: int | None,
    ip: ipaddress.IPv6Address | None,
    *,
    network_name: str | None = None,
    new: bool = False,
) -> None:
    """Record the IPv6 address the VM's interface `index` holds on network `network_id` (None:
    none; a `new` VM's interface, made in this transaction, already holds none). One another
    interface holds is 409 `conflict` naming its holder."""
    value = None if ip is None else str(ip)
    if value is None and new:
        return
    if ip is not None and network_id is not None:
        check_ipv6_free(session, vm, index, network_id, ip, network_name)
    session.connection().execute(
        _SET_IPV6,
        {
            "nic_vm_id": vm.id,
            "nic_index": index,
            "ipv6_network_id": None if value is None else network_id,
            "ipv6": value,
        },
    )


def check_ipv6_free(
    session: Session,
    vm: Holder,
    index: int,
    network_id: int,
    ip: ipaddress.IPv6Address,
    network_name: str | None,
) -> None:
    """409 `conflict` naming the VM whose interface (other than this one) holds `ip` on the
    network."""
    holder = session.execute(
        select(VM.name, VMNic.vm_id, VMNic.index.label("nic"))
        .join(VM, VM.id == VMNic.vm_id)
        .where(VMNic.ipv6_network_id == network_id, VMNic.ipv6 == str(ip))
    ).first()
    if holder is not None and (holder.vm_id, holder.nic) != (vm.id, index):
        raise ConflictError(
            f"IPv6 address {ip} is already held by interface {holder.nic} of VM "
            f"{holder.name!r} on network {network_name!r}; choose another address (or, for "
            "SLAAC, another MAC)",
        )


def release_nics_from(session: Session, vm: Holder, count: int) -> None:
    """Interfaces at `count` and after (dropped by a patch) hold no IPv6 address any more (their
    MACs and tap names stay theirs, should the index come back)."""
    session.execute(
        update(VMNic)
        .where(VMNic.vm_id == vm.id, VMNic.index >= count)
        .values(ipv6_network_id=None, ipv6=None, observed_ip=None)
    )
