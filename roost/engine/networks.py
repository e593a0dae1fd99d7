"""The registry of named networks: `network create` (a managed network, whose bridge roost makes
at once and keeps until `network rm`, an operator's external bridge, which roost only attaches
taps to, or a cni network, an inline conflist roost runs as a CNI runtime), `network show`,
`network rm`, and the lookup through which planning resolves a config that names a network. The
external network `dhcp` is `--dhcp-bridge`, registered at start.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
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
from roost.state.models import VM, IPLease, Network, VMConfigVersion
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


def lookup_in(session: Session) -> NetworkLookup:
    """Finds the networks a config may name, in `session`'s transaction: those registered by
    `network create` and `dhcp` (on-demand networks come and go with their leases: a config
    gives their subnet instead)."""

    def lookup(name: str) -> RegisteredNetwork | None:
        found = session.scalar(
            select(Network).where(Network.name == name, Network.kind != alloc.ON_DEMAND)
        )
        return None if found is None else registered(found)

    return lookup


def policy_lookup_in(session: Session) -> NetworkLookup:
    """The networks a policy's `@name` may name: those a config may, and the daemon's own
    network as `@default` (its subnet is --default-subnet's)."""
    registered_only = lookup_in(session)

    def lookup(name: str) -> RegisteredNetwork | None:
        if name != DEFAULT_NETWORK:
            return registered_only(name)
        found = session.scalar(select(Network).where(Network.name == DEFAULT_NETWORK))
        return None if found is None else registered(found)

    return lookup


def hold_networks(session: Session, names: Iterable[str]) -> set[str]:
    """Those of `names` that are registered networks, their rows locked FOR KEY SHARE until the
    transaction ends: what names a network by name alone (a VM's config, a policy's
    `@network`) is recorded before `network rm`, which locks the row FOR UPDATE before it looks
    for users, can remove it (on PostgreSQL; SQLite's single writer needs no lock)."""
    wanted = set(names)
    if not wanted:
        return set()
    held = (
        select(Network.name)
        .where(Network.name.in_(wanted))
        .with_for_update(read=True, key_share=True)
    )
    return set(session.scalars(held))


def missing_network_errors(session: Session, resolved: ResolvedInterfaces) -> list[ErrorDetail]:
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
    held = hold_networks(session, [name for _, name in named] + cni_named)
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


class NetworkRegistry:
    """Creates, shows and removes named networks, their bridges with them."""

    def __init__(self, db: Database, host: HostNetwork, dhcp_bridge: str | None) -> None:
        self.db = db
        self.host = host
        self.dhcp_bridge = dhcp_bridge

    # ---- reading ------------------------------------------------------------------------

    def show(self, name: str) -> dict[str, Any]:
        with self.db.read() as session:
            network = session.scalar(select(Network).where(Network.name == name))
            if network is None:
                raise no_network(name)
            return network_view(network, _leased(session, network.id))

    # ---- registering --------------------------------------------------------------------

    def create(self, request: NetworkCreate) -> dict[str, Any]:
        """Register `request`: an external network once its bridge is found to be one; a
        managed one with its bridge made (and masqueraded, with --nat) before it commits; a
        cni one as its conflist alone (its plugins run when a VM attaches)."""
        conflist = request.cni
        if conflist is not None:
            return self.db.transact(
                lambda session: network_view(
                    cni.add_network(session, request.name, conflist.to_json()), []
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
        with self.db.read() as session:
            holder = session.scalar(select(Network.name).where(Network.bridge == bridge))
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
        )
        if kind == alloc.MANAGED:
            gateways = self.host.gateways
            if gateways is not None:  # this host makes its bridge first: its gateway is here
                gateways.carried_here(alloc.bridge_of(network), session)
            made.append(alloc.bridge_of(network))
            self._make_bridge(network)
        return network_view(network, [])

    def _make_bridge(self, network: Network) -> None:
        planned = registered(network)
        assert planned.subnet is not None and planned.gateway is not None
        gateway = alloc.gateway_interface(planned.gateway, planned.subnet)
        self.host.make_bridge(alloc.bridge_of(network), gateway, planned.ipv6_prefix, network.mtu)

    # ---- removing -----------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Unregister a named network no VM uses (409 `network_in_use` naming them); a managed
        one's bridge goes with it. On-demand networks and `dhcp` are roost's to remove."""
        with self.host.lock:
            bridge = self.db.transact(lambda session: self._delete(session, name))
            if bridge is not None:
                self.host.remove_bridge(bridge)

    def _delete(self, session: Session, name: str) -> str | None:
        # locked before the users are looked for: a create naming it waits, or is waited for
        network = session.scalar(select(Network).where(Network.name == name).with_for_update())
        if network is None:
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
        users = _users(session, network)
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
        removed), every managed network's bridge is there (after a host's reboot too; in a
        cluster, those whose gateway this host carries, on-demand ones such as the default
        network's included), and router advertisements run on exactly those with an IPv6
        prefix."""
        self.db.transact(self._register_dhcp)
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

    def _register_dhcp(self, session: Session) -> None:
        network = session.scalar(select(Network).where(Network.name == DHCP_NETWORK))
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
            alloc.add_network(session, DHCP_NETWORK, alloc.EXTERNAL, bridge, None, None)
        elif network.bridge != bridge:
            holder = session.scalar(select(Network.name).where(Network.bridge == bridge))
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
    as their latest config resolves them) names it (as its `network`, or its `cni.network`)."""
    users = set(
        session.scalars(select(VM.name).join(IPLease).where(IPLease.network_id == network.id))
    )
    for vm_name, stored in session.execute(select(VM.name, VM.network)):
        planned = (stored or {}).get("interfaces") or []
        if any(_names(one["effective"], network.name) for one in planned):
            users.add(vm_name)
    latest = select(VM.name, VMConfigVersion.effective).join(
        VMConfigVersion,
        (VMConfigVersion.vm_id == VM.id) & (VMConfigVersion.version == VM.config_version),
    )
    for vm_name, effective in session.execute(latest):
        if any(_names(one, network.name) for one in effective["interfaces"]):
            users.add(vm_name)
    return users


def _names(interface: dict[str, Any], network: str) -> bool:
    """Whether an interface's effective JSON names `network`."""
    attached = interface.get("cni") or {}
    return network in (interface.get("network"), attached.get("network"))
