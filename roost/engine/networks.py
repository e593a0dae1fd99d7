"""The registry of named networks: `network create` (a managed network, whose bridge roost makes
at once and keeps until `network rm`, an operator's external bridge, which roost only attaches
taps to, or a cni network, an inline conflist roost runs as a CNI runtime), `network show`,
`network rm`, and the lookup through which planning resolves a config that names a network. The
external network `dhcp` is `--dhcp-bridge`, registered at start.

In a cluster an external network (and `dhcp`) is its host's: registered by that host's agent,
named uniquely on it (never with a cluster network's name), and what a name in a VM's config
resolves to on that host before the cluster's networks (`alloc.named`). Another host's is
shown with its `host` and removed through its own host's agent.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import select, true
from sqlalchemy.orm import Session

from roost.engine.hostnet import HostNetwork
from roost.engine.settings import DEFAULT_NETWORK
from roost.engine.views import network_view
from roost.errors import ConflictError, ErrorDetail, HostError, InvalidError, NotFoundError
from roost.plan.interfaces import ResolvedInterfaces
from roost.plan.registration import AUTO_PREFIX, NetworkCreate, random_prefix
from roost.plan.registry import DHCP_NETWORK, NetworkKind, NetworkLookup, RegisteredNetwork
from roost.spec.cni import parse_conflist
from roost.state import alloc, cni
from roost.state.db import Database
from roost.state.models import VM, Host, IPLease, Network, VMConfigVersion
from roost.state.policies import naming_network

log = logging.getLogger("roost.engine")


def registered(network: Network) -> RegisteredNetwork:
    """A network row as planning sees it."""
    subnet = None if network.subnet is None else ipaddress.IPv4Network(network.subnet)
    gateway = None if network.gateway is None else ipaddress.IPv4Address(network.gateway)
    prefix = None if network.ipv6_prefix is None else ipaddress.IPv6Network(network.ipv6_prefix)
    conflist = None if network.conflist is None else parse_conflist(network.conflist, loc="-")
    return RegisteredNetwork(
        network.name,
        NetworkKind(network.kind),
        network.bridge,
        subnet,
        gateway,
        prefix,
        conflist,
        network.mtu,
    )


def lookup_in(
    session: Session, host_id: int | None = None, *, anywhere: bool = False
) -> NetworkLookup:
    """Finds the networks a config may name, in `session`'s transaction: those registered by
    `network create` and `dhcp` (on-demand networks come and go with their leases: a config
    gives their subnet instead), as host `host_id` sees them (`alloc.named`: its own external
    networks first; with `anywhere`, another host's too, for placement to know a name is an
    external network some host has)."""

    def lookup(name: str) -> RegisteredNetwork | None:
        found = session.scalar(alloc.named(name, host_id, anywhere=anywhere))
        return None if found is None or found.kind == alloc.ON_DEMAND else registered(found)

    return lookup


def policy_lookup_in(session: Session, host_id: int | None = None) -> NetworkLookup:
    """The networks a policy's `@name` may name: those a config may, and the daemon's own
    network as `@default` (its subnet is --default-subnet's). A policy is the cluster's: on
    host `host_id` `@ext` is its own external network `ext`, else the cluster's, else another
    host's (a policy may name what only some hosts have)."""
    registered_only = lookup_in(session, host_id, anywhere=True)

    def lookup(name: str) -> RegisteredNetwork | None:
        if name != DEFAULT_NETWORK:
            return registered_only(name)
        found = session.scalar(select(Network).where(Network.name == DEFAULT_NETWORK))
        return None if found is None else registered(found)

    return lookup


def hold_networks(session: Session, names: Iterable[str], host_id: int | None = None) -> set[str]:
    """Those of `names` that are registered networks (that host `host_id` sees; any, for
    None), their rows locked FOR KEY SHARE until the transaction ends: what names a network by
    name alone (a VM's config, a policy's `@network`) is recorded before `network rm`, which
    locks the row FOR UPDATE before it looks for users, can remove it (on PostgreSQL;
    SQLite's single writer needs no lock)."""
    wanted = set(names)
    if not wanted:
        return set()
    held = (
        select(Network.name)
        .where(Network.name.in_(wanted), alloc.seen_from(host_id))
        .with_for_update(read=True, key_share=True)
    )
    return set(session.scalars(held))


def missing_network_errors(
    session: Session, resolved: ResolvedInterfaces, host_id: int | None = None
) -> list[ErrorDetail]:
    """Each registered network a VM's interfaces name (as their `network`, or their
    `cni.network`) held until the transaction ends (`hold_networks`), and an error at
    `<interface>.network` for each named as `network` that is gone since the VM was planned
    (a `network rm` committed meanwhile)."""
    named: list[tuple[str, str]] = []
    cni_named: list[str] = []
    for interface in resolved.interfaces:
        where = "network" if resolved.single else f"interfaces.{interface.index}"
        if interface.effective.network is not None:
            named.append((f"{where}.network", interface.effective.network))
        if interface.effective.cni is not None:
            cni_named.append(interface.effective.cni.network)
    held = hold_networks(session, [name for _, name in named] + cni_named, host_id)
    return [
        ErrorDetail(
            loc,
            f"network {name!r} does not exist (it was removed meanwhile); roost network list "
            "shows those that do",
        )
        for loc, name in named
        if name not in held
    ]


def no_network(name: str) -> NotFoundError:
    return NotFoundError(
        f"network {name!r} does not exist (roost network list shows those that do)"
    )


def host_names(session: Session) -> dict[int, str]:
    """Each cluster host's name by id (what a host-local network's view names)."""
    return {host_id: name for host_id, name in session.execute(select(Host.id, Host.name))}


class NetworkRegistry:
    """Creates, shows and removes named networks, their bridges with them; in a cluster, as
    host `host_id` (set once the agent has joined), whose external networks these are."""

    def __init__(self, db: Database, host: HostNetwork, dhcp_bridge: str | None) -> None:
        self.db = db
        self.host = host
        self.dhcp_bridge = dhcp_bridge
        self.host_id: int | None = None

    @property
    def in_cluster(self) -> bool:
        return self.host.gateways is not None

    # ---- reading ------------------------------------------------------------------------

    def hosts(self, session: Session) -> Mapping[int, str] | None:
        """The host names a view shows (None on a single host: views have no `host`)."""
        return host_names(session) if self.in_cluster else None

    def show(self, name: str) -> dict[str, Any]:
        """Network `name` as this host resolves it (its own external network of that name,
        else the cluster's), else another host's."""
        with self.db.read() as session:
            network = session.scalar(alloc.named(name, self.host_id, anywhere=True))
            if network is None:
                raise no_network(name)
            return network_view(network, _leased(session, network.id), self.hosts(session))

    # ---- registering --------------------------------------------------------------------

    def create(self, request: NetworkCreate) -> dict[str, Any]:
        """Register `request`: an external network once its bridge is found to be one; a
        managed one with its bridge made (and masqueraded, with --nat) before it commits; a
        cni one as its conflist alone (its plugins run when a VM attaches)."""
        conflist = request.cni
        if conflist is not None:
            return self.db.transact(
                lambda session: network_view(
                    cni.add_network(session, request.name, conflist.to_json()),
                    [],
                    self.hosts(session),
                )
            )
        with self.host.lock:
            if request.bridge is not None:
                self._check_bridge(request)
            if request.external:
                return self.db.transact(lambda session: self._add(session, request, None, []))
            prefix = request.ipv6_prefix
            if prefix == AUTO_PREFIX:  # chosen once, stored: stable from here on
                prefix = random_prefix()
            made: list[str] = []  # bridges made by attempts of the transaction
            try:
                view = self.db.transact(lambda session: self._add(session, request, prefix, made))
            except BaseException:
                for bridge in made:
                    self.host.remove_bridge(bridge)
                raise
            for bridge in made[:-1]:  # an attempt that was retried may have had another id
                if bridge != view["bridge"]:
                    self.host.remove_bridge(bridge)
            return view

    def _check_bridge(self, request: NetworkCreate) -> None:
        """A name held by a link that is no bridge, a missing external bridge, or a managed
        network on a bridge roost did not make, refused before anything is recorded."""
        bridge = request.bridge
        assert bridge is not None
        with self.db.read() as session:  # an external bridge is its host's
            holder = alloc.bridge_holder(
                session, bridge, self.host_id if request.external else None
            )
        if holder is not None:
            raise ConflictError(
                f"bridge {bridge} is network {holder!r}'s; one network per bridge: choose "
                "another bridge, or name that network in your VMs"
            )
        info = self.host.links.info(bridge)
        if info is None:
            if request.external:
                raise InvalidError.at(
                    "bridge",
                    f"no link named {bridge} exists in the daemon's namespace; create the "
                    "bridge first, then register it",
                )
            return
        if info.kind != "bridge":
            raise ConflictError(
                f"{bridge} is a {info.kind or 'link'}, not a bridge; name a bridge, or "
                "another name for roost to make one"
            )
        if not request.external:
            raise ConflictError(
                f"bridge {bridge} exists and roost did not make it: a managed network owns "
                f"its bridge's addresses; register it with --external, or name another bridge"
            )

    def _add(
        self, session: Session, request: NetworkCreate, prefix: str | None, made: list[str]
    ) -> dict[str, Any]:
        kind = alloc.EXTERNAL if request.external else alloc.MANAGED
        network = alloc.add_network(
            session,
            request.name,
            kind,
            request.bridge,
            request.subnet_net,
            request.gateway_addr,
            prefix,
            self.host_id if kind == alloc.EXTERNAL else None,
        )
        if kind == alloc.MANAGED:
            gateways = self.host.gateways
            if gateways is not None:  # this host makes its bridge first: its gateway is here
                gateways.carried_here(alloc.bridge_of(network), session)
            made.append(alloc.bridge_of(network))
            self._make_bridge(network)
        return network_view(network, [], self.hosts(session))

    def _make_bridge(self, network: Network) -> None:
        planned = registered(network)
        assert planned.subnet is not None and planned.gateway is not None
        gateway = alloc.gateway_interface(planned.gateway, planned.subnet)
        self.host.make_bridge(alloc.bridge_of(network), gateway, planned.ipv6_prefix, network.mtu)

    # ---- removing -----------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Unregister a named network no VM uses (409 `network_in_use` naming them); a managed
        one's bridge goes with it. On-demand networks and `dhcp` are roost's to remove. In a
        cluster `name` is this host's external network of that name, else the cluster's;
        another host's external network is removed through that host's agent."""
        with self.host.lock:
            bridge = self.db.transact(lambda session: self._delete(session, name))
            if bridge is not None:
                self.host.remove_bridge(bridge)

    def _delete(self, session: Session, name: str) -> str | None:
        # locked before the users are looked for: a create naming it waits, or is waited for
        network = session.scalar(alloc.named(name, self.host_id).with_for_update())
        if network is None:
            elsewhere = session.scalars(
                select(Host.name)
                .join(Network, Network.host_id == Host.id)
                .where(Network.name == name)
                .order_by(Host.name)
            ).all()
            if elsewhere:
                raise NotFoundError(
                    f"network {name!r} is not this host's: it is host-local to "
                    f"{', '.join(elsewhere)}; remove it through that host's agent "
                    "(roost network rm on that host)"
                )
            raise no_network(name)
        if network.kind == alloc.ON_DEMAND:
            raise ConflictError(
                f"network {name!r} was made on demand (by a subnet in a config) and goes with "
                "its last address; roost network rm removes networks made by network create"
            )
        if network.name == DHCP_NETWORK:
            raise ConflictError(
                f"network {name!r} is the daemon's --dhcp-bridge; restart the daemon without "
                "--dhcp-bridge to remove it"
            )
        users = _users(session, network)  # of its host alone, for a host-local one
        if users:
            listed = ", ".join(sorted(users))
            raise ConflictError(
                f"network {name!r} is used by VM(s) {listed}; remove them, or patch their "
                "network, first",
                code="network_in_use",
            )
        policies = naming_network(session, network.name)
        if policies:
            raise ConflictError(
                f"network {name!r} is named as @{name} by policy(ies) {', '.join(policies)}; "
                "change their rules (roost policy apply) first",
                code="network_in_use",
            )
        session.delete(network)
        return network.bridge if network.kind == alloc.MANAGED else None

    # ---- the daemon's start ---------------------------------------------------------------

    def restore(self) -> None:
        """At start: the external network `dhcp` follows `--dhcp-bridge` (registered, moved or
        removed; in a cluster once the host has joined: `register_dhcp`), every managed
        network's bridge is there (after a host's reboot too; in a cluster, those whose gateway
        this host carries, on-demand ones such as the default network's included), and router
        advertisements run on exactly those with an IPv6 prefix."""
        if not self.in_cluster:
            self.register_dhcp()
        gateways = self.host.gateways
        kinds = [alloc.MANAGED] if gateways is None else [alloc.MANAGED, alloc.ON_DEMAND]
        with self.db.read() as session:
            managed = list(session.scalars(select(Network).where(Network.kind.in_(kinds))))
            session.expunge_all()
        advertised = {}
        for network in managed:
            bridge = alloc.bridge_of(network)
            if gateways is not None and network.kind == alloc.ON_DEMAND:
                if not gateways.recorded_here(bridge):
                    continue  # on demand: made with a tap, unless it carries our gateway
            elif gateways is not None and not gateways.carried_here(bridge):
                continue  # another host's bridge carries its gateway; ours comes with a tap
            try:
                self._make_bridge(network)
            except HostError as error:
                log.error(
                    "network %s: cannot set up bridge %s: %s", network.name, network.bridge, error
                )
            else:
                if (prefix := registered(network).ipv6_prefix) is not None:
                    advertised[alloc.bridge_of(network)] = prefix
        try:
            self.host.advertise_only(advertised)
        except HostError as error:
            log.error("router advertisements: %s", error)

    def register_dhcp(self) -> None:
        """The external network `dhcp` follows `--dhcp-bridge`: registered (in a cluster as
        this host's, `host_id`), moved or removed."""
        self.db.transact(self._register_dhcp)

    def _register_dhcp(self, session: Session) -> None:
        if self.host_id is not None:  # what a single host registered is now its host's
            for name in alloc.adopt_external(session, self.host_id):
                log.info("network %s: registered before the cluster, now this host's", name)
        own = Network.host_id.is_(None) if self.host_id is None else Network.host_id == self.host_id
        network = session.scalar(select(Network).where(Network.name == DHCP_NETWORK, own))
        bridge = self.dhcp_bridge
        if bridge is None:
            if network is None:
                return
            policies = naming_network(session, DHCP_NETWORK)
            if policies:
                raise ConflictError(
                    f"policy {policies[0]!r} names @{DHCP_NETWORK}, the network of "
                    "--dhcp-bridge, which this daemon was started without; start it with "
                    f"--dhcp-bridge again, or first drop @{DHCP_NETWORK} from "
                    + ", ".join(repr(name) for name in policies)
                )
            session.delete(network)
            return
        if network is None:
            alloc.add_network(
                session, DHCP_NETWORK, alloc.EXTERNAL, bridge, None, None, host_id=self.host_id
            )
        elif network.bridge != bridge:
            holder = alloc.bridge_holder(session, bridge, self.host_id)
            if holder is not None:
                raise ConflictError(
                    f"--dhcp-bridge {bridge} is network {holder!r}'s bridge; name another "
                    f"bridge, or remove network {holder!r} first"
                )
            network.bridge = bridge


def _leased(session: Session, network_id: int) -> list[int]:
    return list(
        session.scalars(
            select(IPLease.ip).where(IPLease.network_id == network_id).order_by(IPLease.ip)
        )
    )


def _users(session: Session, network: Network) -> set[str]:
    """The VMs that hold an address on `network`, or one of whose interfaces (as planned, or
    as their latest config resolves them) names it (as its `network`, or its `cni.network`);
    of a host-local network, the VMs of its host (another host's name it for their own)."""
    users = set(
        session.scalars(select(VM.name).join(IPLease).where(IPLease.network_id == network.id))
    )
    on_host = true() if network.host_id is None else VM.host_id == network.host_id
    for vm_name, stored in session.execute(select(VM.name, VM.network).where(on_host)):
        planned = (stored or {}).get("interfaces") or []
        if any(_names(one["effective"], network.name) for one in planned):
            users.add(vm_name)
    latest = (
        select(VM.name, VMConfigVersion.effective)
        .join(
            VMConfigVersion,
            (VMConfigVersion.vm_id == VM.id) & (VMConfigVersion.version == VM.config_version),
        )
        .where(on_host)
    )
    for vm_name, effective in session.execute(latest):
        if any(_names(one, network.name) for one in effective["interfaces"]):
            users.add(vm_name)
    return users


def _names(interface: dict[str, Any], network: str) -> bool:
    """Whether an interface's effective JSON names `network`."""
    attached = interface.get("cni") or {}
    return network in (interface.get("network"), attached.get("network"))
