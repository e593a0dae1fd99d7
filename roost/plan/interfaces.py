"""Resolution of a VM's interfaces: its `interfaces` (or `network`) over its plugin's, each
interface resolved and planned exactly as a single `network` is.

A VM's `interfaces` or `network` replaces its plugin's default as a whole; the same-mode field
inheritance stays with the single `network` form (`resolve_network`). Each interface of a list
is resolved by `resolve_network` as the only network of a plugin that has no other (so nothing
is inherited, the plugin's allowed modes still apply), and planned by `plan_network`: no mode
logic is written twice.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any

from roost.errors import ErrorDetail, InvalidError
from roost.plan.ipv6 import parse_ipv6_address, router_address, slaac_address
from roost.plan.network import (
    CniNetwork,
    DefaultNetwork,
    EffectiveNetwork,
    NetworkPlan,
    Source,
    plan_network,
    resolve_network,
)
from roost.plan.nic_args import GuestNIC, IPAddress, IPInterface, nic_args
from roost.plan.registry import DHCP_NETWORK, NetworkLookup
from roost.spec.cni import CniResult
from roost.spec.interfaces import InterfaceConfig, default_name
from roost.spec.manifest import Manifest
from roost.spec.network import NetworkMode
from roost.spec.policy import PolicyDefaults
from roost.spec.vmconfig import VMConfig


@dataclass(frozen=True)
class EffectiveInterface:
    """One interface after resolution, in the guest's device order.

    `effective` is its network as `resolve_network` makes it (what allocation and
    `plan_network` take) and `plan` what the host must provide for it. `mac` is the user's
    (None: roost picks one; once allocated, the guest's, `with_mac`), `ipv6` a static address
    (None: SLAAC where the network has an `ipv6_prefix`, else no IPv6), `default_route`
    whether it carries the default route (exactly one interface of a VM does). `unresolved`
    says why a named network is not resolved yet (offline planning), None once it is.
    """

    index: int
    name: str
    effective: EffectiveNetwork
    plan: NetworkPlan
    mac: str | None
    ipv6: ipaddress.IPv6Address | None
    ipv6_prefix: ipaddress.IPv6Network | None
    default_route: bool
    unresolved: str | None = None

    @property
    def mode(self) -> NetworkMode:
        return self.effective.mode

    @property
    def source(self) -> Source:
        return self.effective.source

    @property
    def network(self) -> str | None:
        """The registered network it is on, by name: the one it names, `dhcp` for a dhcp
        interface that names none; None for a subnet or the daemon's default network."""
        return self.effective.on_network

    @property
    def subnet(self) -> ipaddress.IPv4Network | None:
        return self.effective.subnet

    @property
    def gateway(self) -> ipaddress.IPv4Address | None:
        return self.effective.gateway

    @property
    def auto_assign(self) -> bool | None:
        return self.effective.auto_assign

    @property
    def ip(self) -> ipaddress.IPv4Address | None:
        return self.effective.ip

    @property
    def cni(self) -> CniNetwork | None:
        """A cni interface's CNI side (its result once its VM has started), else None."""
        return self.effective.cni

    @property
    def policies(self) -> tuple[str, ...]:
        return self.effective.policies

    @property
    def policy_defaults(self) -> PolicyDefaults | None:
        return self.effective.policy_defaults

    def with_ip(self, ip: ipaddress.IPv4Address, vm_name: str) -> EffectiveInterface:
        """The interface once allocation gave it `ip` (its plan's kernel `ip=` complete)."""
        effective = self.effective.with_ip(ip)
        return replace(self, effective=effective, plan=plan_network(effective, vm_name))

    def with_cni_result(
        self, result: CniResult, interface: int, vm_name: str
    ) -> EffectiveInterface:
        """A cni interface once ADD answered `result`: its tap joined to the result's interface
        `interface` (an index in `result.interfaces`), whose MAC its guest takes, and every
        address of that interface its guest's."""
        effective = self.effective.with_cni_result(result, interface)
        assert effective.cni is not None
        return replace(
            self,
            effective=effective,
            plan=plan_network(effective, vm_name),
            mac=effective.cni.mac or self.mac,
        )

    def with_mac(self, mac: str) -> EffectiveInterface:
        """The interface with the MAC its guest gets (the user's, else the one roost keeps for
        it), from which its SLAAC address follows."""
        return replace(self, mac=mac)

    @property
    def ipv6_address(self) -> ipaddress.IPv6Address | None:
        """The IPv6 address it holds: its static one, else the SLAAC one its MAC gives on a
        network with a prefix (None before roost has picked the MAC, or without a prefix)."""
        if self.ipv6_prefix is None:
            return None
        if self.ipv6 is not None:
            return self.ipv6
        return None if self.mac is None else slaac_address(self.ipv6_prefix, self.mac)

    def guest_nic(self) -> GuestNIC:
        """What its guest configures from `roost.nic=` (once its MAC and address are known)."""
        assert self.mac is not None, "the guest's MAC is known once allocation has picked it"
        if self.cni is not None:
            return self._cni_guest_nic(self.mac, self.cni)
        ipv4 = gateway = None
        if self.ip is not None and self.subnet is not None:
            ipv4 = ipaddress.IPv4Interface(f"{self.ip}/{self.subnet.prefixlen}")
            gateway = self.gateway
        ipv6 = ipv6_gateway = None
        if self.ipv6 is not None and self.ipv6_prefix is not None:
            ipv6 = ipaddress.IPv6Interface(f"{self.ipv6}/{self.ipv6_prefix.prefixlen}")
            ipv6_gateway = router_address(self.ipv6_prefix)
        return GuestNIC(
            mac=self.mac,
            name=self.name,
            ipv4=ipv4,
            gateway=gateway,
            dhcp=self.mode is NetworkMode.DHCP,
            ipv6=ipv6,
            ipv6_gateway=ipv6_gateway,
            default_route=self.default_route,
            mtu=self.effective.mtu,
        )

    def _cni_guest_nic(self, mac: str, cni: CniNetwork) -> GuestNIC:
        """Every address the CNI result gives, in its order: the first of each family as the
        NIC's IPv4 and IPv6, the others after them."""
        first: dict[int, tuple[IPInterface, IPAddress | None]] = {}
        more: list[tuple[IPInterface, IPAddress | None]] = []
        for ip in cni.ips:
            family = ip.address.version
            gateway = ip.gateway if ip.gateway is None or ip.gateway.version == family else None
            if family in first:
                more.append((ip.address, gateway))
            else:
                first[family] = (ip.address, gateway)
        ipv4, gateway4 = first.get(4, (None, None))
        ipv6, gateway6 = first.get(6, (None, None))
        assert ipv4 is None or isinstance(ipv4, ipaddress.IPv4Interface)
        assert gateway4 is None or isinstance(gateway4, ipaddress.IPv4Address)
        assert ipv6 is None or isinstance(ipv6, ipaddress.IPv6Interface)
        assert gateway6 is None or isinstance(gateway6, ipaddress.IPv6Address)
        return GuestNIC(
            mac=mac,
            name=self.name,
            ipv4=ipv4,
            gateway=gateway4,
            ipv6=ipv6,
            ipv6_gateway=gateway6,
            default_route=self.default_route,
            mtu=cni.mtu,
            more=tuple(more),
        )

    def ipv6_json(self) -> dict[str, Any] | None:
        """`{"ip", "prefix", "gateway", "source"}` where the interface has IPv6: its static
        address, else the SLAAC one (predicted from the user's MAC; null until roost has
        picked the MAC)."""
        if self.ipv6_prefix is None:
            return None
        ip = self.ipv6_address
        return {
            "ip": None if ip is None else str(ip),
            "prefix": str(self.ipv6_prefix),
            "gateway": str(router_address(self.ipv6_prefix)),
            "source": "static" if self.ipv6 is not None else "slaac",
        }

    def to_json(self) -> dict[str, Any]:
        """Every field the VM's JSON has for an interface at plan time, null when unused
        (`unresolved` only while a named network is; `policies` and `policy_defaults` only
        where set)."""
        data: dict[str, Any] = {
            "name": self.name,
            "mode": self.mode.value,
            "network": self.network,
            "subnet": None if self.subnet is None else str(self.subnet),
            "gateway": None if self.gateway is None else str(self.gateway),
            "auto_assign": self.auto_assign,
            "ip": None if self.ip is None else str(self.ip),
            "mac": self.mac,
            "ipv6": self.ipv6_json(),
            "default_route": self.default_route,
            **self.effective.policies_json(),
            **self.effective.cni_json(),
        }
        if self.unresolved is not None:
            data["unresolved"] = self.unresolved
        return data


@dataclass(frozen=True)
class ResolvedInterfaces:
    """A VM's interfaces after resolution. `single` is true for the `network` form and for a
    VM with no interface (vsock), whose guest is configured by the classic `ip=`; a list of
    interfaces is configured by `roost.nic=`. A VM with at most one interface keeps its
    `network` JSON, `network` here (None for several interfaces)."""

    single: bool
    network: EffectiveNetwork | None
    interfaces: tuple[EffectiveInterface, ...]

    def replaced(self, interfaces: tuple[EffectiveInterface, ...]) -> ResolvedInterfaces:
        """The same VM's interfaces once allocation has filled them in (addresses, MACs)."""
        network = self.network
        if len(interfaces) == 1:
            network = interfaces[0].effective
        return replace(self, network=network, interfaces=interfaces)

    @property
    def netns(self) -> bool:
        """Whether the VM's VMM runs in the VM's own network namespace (`roost-vm-<name>`)."""
        return any(interface.plan.netns for interface in self.interfaces)

    def boot_args(self, vm_name: str) -> str | None:
        """The guest's network arguments once allocated: the single form's `ip=` as ever, a
        list's `roost.nic=` (with `roost.default=`, and `ip=` for a lone static interface).
        A cni interface, single or not, gets `roost.nic=` for every address its CNI result
        gives: nothing before ADD has answered (a cni VM's arguments are made at each start),
        nor when the result gives it no address. The single form on a network with an MTU (a
        cluster's) gets `roost.nic=` too, which carries it."""
        sized = any(interface.effective.mtu is not None for interface in self.interfaces)
        if self.single and not self.netns and not sized:
            return self.interfaces[0].plan.kernel_ip_arg if self.interfaces else None
        guest = tuple(
            interface.guest_nic()
            for interface in self.interfaces
            if interface.cni is None or interface.cni.ips
        )
        return " ".join(nic_args(guest, vm_name)) or None

    @property
    def default_route(self) -> EffectiveInterface | None:
        """The interface that carries the default route (None without interfaces)."""
        return next((i for i in self.interfaces if i.default_route), None)

    def to_json(self) -> list[dict[str, Any]]:
        return [interface.to_json() for interface in self.interfaces]


def resolve_interfaces(
    manifest: Manifest,
    config: VMConfig | None,
    default: DefaultNetwork,
    lookup: NetworkLookup | None,
    *,
    vm_name: str,
) -> ResolvedInterfaces:
    """The VM's interfaces: its own `interfaces` or `network`, else its plugin's, else the
    daemon's default network. `lookup` finds the networks they name (None offline: each named
    network is left unresolved). `vm_name` is the guest's host name in a plan's `ip=`.

    Raises `InvalidError`, with locs under `interfaces.<i>` for a list and `network` for the
    single form.
    """
    if config is not None and config.interfaces is not None:
        return _resolve_list(manifest, config.interfaces, Source.VM, default, lookup, vm_name)
    if (config is None or config.network is None) and manifest.interfaces is not None:
        return _resolve_list(manifest, manifest.interfaces, Source.PLUGIN, default, lookup, vm_name)
    effective = resolve_network(manifest, config, default, lookup)
    if effective.mode is NetworkMode.VSOCK:
        return ResolvedInterfaces(single=True, network=effective, interfaces=())
    interface = EffectiveInterface(
        index=0,
        name=default_name(0),
        effective=effective,
        plan=plan_network(effective, vm_name),
        mac=None,
        ipv6=None,
        ipv6_prefix=_ipv6_prefix(effective, lookup),
        default_route=True,
        unresolved=_unresolved(effective, lookup),
    )
    return ResolvedInterfaces(single=True, network=effective, interfaces=(interface,))


def _resolve_list(
    manifest: Manifest,
    written: list[InterfaceConfig],
    source: Source,
    default: DefaultNetwork,
    lookup: NetworkLookup | None,
    vm_name: str,
) -> ResolvedInterfaces:
    if not written:
        if not manifest.allows(NetworkMode.VSOCK):
            allowed = ", ".join(manifest.allowed_network_modes or ())
            raise InvalidError.at(
                "interfaces",
                f"is empty, which is vsock-only, and plugin {manifest.name} does not allow "
                f"vsock mode; allowed: {allowed}",
            )
        vsock = EffectiveNetwork(NetworkMode.VSOCK, source)
        return ResolvedInterfaces(single=True, network=vsock, interfaces=())
    errors: list[ErrorDetail] = []
    resolved: list[tuple[InterfaceConfig, EffectiveNetwork]] = []
    for index, interface in enumerate(written):
        try:
            effective = _resolve_one(manifest, interface, source, default, lookup)
        except InvalidError as error:
            errors += [_under(detail, index) for detail in error.details]
            continue
        errors += _ipv6_errors(interface, effective, index, lookup)
        resolved.append((interface, effective))
    if not errors:
        errors += _same_network_errors([effective for _, effective in resolved])
    if errors:
        raise InvalidError.of(errors)
    carrier = _default_route_index(written)
    return ResolvedInterfaces(
        single=False,
        network=resolved[0][1] if len(resolved) == 1 else None,
        interfaces=tuple(
            EffectiveInterface(
                index=index,
                name=interface.guest_name(index),
                effective=effective,
                plan=plan_network(effective, vm_name),
                mac=interface.mac,
                ipv6=None if interface.ipv6 is None else ipaddress.IPv6Address(interface.ipv6.ip),
                ipv6_prefix=_ipv6_prefix(effective, lookup),
                default_route=index == carrier,
                unresolved=_unresolved(effective, lookup),
            )
            for index, (interface, effective) in enumerate(resolved)
        ),
    )


def _resolve_one(
    manifest: Manifest,
    interface: InterfaceConfig,
    source: Source,
    default: DefaultNetwork,
    lookup: NetworkLookup | None,
) -> EffectiveNetwork:
    """The interface resolved as the only network of its plugin (a VM's override of a plugin
    with none, or the plugin's own default): nothing inherited, the allowed modes kept."""
    alone = manifest.model_copy(update={"network": None, "interfaces": None})
    network = interface.as_network()
    if source is Source.PLUGIN:
        return resolve_network(alone.model_copy(update={"network": network}), None, default, lookup)
    config = VMConfig.model_construct(plugin=manifest.name, network=network)
    return resolve_network(alone, config, default, lookup)


def _under(detail: ErrorDetail, index: int) -> ErrorDetail:
    """An error `resolve_network` put under `network`, put under the interface."""
    head, dot, rest = detail.loc.partition(".")
    if head != "network":
        return detail
    return ErrorDetail(f"interfaces.{index}{dot}{rest}", detail.msg)


def _ipv6_prefix(
    effective: EffectiveNetwork, lookup: NetworkLookup | None
) -> ipaddress.IPv6Network | None:
    if effective.network is None or lookup is None:
        return None
    found = lookup(effective.network)
    return None if found is None else found.ipv6_prefix


def _unresolved(effective: EffectiveNetwork, lookup: NetworkLookup | None) -> str | None:
    if effective.network is None or lookup is not None:
        return None
    return f"network {effective.network}: resolved by the daemon"


def _ipv6_errors(
    interface: InterfaceConfig,
    effective: EffectiveNetwork,
    index: int,
    lookup: NetworkLookup | None,
) -> list[ErrorDetail]:
    """A static IPv6 address needs a named network with a prefix, and must be inside it."""
    if interface.ipv6 is None:
        return []
    loc = f"interfaces.{index}.ipv6"
    if effective.network is None:
        return [
            ErrorDetail(
                loc,
                "a static IPv6 address needs a registered network with an IPv6 prefix: name "
                "one in network (roost network create NAME --subnet CIDR --ipv6-prefix auto)",
            )
        ]
    if lookup is None:
        return []
    found = lookup(effective.network)
    if found is None:
        return []
    if found.ipv6_prefix is None:
        return [
            ErrorDetail(
                loc,
                f"network {found.name!r} has no IPv6 prefix, so no IPv6 address; drop ipv6 or "
                "use a network created with --ipv6-prefix",
            )
        ]
    try:
        parse_ipv6_address(interface.ipv6.ip, found.ipv6_prefix)
    except ValueError as error:
        return [ErrorDetail(loc, str(error))]
    return []


def _same_network_errors(resolved: list[EffectiveNetwork]) -> list[ErrorDetail]:
    """Two interfaces on one network once resolved (a name and a subnet may be one network;
    `interfaces_errors` already refused what is written twice)."""
    errors: list[ErrorDetail] = []
    first: dict[tuple[str, str], int] = {}
    for index, effective in enumerate(resolved):
        if effective.subnet is not None:
            key = ("subnet", str(effective.subnet))
        elif effective.cni is not None:
            key = ("cni", effective.cni.network)
        else:
            key = ("network", effective.network or DHCP_NETWORK)
        if key in first:
            field = "network" if effective.network is not None else "subnet"
            what = f"subnet {key[1]}" if key[0] == "subnet" else f"network {key[1]!r}"
            errors.append(
                ErrorDetail(
                    f"interfaces.{index}.{field}",
                    f"is on {what}, like interface {first[key]}; each interface of a VM needs "
                    "its own network",
                )
            )
        else:
            first[key] = index
    return errors


def _default_route_index(written: list[InterfaceConfig]) -> int:
    """The interface that says it carries the default route, else the first that does not
    refuse it (the spec refuses a list where every one does)."""
    for index, interface in enumerate(written):
        if interface.default_route is True:
            return index
    return next(i for i, interface in enumerate(written) if interface.default_route is not False)
