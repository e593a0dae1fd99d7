"""The guest's kernel arguments for its network interfaces, matched by MAC, never by order.

For a VM with several NICs the kernel's own `ip=` (one device, named by its order) cannot say
enough, so each interface gets `roost.nic=` arguments a guest's init can match to its device
by MAC address:

- `roost.nic=<mac>,<address>/<prefix>[,<gateway>][,name=<name>][,mtu=<n>]` for each static
  address, IPv4 or IPv6 (an interface with several has several; each family's gateway goes on
  its address, `name=` and `mtu=` on the interface's first argument);
- `roost.nic=<mac>,dhcp[,name=<name>][,mtu=<n>]` for an interface configured by DHCP;
- `roost.default=<mac>` for the one interface that carries the default route (IPv4 and IPv6;
  the guest ignores router-advertised default routes on the others);
- the classic `ip=` as well when the VM has one interface only and it is static, so guests
  that know nothing of `roost.nic=` keep working.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from roost.plan.network import kernel_ip_arg

MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# A Linux interface name (IFNAMSIZ - 1 bytes) that also fits between the commas of roost.nic=.
IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
MIN_MTU, MAX_MTU = 68, 65535


IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class GuestNIC:
    """What the guest must configure on one interface: its MAC (lower case, as Linux shows it),
    an optional new name and MTU, a static IPv4 address (with its gateway) or DHCP, an optional
    static IPv6 address (with its gateway), further static addresses of either family (`more`,
    each with its gateway or None: a CNI result may give several), and whether it carries the
    default route."""

    mac: str
    name: str | None = None
    ipv4: ipaddress.IPv4Interface | None = None
    gateway: ipaddress.IPv4Address | None = None
    dhcp: bool = False
    ipv6: ipaddress.IPv6Interface | None = None
    ipv6_gateway: ipaddress.IPv6Address | None = None
    default_route: bool = False
    mtu: int | None = None
    more: tuple[tuple[IPInterface, IPAddress | None], ...] = ()

    def __post_init__(self) -> None:
        if not MAC.fullmatch(self.mac):
            raise ValueError(f"MAC {self.mac!r} is not six lower-case hex pairs joined by ':'")
        if self.name is not None and (not IFNAME.fullmatch(self.name) or self.name in {".", ".."}):
            raise ValueError(
                f"interface name {self.name!r} is not 1-15 characters of [A-Za-z0-9_.-]"
            )
        if self.dhcp and self.ipv4 is not None:
            raise ValueError(f"interface {self.mac} cannot be both DHCP and static IPv4")
        if not self.dhcp and self.ipv4 is None and self.ipv6 is None and not self.more:
            raise ValueError(f"interface {self.mac} has no address: give ipv4, dhcp or ipv6")
        if self.gateway is not None and self.ipv4 is None:
            raise ValueError(f"interface {self.mac} has an IPv4 gateway but no static IPv4")
        if self.ipv6_gateway is not None and self.ipv6 is None:
            raise ValueError(f"interface {self.mac} has an IPv6 gateway but no static IPv6")
        if self.mtu is not None and not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"MTU {self.mtu} is not within {MIN_MTU}-{MAX_MTU}")


def nic_args(nics: tuple[GuestNIC, ...], hostname: str) -> tuple[str, ...]:
    """The kernel arguments that configure `nics` (the VM's interfaces, in its device order)
    in a guest named `hostname`: the classic `ip=` first (when it applies), then every
    interface's `roost.nic=`, then `roost.default=`."""
    macs = [nic.mac for nic in nics]
    if len(set(macs)) != len(macs):
        raise ValueError(f"two interfaces share a MAC: {', '.join(macs)}")
    names = [nic.name for nic in nics if nic.name is not None]
    if len(set(names)) != len(names):
        raise ValueError(f"two interfaces share a name: {', '.join(names)}")
    defaults = [nic.mac for nic in nics if nic.default_route]
    if len(defaults) > 1:
        raise ValueError(f"only one interface may carry the default route, not {defaults}")
    args: list[str] = []
    if len(nics) == 1 and (classic := _classic_ip(nics[0], hostname)) is not None:
        args.append(classic)
    for nic in nics:
        args += _interface_args(nic)
    args += [f"roost.default={mac}" for mac in defaults]
    return tuple(args)


def _classic_ip(nic: GuestNIC, hostname: str) -> str | None:
    """The kernel's `ip=` for a lone static interface (it needs a gateway)."""
    if nic.ipv4 is None or nic.gateway is None:
        return None
    return kernel_ip_arg(nic.ipv4.ip, nic.gateway, nic.ipv4.network, hostname)


def _interface_args(nic: GuestNIC) -> list[str]:
    """One `roost.nic=` per address (or one for DHCP), the name and MTU on the first."""
    how: list[str] = []
    if nic.dhcp:
        how.append("dhcp")
    addresses: list[tuple[IPInterface | None, IPAddress | None]] = [
        (nic.ipv4, nic.gateway),
        (nic.ipv6, nic.ipv6_gateway),
        *nic.more,
    ]
    for address, gateway in addresses:
        if address is not None:
            how.append(str(address) if gateway is None else f"{address},{gateway}")
    extras = [f"name={nic.name}"] if nic.name is not None else []
    extras += [f"mtu={nic.mtu}"] if nic.mtu is not None else []
    args = [f"roost.nic={nic.mac},{how[0]}", *(f"roost.nic={nic.mac},{rest}" for rest in how[1:])]
    args[0] = ",".join([args[0], *extras])
    return args
