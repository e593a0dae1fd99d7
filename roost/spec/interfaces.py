"""A VM's network interfaces (`interfaces`): the several-NIC counterpart of `network`.

An interface is a `network` (bridged or dhcp) plus what only a NIC among several has: the
guest's name for it, its MAC, a static IPv6 address and whether it carries the default route.
Every rule of `network` applies to each interface (through `network_errors`, with locs under
`interfaces.<i>`); the rules between interfaces of one list are `interfaces_errors`'.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from roost.errors import ErrorDetail
from roost.spec.common import Spec
from roost.spec.network import NetworkConfig, NetworkMode, Where, network_errors, parse_mode

# Each interface is a tap, an nftables chain and a lease on the host, and up to ~160 bytes of
# `roost.nic=` arguments (a static IPv4 and IPv6 address, gateway and name) on a guest command
# line the kernel cuts at 2,048 bytes (x86), where the plugin's and the VM's boot args also go.
# 8 covers a guest on several networks (a router, a multi-homed service) within that budget.
MAX_INTERFACES = 8
MAX_IFNAME = 15  # IFNAMSIZ less the terminating NUL
# Linux takes any byte but '/', ':' and whitespace; the name also travels in a comma- and
# '='-separated `roost.nic=` kernel argument, so roost keeps to the portable set.
IFNAME = re.compile(r"[A-Za-z0-9_.-]+")
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# roost.state.alloc gives each tap the guest's MAC with this first octet: a guest MAC starting
# with it would be its own tap's
TAP_MAC_OCTET = 0xFE
RESERVED_IPV6 = (
    (ipaddress.IPv6Network("::/128"), "the unspecified address"),
    (ipaddress.IPv6Network("::1/128"), "the loopback address"),
    (ipaddress.IPv6Network("fe80::/10"), "link-local (each interface has its own already)"),
    (ipaddress.IPv6Network("ff00::/8"), "multicast"),
    (ipaddress.IPv6Network("::ffff:0:0/96"), "an IPv4-mapped address"),
)
INTERFACE_MODES_TEXT = "bridged, dhcp or cni"
BOTH_FORMS = (
    "give network (one interface, or none for vsock) or interfaces (a list), not both; "
    "drop one of them"
)


def default_name(index: int) -> str:
    """The guest's name for interface `index` when the config gives none."""
    return f"eth{index}"


def parse_interface_mode(value: Any) -> NetworkMode:
    """`bridged` or `dhcp`, written as loosely as a network's mode; vsock is no interface."""
    mode = parse_mode(value)
    if mode is NetworkMode.VSOCK:
        raise ValueError(
            "vsock is no interface: leave this one out (interfaces: [] is a vsock-only VM); "
            f"an interface is {INTERFACE_MODES_TEXT}"
        )
    return mode


def parse_ifname(value: Any) -> str:
    """A guest interface name Linux accepts and the kernel arguments can carry."""
    if not isinstance(value, str):
        raise ValueError("must be a string such as eth1")
    size = len(value.encode())
    if not 1 <= size <= MAX_IFNAME:
        raise ValueError(f"{value!r} is {size} bytes; a Linux interface name has 1-{MAX_IFNAME}")
    if not IFNAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"{value!r} is not an interface name: use letters, digits, '_', '.' and '-' "
            "(not '.' or '..' alone), e.g. eth1 or lan"
        )
    if value == "lo":
        raise ValueError("lo is the guest's loopback interface; name this one e.g. eth1 or lan")
    if value in ("all", "default"):  # the kernel refuses them: each is a sysctl directory
        raise ValueError(
            f"{value} is /proc/sys/net/ipv4/conf/{value} in the guest, no interface's name; "
            "name this one e.g. eth1 or lan"
        )
    return value


def parse_mac(value: Any) -> str:
    """A locally administered unicast MAC, lower-case with colons."""
    if not isinstance(value, str):
        raise ValueError("must be a string MAC such as 02:00:00:00:01:05")
    text = value.strip().lower().replace("-", ":")
    if not MAC.fullmatch(text):
        raise ValueError(f"{value!r} is not a MAC address such as 02:00:00:00:01:05")
    first = int(text[:2], 16)
    if first & 0x01:
        raise ValueError(f"{text} is a multicast address; a NIC needs a unicast one (02:...)")
    if not first & 0x02:
        raise ValueError(
            f"{text} is a globally unique (vendor) address; use a locally administered one, "
            f"e.g. 02{text[2:]}"
        )
    if first == TAP_MAC_OCTET:
        raise ValueError(
            f"{text}: roost gives the host side of each tap a MAC starting with fe; use another "
            f"first octet, e.g. 02{text[2:]}"
        )
    return text


def parse_static_ipv6(value: Any) -> str:
    """A guest's static IPv6 address (no length), compressed; that it is inside its network's
    prefix is judged once the network is resolved."""
    if not isinstance(value, str):
        raise ValueError("must be a string IPv6 address such as fd12:3456:789a:1::10")
    text = value.strip()
    if "/" in text:
        raise ValueError(f"{text!r}: write the address alone, without a prefix length")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv6 address such as fd12:3456:789a:1::10") from None
    if not isinstance(address, ipaddress.IPv6Address):
        raise ValueError(f"{text} is an IPv4 address; give that as ip, and an IPv6 one here")
    for reserved, what in RESERVED_IPV6:
        if address in reserved:
            raise ValueError(f"{address} is {what}, which cannot be a guest's static address")
    return str(address)


class IPv6Static(Spec):
    """A static IPv6 address for an interface (else the guest takes one by SLAAC where its
    network has a prefix)."""

    ip: str

    @field_validator("ip", mode="before")
    @classmethod
    def _ip(cls, value: Any) -> str:
        return parse_static_ipv6(value)


def _ipv6_object(value: Any) -> Any:
    # the short form "fd00::5" means {"ip": "fd00::5"}
    return {"ip": value} if isinstance(value, str) else value


def _ipv6_schema(schema: dict[str, Any]) -> None:
    schema["anyOf"].insert(0, {"type": "string", "description": 'short for {"ip": ...}'})


def _strict_bool(value: Any) -> Any:
    if value is not None and not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


InterfaceMode = Annotated[
    NetworkMode,
    BeforeValidator(parse_interface_mode),
    WithJsonSchema(
        {"type": "string", "enum": [NetworkMode.BRIDGED, NetworkMode.DHCP, NetworkMode.CNI]}
    ),
]


class InterfaceConfig(NetworkConfig):
    """One interface of a VM, in the guest's device order: a network (bridged, dhcp or cni;
    every rule of `network` applies) with the guest's `name` for it (default `eth<index>`), its
    `mac` (default roost's), a static `ipv6` address and whether it carries the default route
    (default: the first interface does)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    mode: InterfaceMode  # required here, and never vsock
    mac: str | None = None
    ipv6: Annotated[
        IPv6Static | None,
        BeforeValidator(_ipv6_object),
        Field(json_schema_extra=_ipv6_schema),
    ] = None
    default_route: Annotated[bool | None, BeforeValidator(_strict_bool)] = None

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> str | None:
        return None if value is None else parse_ifname(value)

    @field_validator("mac", mode="before")
    @classmethod
    def _mac(cls, value: Any) -> str | None:
        return None if value is None else parse_mac(value)

    def guest_name(self, index: int) -> str:
        return self.name if self.name is not None else default_name(index)

    def as_network(self) -> NetworkConfig:
        """The `network` this interface is, without what only an interface has."""
        return NetworkConfig.model_construct(
            **{field: getattr(self, field) for field in NetworkConfig.model_fields}
        )


def _count(value: Any) -> Any:
    # before pydantic reads the members: a thousand interfaces are refused without reading them
    if isinstance(value, list) and len(value) > MAX_INTERFACES:
        raise ValueError(
            f"has {len(value)} interfaces; a VM may have at most {MAX_INTERFACES} (each is a "
            "tap and guest command-line arguments)"
        )
    return value


Interfaces = Annotated[
    list[InterfaceConfig],
    BeforeValidator(_count),
    Field(
        max_length=MAX_INTERFACES,
        description=(
            "The VM's network interfaces in the guest's device order, in place of `network` "
            "([] is vsock-only). Each is bridged or dhcp, on a subnet, a registered network "
            "(`network`) or the daemon's default."
        ),
    ),
]


def network_key(interface: NetworkConfig) -> tuple[str, str]:
    """Which network an interface is on, as written: a named one, a subnet, a CNI network, or
    (named by none) the `dhcp` network for dhcp and the daemon's `default` one for bridged."""
    if interface.mode is NetworkMode.CNI:
        return "cni", "" if interface.cni is None else interface.cni.network
    if interface.network is not None:
        return "network", interface.network
    if interface.subnet is not None:
        return "subnet", interface.subnet
    return "network", "dhcp" if interface.mode is NetworkMode.DHCP else "default"


def interface_errors(interface: InterfaceConfig, where: Where, prefix: str) -> list[ErrorDetail]:
    """One interface's rules: those of `network`, and those of the fields only it has. A VM's
    interface inherits nothing, so it is judged as complete (as an effective network, but for
    what depends on the daemon's default network and the registry)."""
    as_network: Where = "plugin" if where == "plugin" else "effective"
    errors = network_errors(interface, as_network, prefix=prefix)
    if interface.ipv6 is not None and interface.mode is not NetworkMode.BRIDGED:
        why = {
            NetworkMode.DHCP: "a dhcp interface takes what its network's routers advertise",
            NetworkMode.CNI: "a cni interface takes every address its CNI plugins give",
        }
        errors.append(
            ErrorDetail(
                f"{prefix}.ipv6",
                f"is only valid in bridged mode, not in {interface.mode} mode "
                f"({why.get(interface.mode, '')})",
            )
        )
    if interface.mac is not None and interface.mode is NetworkMode.CNI:
        errors.append(
            ErrorDetail(
                f"{prefix}.mac",
                "is not for cni mode: the guest takes the MAC of the interface the CNI "
                "plugins make; drop it",
            )
        )
    if where == "plugin":
        if (
            interface.mode is NetworkMode.BRIDGED
            and interface.gateway is not None
            and interface.auto_assign is not True
        ):
            errors.append(
                ErrorDetail(
                    f"{prefix}.auto_assign",
                    "must be true for a plugin's interface on a subnet: a VM cannot add an ip "
                    "to it (a VM's interfaces replace the plugin's as a whole)",
                )
            )
        for field, what in (("mac", "MAC"), ("ipv6", "static IPv6 address")):
            if getattr(interface, field) is not None:
                errors.append(
                    ErrorDetail(
                        f"{prefix}.{field}",
                        f"is per-VM: every VM of the plugin would get the same {what}; set "
                        "it in a VM's interfaces, not in the manifest",
                    )
                )
    return errors


def interfaces_errors(interfaces: Sequence[InterfaceConfig], where: Where) -> list[ErrorDetail]:
    """Every rule of a list of interfaces: each interface's own, then those between them (a
    network, a name or a MAC used twice; the default route on more than one, or on none)."""
    errors: list[ErrorDetail] = []
    for index, interface in enumerate(interfaces):
        errors += interface_errors(interface, where, f"interfaces.{index}")
    errors += _clashes(
        [(_written_network(i), _network_field(i)) for i in interfaces], _network_text, "network"
    )
    errors += _cni_mix_errors(interfaces)
    names = [(iface.guest_name(index), "name") for index, iface in enumerate(interfaces)]
    errors += _clashes(names, lambda name: f"the guest name {name!r}", "name")
    errors += _clashes([(i.mac, "mac") for i in interfaces], lambda mac: f"MAC {mac}", "MAC")
    errors += _default_route_errors(interfaces)
    return errors


def _written_network(interface: InterfaceConfig) -> tuple[str, str] | None:
    """`network_key`, None for a cni interface without its (required) `cni`."""
    if interface.mode is NetworkMode.CNI and interface.cni is None:
        return None
    return network_key(interface)


def _network_field(interface: InterfaceConfig) -> str:
    if interface.mode is NetworkMode.CNI:
        return "cni.network"
    return "subnet" if interface.subnet and not interface.network else "network"


def _cni_mix_errors(interfaces: Sequence[InterfaceConfig]) -> list[ErrorDetail]:
    """A VM's cni interfaces and its bridged or dhcp ones cannot mix: the VMM of a VM with a
    cni interface runs inside the VM's own network namespace, where no roost bridge is."""
    cni = [i for i, iface in enumerate(interfaces) if iface.mode is NetworkMode.CNI]
    if not cni:
        return []
    return [
        ErrorDetail(
            f"interfaces.{index}.mode",
            f"is {iface.mode}, but interface {cni[0]} is cni: a VM with a cni interface runs "
            "in its own network namespace, where no roost bridge is, so all of its interfaces "
            "must be cni (a CNI network with the bridge plugin gives a bridge)",
        )
        for index, iface in enumerate(interfaces)
        if iface.mode is not NetworkMode.CNI
    ]


def _network_text(key: tuple[str, str]) -> str:
    kind, value = key
    if kind == "subnet":
        return f"subnet {value}"
    if kind == "cni":
        return f"CNI network {value!r}"
    if value == "default":
        return "the daemon's default network (no subnet or network given)"
    return f"network {value!r}"


def _clashes(
    keys: Sequence[tuple[Any, str]], say: Callable[[Any], str], what: str
) -> list[ErrorDetail]:
    """An error at each interface whose key (None: none) an earlier one already has."""
    errors: list[ErrorDetail] = []
    first: dict[Any, int] = {}
    for index, (key, field) in enumerate(keys):
        if key is None:
            continue
        if key in first:
            errors.append(
                ErrorDetail(
                    f"interfaces.{index}.{field}",
                    f"is {say(key)}, like interface {first[key]}'s; each interface of a VM "
                    f"needs its own {what}",
                )
            )
        else:
            first[key] = index
    return errors


def _default_route_errors(interfaces: Sequence[InterfaceConfig]) -> list[ErrorDetail]:
    carriers = [i for i, iface in enumerate(interfaces) if iface.default_route is True]
    errors = [
        ErrorDetail(
            f"interfaces.{index}.default_route",
            f"interface {carriers[0]} already carries the default route; only one can",
        )
        for index in carriers[1:]
    ]
    if interfaces and all(iface.default_route is False for iface in interfaces):
        errors.append(
            ErrorDetail(
                "interfaces.0.default_route",
                "every interface says false; one must carry the default route (by default the "
                "first): drop false from the one that should",
            )
        )
    return errors
