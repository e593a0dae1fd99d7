"""Resolution (plugin default + VM override + daemon default → effective network) and the
network plan (what must exist on the host for a VM). All per-mode decisions live here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from roost.errors import ErrorDetail, InvalidError
from roost.spec.manifest import Manifest
from roost.spec.network import NetworkConfig, NetworkMode, first_host, network_errors, parse_subnet
from roost.spec.vmconfig import VMConfig

DEFAULT_SUBNET = "10.57.0.0/24"


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
    EXTERNAL = "external"  # the operator's bridge with a DHCP server behind it (--dhcp-bridge)
    NONE = "none"


class AntiSpoof(StrEnum):
    """What a tap may send: roost only polices what it assigned."""

    IP_AND_MAC = "ip_and_mac"
    MAC = "mac"
    NONE = "none"


@dataclass(frozen=True)
class DefaultNetwork:
    """The daemon's own network, used by bridged VMs that name no subnet."""

    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address

    @classmethod
    def from_cidr(cls, cidr: str = DEFAULT_SUBNET) -> DefaultNetwork:
        try:
            subnet = parse_subnet(cidr)
        except ValueError as error:
            raise InvalidError.at("default_subnet", str(error)) from None
        return cls(subnet, first_host(subnet))


@dataclass(frozen=True)
class EffectiveNetwork:
    """A VM's network after resolution; fields that do not apply to the mode are None.

    `auto_assign` is true exactly when roost picks the address; `ip` is the address when it is
    known (a manual one, or an allocated one once `with_ip` has filled it in).
    """

    mode: NetworkMode
    source: Source
    subnet: ipaddress.IPv4Network | None = None
    gateway: ipaddress.IPv4Address | None = None
    auto_assign: bool | None = None
    ip: ipaddress.IPv4Address | None = None

    def with_ip(self, ip: ipaddress.IPv4Address) -> EffectiveNetwork:
        return EffectiveNetwork(
            self.mode, self.source, self.subnet, self.gateway, self.auto_assign, ip
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EffectiveNetwork:
        """The inverse of `to_json` (a network recorded by this daemon, so trusted)."""

        def optional(key: str, kind: Any) -> Any:
            value = data.get(key)
            return None if value is None else kind(value)

        return cls(
            NetworkMode(data["mode"]),
            Source(data["source"]),
            optional("subnet", ipaddress.IPv4Network),
            optional("gateway", ipaddress.IPv4Address),
            data.get("auto_assign"),
            optional("ip", ipaddress.IPv4Address),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "source": self.source.value,
            "subnet": None if self.subnet is None else str(self.subnet),
            "gateway": None if self.gateway is None else str(self.gateway),
            "auto_assign": self.auto_assign,
            "ip": None if self.ip is None else str(self.ip),
        }


def _merge(plugin: NetworkConfig | None, vm: NetworkConfig, mode: NetworkMode) -> NetworkConfig:
    """The VM's override on top of the plugin's network, following the inheritance rules."""
    if plugin is None or plugin.mode is not mode or vm.subnet is not None:
        return vm.model_copy(update={"mode": mode})
    inherited = plugin.model_dump(exclude_none=True)
    inherited.update(vm.model_dump(exclude_none=True))
    inherited["mode"] = mode
    return NetworkConfig.model_validate(inherited)


def resolve_network(
    manifest: Manifest, vm_config: VMConfig | None, default: DefaultNetwork
) -> EffectiveNetwork:
    """The VM's effective network: its override over the plugin's default over the daemon's.

    Raises `InvalidError` (locs under `network.`) when the result breaks a rule.
    """
    override = vm_config.network if vm_config is not None else None
    plugin = manifest.network
    plugin_mode = plugin.mode if plugin is not None and plugin.mode else NetworkMode.BRIDGED
    if override is not None:
        source, merged = Source.VM, _merge(plugin, override, override.mode or plugin_mode)
    elif plugin is not None:
        source, merged = Source.PLUGIN, plugin
    else:
        source, merged = Source.DEFAULT, NetworkConfig(mode=NetworkMode.BRIDGED)
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

    if mode is not NetworkMode.BRIDGED:
        return EffectiveNetwork(mode, source)
    subnet = merged.subnet_net or default.subnet
    gateway = merged.gateway_addr or (first_host(subnet) if merged.subnet_net else default.gateway)
    ip = merged.ip_addr
    return EffectiveNetwork(mode, source, subnet, gateway, ip is None, ip)


@dataclass(frozen=True)
class NetworkPlan:
    """What must exist for a VM's network; later layers read these fields, never the mode.

    - `tap`/`attach`: whether the VM gets a tap, and on which kind of bridge.
    - `ipam`: who picks the address.
    - `nic`: whether the VMM gets a network interface; `vsock`: every VM has a vsock device.
    - `kernel_ip_arg`: the guest's `ip=` boot argument (None for bridged auto until allocated).
    - `observe_ip`: the host learns the guest's address by watching it (dhcp).
    - `antispoof`: what the tap is allowed to send.
    """

    tap: bool
    attach: Attachment
    ipam: IPAM
    nic: bool
    vsock: bool
    kernel_ip_arg: str | None
    observe_ip: bool
    antispoof: AntiSpoof

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
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "tap": self.tap,
            "ipam": self.ipam.value,
            "nic": self.nic,
            "vsock": self.vsock,
            "kernel_ip_arg": self.kernel_ip_arg,
            "attach": self.attach.value,
            "observe_ip": self.observe_ip,
            "antispoof": self.antispoof.value,
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
    assert effective.subnet is not None and effective.gateway is not None
    arg = None
    if effective.ip is not None:
        arg = kernel_ip_arg(effective.ip, effective.gateway, effective.subnet, vm_name)
    return NetworkPlan(
        tap=True,
        attach=Attachment.MANAGED,
        ipam=IPAM.AUTO if effective.auto_assign else IPAM.MANUAL,
        nic=True,
        vsock=True,
        kernel_ip_arg=arg,
        observe_ip=False,
        antispoof=AntiSpoof.IP_AND_MAC,
    )
