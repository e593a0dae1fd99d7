"""Resolution (plugin default + VM override + daemon default → effective network) and the
network plan (what must exist on the host for a VM). All per-mode decisions live here."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from roost.defaults import DEFAULT_SUBNET as DEFAULT_SUBNET  # noqa: PLC0414 (a re-export)
from roost.errors import ErrorDetail, InvalidError
from roost.plan.registry import DHCP_NETWORK, NetworkKind, NetworkLookup, RegisteredNetwork
from roost.spec.cni import CniIP, CniResult, parse_result
from roost.spec.manifest import Manifest
from roost.spec.network import (
    NetworkConfig,
    NetworkMode,
    check_inside,
    check_ip_not_gateway,
    first_host,
    network_errors,
    parse_subnet,
)
from roost.spec.policy import PolicyDefaults
from roost.spec.vmconfig import VMConfig


class Source(StrEnum):
    """Where a VM's effective network came from."""

    VM = "vm"
    PLUGIN = "plugin"
    DEFAULT = "default"


class IPAM(StrEnum):
    """Who picks a VM's address: roost from the subnet, the operator, or nobody (roost)."""

    AUTO = "auto"
    MANUAL = "manual"
    NONE = "none"


class Attachment(StrEnum):
    """Which kind of bridge a VM's tap joins."""

    MANAGED = "managed"  # a bridge roost creates for the subnet and owns
    EXTERNAL = "external"  # the operator's bridge (--dhcp-bridge, `network create --external`)
    CNI = "cni"  # no bridge of roost's: joined to the link CNI plugins made, in the VM's netns
    NONE = "none"


class AntiSpoof(StrEnum):
    """What a tap may send: roost only polices what it assigned."""

    IP_AND_MAC = "ip_and_mac"
    MAC = "mac"
    NONE = "none"


# A cluster's networks span hosts over VXLAN, which takes 50 bytes of a 1500-byte underlay's
# frames (inner Ethernet 14, VXLAN 8, UDP 8, outer IPv4 20): guests, taps and bridges use 1450.
OVERLAY_MTU = 1450


@dataclass(frozen=True)
class DefaultNetwork:
    """The daemon's own network, used by bridged VMs that name no subnet. `mtu` is that of
    the networks roost makes by itself (this one and those a subnet in a config makes): the
    overlay's in a cluster, None (the kernel's default) on a single host."""

    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    mtu: int | None = None

    @classmethod
    def from_cidr(cls, cidr: str = DEFAULT_SUBNET, *, cluster: bool = False) -> DefaultNetwork:
        try:
            subnet = parse_subnet(cidr)
        except ValueError as error:
            raise InvalidError.at("default_subnet", str(error)) from None
        return cls(subnet, first_host(subnet), OVERLAY_MTU if cluster else None)


@dataclass(frozen=True)
class CniNetwork:
    """The CNI side of a cni network: the CNI `network` it names (a registered cni network,
    else a conflist's `name` in the daemon's conf dir: the daemon decides), what its plugins
    are given, and what ADD answered at the VM's last start (`result`, None before; `interface`
    is the index in it of the interface the VM's tap is joined to)."""

    network: str
    args: Mapping[str, str] = field(default_factory=dict, hash=False)
    capability_args: Mapping[str, Any] = field(default_factory=dict, hash=False)
    result: CniResult | None = field(default=None, hash=False)
    interface: int | None = None

    @property
    def mac(self) -> str | None:
        """The MAC of the plugins' interface, which the guest's NIC takes (None before ADD)."""
        if self.result is None or self.interface is None:
            return None
        return self.result.interfaces[self.interface].mac or None

    @property
    def mtu(self) -> int | None:
        if self.result is None or self.interface is None:
            return None
        return self.result.interfaces[self.interface].mtu

    @property
    def ips(self) -> tuple[CniIP, ...]:
        """Every address the result gives the interface, IPv4 and IPv6, in its order."""
        if self.result is None or self.interface is None:
            return ()
        return tuple(self.result.ips_of(self.interface))

    def with_result(self, result: CniResult, interface: int) -> CniNetwork:
        if not 0 <= interface < len(result.interfaces):
            raise ValueError(f"the CNI result has no interface {interface}")
        return replace(self, result=result, interface=interface)

    def addresses_json(self) -> list[str] | None:
        """Its addresses as `address/prefix` strings, None before ADD."""
        return None if self.result is None else [str(ip.address) for ip in self.ips]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CniNetwork:
        result = data.get("result")
        return cls(
            data["network"],
            dict(data.get("args") or {}),
            dict(data.get("capability_args") or {}),
            None if result is None else parse_result(result),
            data.get("interface"),
        )

    def to_json(self) -> dict[str, Any]:
        """`network`, `args` and `capability_args` where given, `result` (null before ADD)
        and `interface` with it."""
        data: dict[str, Any] = {"network": self.network}
        if self.args:
            data["args"] = dict(self.args)
        if self.capability_args:
            data["capability_args"] = dict(self.capability_args)
        data["result"] = None if self.result is None else self.result.to_json()
        if self.result is not None:
            data["interface"] = self.interface
        return data


@functools.lru_cache(maxsize=4096)
def _subnet(text: str) -> ipaddress.IPv4Network:
    """A recorded subnet, parsed once: a host's VMs share a few, and a listing of 10,000 VMs
    would parse each thousands of times (the objects are immutable, so sharing them is safe)."""
    return ipaddress.IPv4Network(text)


@functools.lru_cache(maxsize=4096)
def _gateway(text: str) -> ipaddress.IPv4Address:
    """A recorded gateway, parsed once (as `_subnet`)."""
    return ipaddress.IPv4Address(text)


@dataclass(frozen=True)
class EffectiveNetwork:
    """A VM's network after resolution; fields that do not apply to the mode are None.

    `auto_assign` is true exactly when roost picks the address; `ip` is the address when it is
    known (a manual one, or an allocated one once `with_ip` has filled it in). `network` is the
    registered network the config named (None for a subnet, the default network, or a dhcp VM
    on `--dhcp-bridge`), `external` whether that network's bridge is the operator's. A named
    network planned without a lookup (offline) has no subnet: the daemon resolves it.
    `policies` are the stored policies enforced on its tap, `policy_defaults` what traffic
    none of their rules decides gets (None: allow both ways). `cni` is a cni network's CNI
    side (None in every other mode). `mtu` is a bridged network's where it has one (a
    cluster's), which its guest, tap and bridge use.
    """

    mode: NetworkMode
    source: Source
    subnet: ipaddress.IPv4Network | None = None
    gateway: ipaddress.IPv4Address | None = None
    auto_assign: bool | None = None
    ip: ipaddress.IPv4Address | None = None
    network: str | None = None
    external: bool = False
    policies: tuple[str, ...] = ()
    policy_defaults: PolicyDefaults | None = None
    cni: CniNetwork | None = None
    mtu: int | None = None

    @property
    def on_network(self) -> str | None:
        """The registered network it is on, by name: the one it names, `dhcp` for a dhcp one
        that names none; None for a subnet or the daemon's default network."""
        if self.network is not None:
            return self.network
        return DHCP_NETWORK if self.mode is NetworkMode.DHCP else None

    def with_ip(self, ip: ipaddress.IPv4Address) -> EffectiveNetwork:
        return replace(self, ip=ip)

    def with_cni_result(self, result: CniResult, interface: int) -> EffectiveNetwork:
        """A cni network once ADD answered `result`, whose interface `interface` (an index in
        `result.interfaces`) the VM's tap is joined to."""
        assert self.cni is not None, "only a cni network has a CNI result"
        return replace(self, cni=self.cni.with_result(result, interface))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EffectiveNetwork:
        """The inverse of `to_json` (a network recorded by this daemon, so trusted)."""

        def optional(key: str, kind: Any) -> Any:
            value = data.get(key)
            return None if value is None else kind(value)

        defaults = data.get("policy_defaults")
        cni = data.get("cni")

        return cls(
            NetworkMode(data["mode"]),
            Source(data["source"]),
            optional("subnet", _subnet),
            optional("gateway", _gateway),
            data.get("auto_assign"),
            optional("ip", ipaddress.IPv4Address),
            data.get("network"),
            bool(data.get("external", False)),
            tuple(data.get("policies") or ()),
            None if defaults is None else PolicyDefaults.model_validate(defaults),
            None if cni is None else CniNetwork.from_json(cni),
            data.get("mtu"),
        )

    def to_json(self) -> dict[str, Any]:
        """Its JSON; `network` and `external` only where a network was named, `policies`,
        `policy_defaults` and `mtu` only where set, so every config without them reads (and is
        stored) exactly as before they existed."""
        named: dict[str, Any] = {}
        if self.network is not None:
            named = {"network": self.network, "external": self.external}
        return {
            "mode": self.mode.value,
            "source": self.source.value,
            "subnet": None if self.subnet is None else str(self.subnet),
            "gateway": None if self.gateway is None else str(self.gateway),
            "auto_assign": self.auto_assign,
            "ip": None if self.ip is None else str(self.ip),
            **named,
            **self.policies_json(),
            **self.cni_json(),
            **({} if self.mtu is None else {"mtu": self.mtu}),
        }

    def cni_json(self) -> dict[str, Any]:
        """A cni network's `cni` and `addresses` (null before ADD); nothing in other modes."""
        if self.cni is None:
            return {}
        return {"cni": self.cni.to_json(), "addresses": self.cni.addresses_json()}

    def policies_json(self) -> dict[str, Any]:
        """`policies` and `policy_defaults`, each only where set."""
        data: dict[str, Any] = {}
        if self.policies:
            data["policies"] = list(self.policies)
        if self.policy_defaults is not None:
            data["policy_defaults"] = self.policy_defaults.model_dump(mode="json")
        return data


def _merge(plugin: NetworkConfig | None, vm: NetworkConfig, mode: NetworkMode) -> NetworkConfig:
    """The VM's override on top of the plugin's network, following the inheritance rules."""
    own = vm.subnet is not None or vm.network is not None
    if plugin is None or plugin.mode is not mode or own:
        return vm.model_copy(update={"mode": mode})
    inherited = plugin.model_dump(exclude_none=True)
    inherited.update(vm.model_dump(exclude_none=True))
    inherited["mode"] = mode
    return NetworkConfig.model_validate(inherited)


def resolve_network(
    manifest: Manifest,
    vm_config: VMConfig | None,
    default: DefaultNetwork,
    lookup: NetworkLookup | None = None,
) -> EffectiveNetwork:
    """The VM's effective network: its override over the plugin's default over the daemon's.
    A named network is found through `lookup` (None offline: left for the daemon to resolve).

    Raises `InvalidError` (locs under `network.`) when the result breaks a rule.
    """
    merged, source = _merged(manifest, vm_config)
    effective = _resolve(manifest, merged, source, default, lookup)
    return replace(
        effective,
        policies=tuple(merged.policies or ()),
        policy_defaults=merged.policy_defaults,
    )


def _merged(manifest: Manifest, vm_config: VMConfig | None) -> tuple[NetworkConfig, Source]:
    """The network as written once the VM's override meets the plugin's default (or the
    daemon's default network, when neither has one), and where it came from."""
    override = vm_config.network if vm_config is not None else None
    plugin = manifest.network
    plugin_mode = plugin.mode if plugin is not None and plugin.mode else NetworkMode.BRIDGED
    if override is not None:
        source, merged = Source.VM, _merge(plugin, override, override.mode or plugin_mode)
    elif plugin is not None:
        source, merged = Source.PLUGIN, plugin
    else:
        source, merged = Source.DEFAULT, NetworkConfig(mode=NetworkMode.BRIDGED)
    return merged, source


def _resolve(
    manifest: Manifest,
    merged: NetworkConfig,
    source: Source,
    default: DefaultNetwork,
    lookup: NetworkLookup | None,
) -> EffectiveNetwork:
    """The effective network of `merged` judged by every rule, its policies left for
    `resolve_network` to carry over."""
    mode = merged.mode
    assert mode is not None

    errors: list[ErrorDetail] = []
    if not manifest.allows(mode):
        allowed = ", ".join(manifest.allowed_network_modes or ())
        errors.append(
            ErrorDetail(
                "network.mode",
                f"plugin {manifest.name} does not allow {mode} mode; allowed: {allowed}",
            )
        )
    errors += network_errors(merged, "effective", default_subnet=str(default.subnet))
    if errors:
        raise InvalidError.of(errors)

    if merged.network is not None:
        return _named(merged, mode, source, lookup)
    if mode is NetworkMode.CNI:
        assert merged.cni is not None  # network_errors requires it
        settings = merged.cni
        cni = CniNetwork(settings.network, settings.args, settings.capability_args)
        return EffectiveNetwork(mode, source, cni=cni)
    if mode is not NetworkMode.BRIDGED:
        return EffectiveNetwork(mode, source)
    subnet = merged.subnet_net or default.subnet
    gateway = merged.gateway_addr or (first_host(subnet) if merged.subnet_net else default.gateway)
    ip = merged.ip_addr
    return EffectiveNetwork(mode, source, subnet, gateway, ip is None, ip, mtu=default.mtu)


def _named(
    merged: NetworkConfig, mode: NetworkMode, source: Source, lookup: NetworkLookup | None
) -> EffectiveNetwork:
    """A network that names a registered one: bridged VMs take their subnet and gateway from
    it (a managed network, or an external one registered with a subnet, where roost assigns
    addresses but never touches the bridge); dhcp VMs need an external one (a DHCP server
    behind the operator's bridge)."""
    name = merged.network
    assert name is not None
    ip = merged.ip_addr
    auto = ip is None if mode is NetworkMode.BRIDGED else None
    if lookup is None:
        return EffectiveNetwork(mode, source, auto_assign=auto, ip=ip, network=name)
    found = lookup(name)
    if found is None:
        raise InvalidError.at(
            "network.network",
            f"no network named {name!r} is registered; roost network list shows those that "
            f"are, roost network create {name} makes one",
        )
    if found.kind is NetworkKind.CNI:
        raise InvalidError.at(
            "network.network",
            f"network {name!r} is a CNI network, which has no bridge for a {mode} tap; name it "
            f'in cni mode instead: {{"mode": "cni", "cni": {{"network": "{name}"}}}}',
        )
    if mode is NetworkMode.DHCP:
        if found.managed:
            raise InvalidError.at(
                "network.network",
                f"network {name!r} is managed by roost, which runs no DHCP server on it; "
                "a dhcp VM needs an external network (network create --external)",
            )
        return EffectiveNetwork(mode, source, network=name, external=True)
    return _bridged_on(found, merged, source)


def _bridged_on(
    found: RegisteredNetwork, merged: NetworkConfig, source: Source
) -> EffectiveNetwork:
    if found.subnet is None or found.gateway is None:
        raise InvalidError.at(
            "network.network",
            f"network {found.name!r} is external with no subnet, so roost has no address to "
            "give a bridged VM on it; use dhcp mode, or register it with --subnet",
        )
    errors: list[ErrorDetail] = []

    def err(field: str | None, msg: str) -> None:
        errors.append(ErrorDetail(f"network.{field}" if field else "network", msg))

    note = f" (network {found.name!r})"
    check_inside(err, "ip", merged.ip_addr, found.subnet, note)
    check_ip_not_gateway(err, merged.ip_addr, found.gateway)
    if merged.ip is None and merged.auto_assign is False:
        err(None, f"a bridged network on network {found.name!r} needs an ip or auto_assign: true")
    if errors:
        raise InvalidError.of(errors)
    ip = merged.ip_addr
    return EffectiveNetwork(
        NetworkMode.BRIDGED,
        source,
        found.subnet,
        found.gateway,
        ip is None,
        ip,
        network=found.name,
        external=not found.managed,
        mtu=found.mtu,
    )


@dataclass(frozen=True)
class NetworkPlan:
    """What must exist for a VM's network; later layers read these fields, never the mode.

    - `tap`/`attach`: whether the VM gets a tap, and on which kind of bridge.
    - `ipam`: who picks the address.
    - `nic`: whether the VMM gets a network interface; `vsock`: every VM has a vsock device.
    - `kernel_ip_arg`: the guest's `ip=` boot argument (None for bridged auto until allocated).
    - `observe_ip`: the host learns the guest's address by watching it (dhcp).
    - `antispoof`: what the tap is allowed to send.
    - `netns`: the VMM runs in the VM's own network namespace (`roost-vm-<name>`), where its
      tap is made and joined to the link CNI plugins made there.
    """

    tap: bool
    attach: Attachment
    ipam: IPAM
    nic: bool
    vsock: bool
    kernel_ip_arg: str | None
    observe_ip: bool
    antispoof: AntiSpoof
    netns: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkPlan:
        """The inverse of `to_json`."""
        return cls(
            tap=bool(data["tap"]),
            attach=Attachment(data["attach"]),
            ipam=IPAM(data["ipam"]),
            nic=bool(data["nic"]),
            vsock=bool(data["vsock"]),
            kernel_ip_arg=data.get("kernel_ip_arg"),
            observe_ip=bool(data["observe_ip"]),
            antispoof=AntiSpoof(data["antispoof"]),
            netns=bool(data.get("netns", False)),
        )

    def to_json(self) -> dict[str, Any]:
        """Its JSON; `netns` only where true, so plans of the other modes read as before."""
        netns = {"netns": True} if self.netns else {}
        return {
            "tap": self.tap,
            "ipam": self.ipam.value,
            "nic": self.nic,
            "vsock": self.vsock,
            "kernel_ip_arg": self.kernel_ip_arg,
            "attach": self.attach.value,
            "observe_ip": self.observe_ip,
            "antispoof": self.antispoof.value,
            **netns,
        }


def kernel_ip_arg(
    ip: ipaddress.IPv4Address,
    gateway: ipaddress.IPv4Address,
    subnet: ipaddress.IPv4Network,
    hostname: str,
) -> str:
    """The kernel's static `ip=` syntax (Documentation/admin-guide/nfs/nfsroot.rst)."""
    return f"ip={ip}::{gateway}:{subnet.netmask}:{hostname}:eth0:off"


def plan_network(effective: EffectiveNetwork, vm_name: str) -> NetworkPlan:
    """What the host must provide for `effective`; pass it again with the allocated address
    (`effective.with_ip`) to get the bridged auto-assign `kernel_ip_arg`."""
    if effective.mode is NetworkMode.VSOCK:
        return NetworkPlan(
            tap=False,
            attach=Attachment.NONE,
            ipam=IPAM.NONE,
            nic=False,
            vsock=True,
            kernel_ip_arg=None,
            observe_ip=False,
            antispoof=AntiSpoof.NONE,
        )
    if effective.mode is NetworkMode.CNI:
        return NetworkPlan(
            tap=True,
            attach=Attachment.CNI,
            ipam=IPAM.NONE,
            nic=True,
            vsock=True,
            kernel_ip_arg=_cni_kernel_ip_arg(effective, vm_name),
            observe_ip=False,
            antispoof=AntiSpoof.NONE,
            netns=True,
        )
    if effective.mode is NetworkMode.DHCP:
        return NetworkPlan(
            tap=True,
            attach=Attachment.EXTERNAL,
            ipam=IPAM.NONE,
            nic=True,
            vsock=True,
            kernel_ip_arg="ip=dhcp",
            observe_ip=True,
            antispoof=AntiSpoof.MAC,
        )
    arg = None
    if effective.ip is not None and effective.subnet is not None:
        assert effective.gateway is not None
        arg = kernel_ip_arg(effective.ip, effective.gateway, effective.subnet, vm_name)
    return NetworkPlan(
        tap=True,
        attach=Attachment.EXTERNAL if effective.external else Attachment.MANAGED,
        ipam=IPAM.AUTO if effective.auto_assign else IPAM.MANUAL,
        nic=True,
        vsock=True,
        kernel_ip_arg=arg,
        observe_ip=False,
        antispoof=AntiSpoof.IP_AND_MAC,
    )


def _cni_kernel_ip_arg(effective: EffectiveNetwork, vm_name: str) -> str | None:
    """The classic `ip=` of a cni network once ADD has answered: its first IPv4 address, with
    that address's gateway (None before ADD, or without either)."""
    assert effective.cni is not None
    first = next(
        (ip for ip in effective.cni.ips if isinstance(ip.address, ipaddress.IPv4Interface)), None
    )
    if first is None or not isinstance(first.gateway, ipaddress.IPv4Address):
        return None
    assert isinstance(first.address, ipaddress.IPv4Interface)
    return kernel_ip_arg(first.address.ip, first.gateway, first.address.network, vm_name)
