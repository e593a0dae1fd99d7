"""The host side of VMs' networks: the bridges roost manages (masqueraded with --nat), the
VMs' taps, their anti-spoofing rules and their network policies, each made with its undo
recorded.

A tap with policies (or defaults other than allow both ways) is attached to them before it is
made: attachment is by name, so its VMM never sends through it unfiltered. It is detached only
once it is gone. A tap without is never attached, as before policies existed.

Bridge set-up, tap creation and bridge removal share one lock, so a bridge is never removed
under a tap that is being attached to it: a VM's tap is made only once the lease that keeps its
bridge has committed (its allocating transaction does no host work), so a removal that judges a
bridge unused after that commit sees the lease, and one that judged it before has removed the
bridge by the time the tap's maker holds the lock, which then sets the bridge up again. Only
the bridge and the tap's link are made under the lock; policies and rules are not.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.orm import Session

from roost.engine.settings import DEFAULT_BRIDGE
from roost.engine.steps import Steps
from roost.errors import HostError
from roost.host.links import LinkInfo
from roost.plan import AntiSpoof, Attachment
from roost.plan.policy import NetworkLookup, TapPolicies
from roost.spec.policy import Policy, PolicyDefaults
from roost.state import alloc

log = logging.getLogger("roost.engine")
Emptied = list[tuple[int, str]]  # (network id, bridge) of networks that lost their last lease
ALLOW_BOTH = PolicyDefaults()  # a tap's policy defaults when none are given: today's behaviour


class Links(Protocol):
    """The links of the daemon's namespace (`roost.host.links.Links`)."""

    def info(self, name: str) -> LinkInfo | None: ...

    def names(self, prefix: str) -> list[str]: ...

    def ensure_bridge(
        self,
        name: str,
        address: ipaddress.IPv4Interface | None,
        *,
        mtu: int | None = None,
        mac: str | None = None,
    ) -> None: ...

    def create_tap(
        self, name: str, bridge: str, mac: str, *, owned: bool = False, mtu: int | None = None
    ) -> None: ...

    def delete(self, name: str) -> bool: ...

    def drop_address(self, name: str, address: ipaddress.IPv4Interface, mac: str) -> bool: ...


class Gateways(Protocol):
    """Which host's bridge carries a cluster network's gateway address
    (`roost.engine.clusternet.ClusterNetworks`)."""

    host_name: str

    def carried_here(self, bridge: str, session: Session | None = None) -> bool: ...

    def recorded_here(self, bridge: str) -> bool: ...

    def spanned(self, bridges: Collection[str]) -> list[alloc.SpannedBridge]: ...

    def poke(self) -> None: ...


class Rules(Protocol):
    """Per-tap anti-spoofing rules (`roost.host.firewall.Firewall`)."""

    def protect(
        self, tap: str, mac: str, ip: str | None, ipv6: Sequence[str] | None = None
    ) -> None: ...

    def release(self, tap: str) -> None: ...


class Nat(Protocol):
    """Masquerading of the managed networks (`roost.host.nat.Masquerade`, with --nat)."""

    def add(self, bridge: str, subnet: ipaddress.IPv4Network) -> None: ...

    def remove(self, bridge: str) -> None: ...

    def reconcile(self, networks: Mapping[str, ipaddress.IPv4Network]) -> None: ...


class Adverts(Protocol):
    """Router advertisements on managed bridges with an IPv6 prefix
    (`roost.host.ra.RouterAdverts`)."""

    def start(self, bridge: str, prefix: ipaddress.IPv6Network) -> None: ...

    def stop(self, bridge: str) -> None: ...

    def reconcile(self, wanted: Mapping[str, ipaddress.IPv6Network]) -> None: ...


class PolicyRules(Protocol):
    """Network policies on taps (`roost.host.policy.PolicyFirewall`): each change one atomic
    transaction; a tap's policies are made already (by the policy registry, and at start)."""

    def apply(
        self,
        *,
        policies: Sequence[Policy] = (),
        taps: Sequence[TapPolicies] = (),
        removed_taps: Sequence[str] = (),
        removed_policies: Sequence[str] = (),
        lookup: NetworkLookup,
    ) -> None: ...

    def release(self, tap: str) -> None: ...

    def attached_taps(self) -> set[str]: ...

    def made_policies(self) -> set[str]: ...


@dataclass(frozen=True)
class TapPlan:
    """One tap as the plan and the allocation have it: its name and guest MAC, the bridge it
    joins (and the managed network behind that bridge, if roost manages it), how it joins, the
    bridge's own address (a managed bridge's gateway) and what its rules let it send (`ipv6`:
    its own IPv6 addresses on a network with a prefix; None drops all its IPv6, as ever), the
    network policies it is attached to with their defaults, and the MTU of its network (None:
    the kernel's default; a cluster network's)."""

    tap: str
    mac: str
    bridge: str
    network_id: int | None
    attach: Attachment
    gateway: ipaddress.IPv4Interface | None
    antispoof: AntiSpoof
    ip: str | None
    jailed: bool = False  # its VMM runs under the jailer, which opens it as its uid
    network: str | None = None  # the registered network it joins, when its config named one
    ipv6: tuple[str, ...] | None = None
    policies: tuple[str, ...] = ()
    policy_defaults: PolicyDefaults = ALLOW_BOTH
    mtu: int | None = None

    @property
    def filtered(self) -> TapPolicies | None:
        """What the tap is attached to; None for a tap policies leave alone."""
        return tap_policies(self.tap, self.policies, self.policy_defaults)


def tap_policies(
    tap: str, policies: Sequence[str], defaults: PolicyDefaults | None
) -> TapPolicies | None:
    """A tap's attachment: None when it has no policy and lets everything through both ways
    (such a tap is not attached at all)."""
    defaults = defaults or ALLOW_BOTH
    if not policies and defaults == ALLOW_BOTH:
        return None
    return TapPolicies(tap, tuple(policies), defaults)


class HostNetwork:
    """Bridges, taps and rules in the daemon's namespace. `leased(network_id)` says whether a
    network still has an address leased on it (read from the database by the caller's
    choice of collaborator). With `nat`, each managed bridge is masqueraded while it exists;
    `adverts` advertise the IPv6 prefix of a named managed network on its bridge. `policies`
    enforces network policies on taps; None where the kernel lacks what they need
    (`policy_gaps` says what), and then a tap with policies cannot be made. In a cluster,
    `gateways` says whether a cluster network's bridge here carries its gateway address (one
    host's does, with a MAC derived from the bridge's name) and is told of each bridge and
    tap made (the overlay follows)."""

    def __init__(
        self,
        links: Links,
        firewall: Rules,
        leased: Callable[[int], bool],
        nat: Nat | None = None,
        adverts: Adverts | None = None,
        policies: PolicyRules | None = None,
        policy_gaps: Sequence[str] = (),
        gateways: Gateways | None = None,
    ) -> None:
        self.links = links
        self.gateways = gateways
        self.firewall = firewall
        self.nat = nat
        self.adverts = adverts
        self.policies = policies
        self.policy_gaps = tuple(policy_gaps)
        self._leased = leased
        # network create and remove hold it around their transactions and take it again
        self.lock = threading.RLock()
        self._bridges_ready: set[str] = set()
        # set when orphaned VMMs were kept at start: their taps may be on any managed bridge
        self.keep_bridges = False

    def attach(self, steps: Steps, tap: TapPlan) -> None:
        """Attach the tap's policies, make the tap on its bridge (setting the bridge up first)
        and add its rules, each undone through `steps`: the rules dropped; the tap removed,
        then its policies detached, then its bridge removed unless a lease keeps it."""
        filtered = tap.filtered
        if filtered:
            self.enforce([filtered])
        else:  # whatever an earlier tap of that name left attached goes (no-op otherwise)
            self._detach(tap.tap)
        try:
            with self.lock:
                self._make_tap(tap)
        except BaseException:
            if filtered:
                self._detach(tap.tap)
            raise

        def drop() -> None:
            self.links.delete(tap.tap)
            if filtered:
                self._detach(tap.tap)
            if tap.network_id is not None:
                self.remove_bridges([(tap.network_id, tap.bridge)])

        attached = f" attached to {filtered.attachment}" if filtered else ""
        steps.done("tap", f"created tap {tap.tap} on {tap.bridge}{attached}", drop)
        if tap.antispoof is not AntiSpoof.NONE:
            ip = tap.ip if tap.antispoof is AntiSpoof.IP_AND_MAC else None
            if tap.ipv6 is None:
                self.firewall.protect(tap.tap, tap.mac, ip)
            else:
                self.firewall.protect(tap.tap, tap.mac, ip, ipv6=tap.ipv6)
            steps.done("rules", "added anti-spoofing rules", lambda: self.firewall.release(tap.tap))

    def enforce(self, attach: Sequence[TapPolicies], detach: Sequence[str] = ()) -> None:
        """Point each tap of `attach` at its policies and detach `detach`, in one transaction.
        Detaching a tap that is not attached does nothing (not even a transaction), so a tap
        without policies costs nothing; without a policy firewall, attaching is a HostError
        naming what the kernel lacks."""
        if self.policies is None:
            if attach:
                lacks = "; ".join(self.policy_gaps) or "this daemon has no policy firewall"
                raise HostError(
                    f"tap {attach[0].tap} has network policies, which cannot be enforced on "
                    f"this host: {lacks}; remove its policies and policy_defaults, or run the "
                    "daemon where the kernel has what they need"
                )
            return
        self.policies.apply(taps=attach, removed_taps=detach, lookup=_no_network)

    def set_tap_policies(self, wanted: Mapping[str, TapPolicies | None]) -> None:
        """Make existing taps' policies what `wanted` says (tap → its attachment, None for
        none), in one transaction."""
        attach = [policies for policies in wanted.values() if policies is not None]
        self.enforce(attach, [tap for tap, policies in wanted.items() if policies is None])

    def restore_policies(
        self,
        policies: Sequence[Policy],
        taps: Sequence[TapPolicies],
        lookup: NetworkLookup,
        keep: Callable[[str], bool],
    ) -> list[str]:
        """At start, in one transaction: every stored policy made again (the chains of one
        not stored, which a create cut short left, removed), each of `taps` attached to its
        policies, and every other attached tap (one whose VM no longer runs, or an attachment
        a start cut short left) detached unless `keep(tap)`. The taps detached."""
        if self.policies is None:
            self.enforce(taps)  # with taps to attach, the HostError saying what is missing
            return []
        wanted = {attached.tap for attached in taps}
        stale = sorted(
            tap for tap in self.policies.attached_taps() if tap not in wanted and not keep(tap)
        )
        unknown = sorted(self.policies.made_policies() - {policy.name for policy in policies})
        self.policies.apply(
            policies=policies,
            taps=taps,
            removed_taps=stale,
            removed_policies=unknown,
            lookup=lookup,
        )
        return stale

    def _detach(self, tap: str) -> None:
        if self.policies is not None:
            self.policies.release(tap)

    def _make_tap(self, tap: TapPlan) -> None:
        """A fresh tap on its bridge, setting the bridge up first unless this daemon already
        did (and again if it has vanished since)."""
        if tap.bridge not in self._bridges_ready:
            self._ensure_bridge(tap)
            self._bridges_ready.add(tap.bridge)
        mac = alloc.tap_mac(tap.mac)
        try:
            self.links.create_tap(tap.tap, tap.bridge, mac, owned=tap.jailed, mtu=tap.mtu)
        except HostError:
            self._bridges_ready.discard(tap.bridge)
            self._ensure_bridge(tap)
            self.links.create_tap(tap.tap, tap.bridge, mac, owned=tap.jailed, mtu=tap.mtu)
            self._bridges_ready.add(tap.bridge)
        if self.gateways is not None:
            self.gateways.poke()

    def _ensure_bridge(self, tap: TapPlan) -> None:
        if tap.attach is Attachment.EXTERNAL:
            info = self.links.info(tap.bridge)
            if (info is None or info.kind != "bridge") and tap.network is not None:
                raise HostError(
                    f"bridge {tap.bridge} of network {tap.network!r} does not exist (or is not "
                    "a bridge) in the daemon's namespace; the operator must create it again"
                )
            if info is None or info.kind != "bridge":
                raise HostError(
                    f"the dhcp bridge {tap.bridge} does not exist (or is not a bridge) in the "
                    "daemon's namespace; create it and connect it to a network with a DHCP server"
                )
            return
        assert tap.gateway is not None
        gateway, mac = self._gateway_here(tap.bridge, tap.gateway)
        self.links.ensure_bridge(tap.bridge, gateway, mtu=tap.mtu, mac=mac)
        if self.nat is not None and gateway is not None:
            self.nat.add(tap.bridge, tap.gateway.network)

    def _gateway_here(
        self, bridge: str, gateway: ipaddress.IPv4Interface
    ) -> tuple[ipaddress.IPv4Interface | None, str | None]:
        """The address and MAC a managed bridge gets here: its gateway's (the MAC the one
        derived from its name, which peers send it to) where this host carries it, none
        where another host does; on a single host, its gateway and the kernel's MAC."""
        if self.gateways is None:
            return gateway, None
        if self.gateways.carried_here(bridge):
            return gateway, alloc.gateway_mac(bridge)
        return None, None

    def make_bridge(
        self,
        bridge: str,
        gateway: ipaddress.IPv4Interface,
        ipv6_prefix: ipaddress.IPv6Network | None = None,
        mtu: int | None = None,
    ) -> None:
        """A named managed network's bridge, up with its gateway address (and masqueraded,
        with --nat; its IPv6 prefix advertised, if it has one), made when the network is
        created and kept until it is removed. In a cluster, the host that carries the
        network's gateway makes it so (the caller has claimed it), with its gateway's MAC."""
        mac = None if self.gateways is None else alloc.gateway_mac(bridge)
        with self.lock:
            self.links.ensure_bridge(bridge, gateway, mtu=mtu, mac=mac)
            if self.nat is not None:
                self.nat.add(bridge, gateway.network)
            if ipv6_prefix is not None:
                assert self.adverts is not None, "a daemon with IPv6 networks advertises them"
                self.adverts.start(bridge, ipv6_prefix)
            self._bridges_ready.add(bridge)
        if self.gateways is not None:
            self.gateways.poke()

    def advertise_only(self, wanted: Mapping[str, ipaddress.IPv6Network]) -> None:
        """At start: router advertisements on exactly the bridges of `wanted` (bridge → prefix),
        those a previous daemon started adopted, any other ended."""
        if self.adverts is not None:
            self.adverts.reconcile(wanted)

    def remove_bridge(self, bridge: str) -> None:
        """A named managed network's bridge, removed with the network."""
        with self.lock:
            self._remove_bridge(bridge)

    def release(self, tap: str) -> None:
        """Remove a tap, its rules and (once it is gone) its policies' attachment: what exists
        only while its VMM runs."""
        self.firewall.release(tap)
        self.links.delete(tap)
        self._detach(tap)
        if self.gateways is not None:
            self.gateways.poke()

    def settle_gateways(self) -> None:
        """In a cluster, each cluster network's bridge here carries its gateway exactly while
        the network records this host: a gateway no host carries (its host was lost) is
        claimed by the first host that has the bridge, and a bridge whose gateway is recorded
        as another host's (this one was fenced meanwhile) loses the address and the gateway's
        MAC. Run at each overlay sync."""
        gateways = self.gateways
        if gateways is None:
            return
        with self.lock:
            present = {*self.links.names(alloc.BRIDGE_PREFIX), *self.links.names(DEFAULT_BRIDGE)}
            for spanned in gateways.spanned(present) if present else []:
                bridge = spanned.bridge
                if spanned.holder is None and gateways.carried_here(bridge):
                    mac = alloc.gateway_mac(bridge)
                    self.links.ensure_bridge(bridge, spanned.gateway, mtu=spanned.mtu, mac=mac)
                    if self.nat is not None:
                        self.nat.add(bridge, spanned.gateway.network)
                    log.info("bridge %s carries gateway %s now", bridge, spanned.gateway)
                elif spanned.holder not in (None, gateways.host_name) and self.links.drop_address(
                    bridge, spanned.gateway, _bridge_mac()
                ):
                    if self.nat is not None:
                        self.nat.remove(bridge)
                    log.warning(
                        "took gateway %s off bridge %s: host %s carries it now",
                        spanned.gateway,
                        bridge,
                        spanned.holder,
                    )

    def remove_bridges(self, emptied: Emptied) -> None:
        """Remove the bridges of networks that lost their last lease (unless a VM took an
        address there meanwhile). In a cluster, the bridge that carries the gateway of a network
        that remains (the default one) stays: the network's gateway is recorded as this host's,
        so no other host's bridge would carry it."""
        if self.keep_bridges:
            return
        for network_id, bridge in emptied:
            with self.lock:
                if self._leased(network_id):
                    continue
                if not self._keeps_gateway(bridge):
                    self._remove_bridge(bridge)

    def _keeps_gateway(self, bridge: str) -> bool:
        """Whether `bridge` carries the gateway of a cluster network that records it as this
        host's (it stays while the network exists: no other host's bridge would carry it)."""
        return self.gateways is not None and self.gateways.recorded_here(bridge)

    def _remove_bridge(self, bridge: str) -> None:
        self._bridges_ready.discard(bridge)
        if self.nat is not None:
            self.nat.remove(bridge)
        if self.adverts is not None:
            self.adverts.stop(bridge)
        self.links.delete(bridge)

    def reap(self, keep_taps: Callable[[], set[str]], used_bridges: Callable[[], set[str]]) -> None:
        """Remove taps (and their rules) other than `keep_taps()`, and managed bridges other
        than `used_bridges()`: what a crash left behind. Both are asked under the bridge lock,
        under which a start makes its tap only once its record (`starting`, with its taps) has
        committed."""
        with self.lock:
            keep, used = keep_taps(), used_bridges()
            for tap in self.links.names(alloc.TAP_PREFIX):
                if tap not in keep:
                    self.release(tap)
                    log.info("removed tap %s, which no running VM uses", tap)
            for bridge in [
                *self.links.names(alloc.BRIDGE_PREFIX),
                *self.links.names(DEFAULT_BRIDGE),
            ]:
                if bridge not in used and not self._keeps_gateway(bridge):
                    self._remove_bridge(bridge)
                    log.info("removed bridge %s, on which no VM holds an address", bridge)

    def reconcile_nat(self, networks: Callable[[], Mapping[str, ipaddress.IPv4Network]]) -> None:
        """With --nat, masquerade exactly the managed networks (`networks()`: bridge → subnet;
        on-demand and named, never an external one) whose bridge exists: what a crash, or a
        run without --nat, left wrong is made right."""
        if self.nat is None:
            return
        with self.lock:
            present = {*self.links.names(alloc.BRIDGE_PREFIX), *self.links.names(DEFAULT_BRIDGE)}
            managed = networks()
            present |= {bridge for bridge in managed if self.links.info(bridge) is not None}
            self.nat.reconcile(
                {bridge: subnet for bridge, subnet in managed.items() if bridge in present}
            )


def _bridge_mac() -> str:
    """A random locally administered unicast MAC for a bridge that no longer carries a
    gateway (0a:, unlike guests' 02:, gateways' 06: and taps' fe:)."""
    return ":".join(["0a", *(f"{byte:02x}" for byte in secrets.token_bytes(5))])


def _no_network(name: str) -> None:
    """Attaching taps compiles no policy, so it looks up no `@network`."""
    return None
