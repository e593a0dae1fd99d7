"""The network part of the spec: the three modes and the rules that tie their fields together.

Field formats are checked by pydantic (so their errors carry the field's own `loc`); the rules
that relate fields, and that depend on where a network is written (a plugin's default, a VM's
override, or the effective network after resolution), live in `network_errors`, written once.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from roost.errors import ErrorDetail, InvalidError
from roost.spec.cni import CNI_NAME
from roost.spec.common import DNS_LABEL, Name
from roost.spec.parse import details_of
from roost.spec.policy import PolicyDefaults

MIN_PREFIX = 8
MAX_PREFIX = 30
PREFIX_LENGTH = re.compile(r"0|[1-9][0-9]*")  # ASCII digits, no leading zero
# Ranges a VM network may not overlap: configured on a bridge, each would route (or claim) what
# the host needs for something else.
RESERVED_RANGES = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "'this network' range"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback range"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local range"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast range"),
    (
        ipaddress.IPv4Network("240.0.0.0/4"),
        "reserved range (with the limited broadcast address 255.255.255.255)",
    ),
)
PRIVATE_RANGES_TEXT = "10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
# Every policy attached to a tap is walked for each new connection it sees, and a tap's set of
# policies is one shared nftables chain per distinct set: 16 names cover layered policies (a
# base, a role, an exception) without making each tap a long walk.
MAX_POLICIES = 16
POLICY_FIELDS = ("policies", "policy_defaults")


class NetworkMode(StrEnum):
    """How a VM is networked."""

    VSOCK = "vsock"
    BRIDGED = "bridged"
    DHCP = "dhcp"
    CNI = "cni"  # a CNI network's plugins make its link and give its addresses


MODES_TEXT = ", ".join(m.value for m in NetworkMode)
BRIDGED_ONLY_FIELDS = ("subnet", "gateway", "ip")
# what a cni network leaves to its plugins (its link, its addresses), so may not say
NOT_FOR_CNI = ("network", "subnet", "gateway", "auto_assign", "ip")
MAX_CNI_NAME = 128
# CNI_ARGS entries (K=V;...) a cni network passes to its plugins
MAX_CNI_ARGS = 32


def parse_mode(value: Any) -> NetworkMode:
    """A mode written any way a human might (` Bridged `) as its canonical value."""
    if isinstance(value, NetworkMode):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a string, one of {MODES_TEXT}")
    text = value.strip().lower()
    try:
        return NetworkMode(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a network mode; use one of {MODES_TEXT}") from None


ModeName = Annotated[NetworkMode, BeforeValidator(parse_mode)]


def parse_subnet(value: Any) -> ipaddress.IPv4Network:
    """A strict IPv4 CIDR between /8 and /30 (a prefix length, not a netmask) that overlaps no
    reserved range, with a suggestion where one helps."""
    if not isinstance(value, str):
        raise ValueError("must be a string CIDR such as 10.100.0.0/24")
    text = value.strip()
    if "/" not in text:
        raise ValueError(f"{text!r} is not a CIDR; write it with a prefix, e.g. {text}/24")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR such as 10.100.0.0/24") from None
    if network.version == 6:
        raise ValueError(f"{text}: IPv6 is not supported yet; use an IPv4 CIDR")
    address, _, prefix = text.partition("/")
    if not PREFIX_LENGTH.fullmatch(prefix):
        problem = "has a leading zero" if prefix.isascii() and prefix.isdigit() else "is a mask"
        raise ValueError(
            f"{text}: /{prefix} {problem}; write the prefix length, {address}/{network.prefixlen}"
        )
    assert isinstance(network, ipaddress.IPv4Network)
    if ipaddress.ip_interface(text).ip != network.network_address:
        raise ValueError(f"{text} has host bits set; did you mean {network}?")
    if not MIN_PREFIX <= network.prefixlen <= MAX_PREFIX:
        raise ValueError(
            f"{network}: prefix /{network.prefixlen} is out of range; use /{MIN_PREFIX} to "
            f"/{MAX_PREFIX}"
        )
    for reserved, what in RESERVED_RANGES:
        if network.overlaps(reserved):
            raise ValueError(
                f"{network} overlaps {reserved}, the {what}, which a VM network cannot use; "
                f"choose a private range such as {PRIVATE_RANGES_TEXT}"
            )
    return network


def parse_address(value: Any) -> ipaddress.IPv4Address:
    """A plain IPv4 address (no prefix)."""
    if not isinstance(value, str):
        raise ValueError("must be a string IPv4 address such as 10.100.0.7")
    text = value.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 address such as 10.100.0.7") from None
    if address.version == 6:
        raise ValueError(f"{text}: IPv6 is not supported yet; use an IPv4 address")
    assert isinstance(address, ipaddress.IPv4Address)
    return address


def parse_network_name(value: Any) -> str:
    """A registered network's name as a config names it: a DNS label, like a VM's."""
    if not isinstance(value, str):
        raise ValueError("must be a string naming a registered network (roost network list)")
    text = value.strip()
    if not DNS_LABEL.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a network name: a DNS label of 1-63 characters, lower-case "
            "letters, digits and '-' (roost network list shows the registered ones)"
        )
    return text


def _policy_count(value: Any) -> Any:
    # before pydantic reads the names: a thousand are refused without reading them
    if isinstance(value, list) and len(value) > MAX_POLICIES:
        raise ValueError(
            f"names {len(value)} policies; an interface may have at most {MAX_POLICIES}: "
            "merge some into one policy"
        )
    return value


PolicyNames = Annotated[list[Name], BeforeValidator(_policy_count)]


def parse_cni_network_name(value: Any) -> str:
    """The CNI network a cni network attaches to: a registered cni network's name, or the
    `name` of a conflist in the daemon's conf dir (the CNI spec's rule for that name)."""
    if not isinstance(value, str):
        raise ValueError(
            "must be a string naming a CNI network (roost network list, or a conflist)"
        )
    text = value.strip()
    if not CNI_NAME.fullmatch(text) or len(text) > MAX_CNI_NAME:
        raise ValueError(
            f"{text!r} is not a CNI network name: up to {MAX_CNI_NAME} letters, digits, '_', "
            "'.' and '-', starting with a letter or digit (a roost network's name, or the name "
            "field of a conflist in the daemon's --cni-conf-dir)"
        )
    return text


def _cni_args(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) > MAX_CNI_ARGS:
            raise ValueError(f"has {len(value)} entries; at most {MAX_CNI_ARGS} are allowed")
        for key, text in value.items():
            if not isinstance(key, str) or not key or any(c in key for c in "=;\0"):
                raise ValueError(
                    f"key {key!r}: keys are non-empty, without '=', ';' or NUL (CNI_ARGS is "
                    "K1=V1;K2=V2)"
                )
            if isinstance(text, str) and (";" in text or "\0" in text):
                raise ValueError(
                    f"{key}: {text!r} has a ';' or a NUL, which CNI_ARGS (an environment "
                    "variable) cannot carry"
                )
    return value


class CniSettings(BaseModel):
    """How a cni network is attached: the CNI `network` it names, the `args` its plugins get
    as CNI_ARGS and the `capability_args` they get as runtimeConfig (each by the capability a
    plugin declares, e.g. portMappings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    network: Annotated[str, BeforeValidator(parse_cni_network_name)]
    args: Annotated[dict[str, str], BeforeValidator(_cni_args)] = Field(default_factory=dict)
    capability_args: dict[str, Any] = Field(default_factory=dict)


def first_host(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The gateway a subnet gets when none is named: its first host address."""
    return subnet.network_address + 1


class NetworkConfig(BaseModel):
    """A network as written in a manifest (the plugin's default) or a VM config (an override).

    Every field may be unset; unset (`None`) is different from `false` for `auto_assign`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: ModeName | None = None
    subnet: str | None = None
    gateway: str | None = None
    auto_assign: bool | None = None
    ip: str | None = None
    # a registered network (`roost network create`), in place of subnet and gateway
    network: str | None = None
    # the names of stored policies (`roost policy create`) enforced on the tap, and what
    # traffic none of their rules decides gets (unset: allow both ways)
    policies: PolicyNames | None = None
    policy_defaults: PolicyDefaults | None = None
    # cni mode only: the CNI network its plugins attach it to
    cni: CniSettings | None = None

    @field_validator("subnet", mode="before")
    @classmethod
    def _subnet(cls, value: Any) -> str | None:
        return None if value is None else str(parse_subnet(value))

    @field_validator("gateway", "ip", mode="before")
    @classmethod
    def _address(cls, value: Any) -> str | None:
        return None if value is None else str(parse_address(value))

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, value: Any) -> str | None:
        return None if value is None else parse_network_name(value)

    @field_validator("auto_assign", mode="before")
    @classmethod
    def _strict_bool(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value

    @property
    def subnet_net(self) -> ipaddress.IPv4Network | None:
        return None if self.subnet is None else ipaddress.IPv4Network(self.subnet)

    @property
    def gateway_addr(self) -> ipaddress.IPv4Address | None:
        return None if self.gateway is None else ipaddress.IPv4Address(self.gateway)

    @property
    def ip_addr(self) -> ipaddress.IPv4Address | None:
        return None if self.ip is None else ipaddress.IPv4Address(self.ip)


Where = Literal["plugin", "vm", "effective"]
Report = Callable[[str | None, str], None]


def network_errors(
    net: NetworkConfig, where: Where, *, prefix: str = "network", default_subnet: str | None = None
) -> list[ErrorDetail]:
    """Every rule that relates a network's fields, for the place the network is written.

    - `plugin`: a manifest's default, checked as written (mode required, no `ip`).
    - `vm`: a VM's override as written; only what cannot change by inheritance is checked here
      (the rest is checked on the resolved network).
    - `effective`: the resolved network of a VM; `default_subnet` names the daemon's default
      network when the network has no subnet of its own.
    """
    errors: list[ErrorDetail] = []

    def err(field: str | None, msg: str) -> None:
        errors.append(ErrorDetail(f"{prefix}.{field}" if field else prefix, msg))

    errors += _policy_errors(net, prefix)
    if net.mode is None:
        if where == "plugin":
            err("mode", f"is required; use one of {MODES_TEXT}")
        return errors
    if net.mode is NetworkMode.CNI:
        return errors + _cni_errors(net, where, prefix)
    if net.cni is not None:
        err("cni", f"is only valid in cni mode, not in {net.mode} mode")

    if net.network is not None:
        if net.mode is NetworkMode.VSOCK:
            err("network", "names a network for a tap; a vsock VM has none, so drop it")
        if net.subnet is not None:
            err(
                "network",
                f"names network {net.network!r}, which has its own subnet; give network or "
                "subnet, not both",
            )
        elif net.gateway is not None:
            err("gateway", f"is network {net.network!r}'s own; drop it")

    if net.mode is not NetworkMode.BRIDGED:
        for field in BRIDGED_ONLY_FIELDS:
            if getattr(net, field) is not None:
                err(field, f"is only valid in bridged mode, not in {net.mode} mode")
        if net.auto_assign is True:
            err("auto_assign", f"is only valid in bridged mode, not in {net.mode} mode")
        return errors

    if where == "plugin" and net.ip is not None:
        err("ip", "is per-VM: a plugin serves many VMs, so set ip on a VM, not in the manifest")

    # A VM override without a subnet inherits the plugin's (same mode); judge it once resolved.
    # A named network's subnet is the registry's: resolution judges its address against it.
    complete = where != "vm" or net.subnet is not None
    if not complete or net.network is not None:
        return errors

    subnet = net.subnet_net
    if subnet is None:
        if net.gateway is not None:
            err("gateway", "needs a subnet; set network.subnet as well, or drop the gateway")
        if where == "effective" and default_subnet is not None:
            subnet = ipaddress.IPv4Network(default_subnet)
            check_inside(err, "ip", net.ip_addr, subnet, " (the daemon's default network)")
            check_ip_not_gateway(err, net.ip_addr, first_host(subnet))
        if where == "effective" and net.ip is None and net.auto_assign is False:
            err(None, "a bridged network needs an ip or auto_assign: true")
        return errors

    if net.gateway is None and net.auto_assign is not True:
        err(
            "gateway",
            f"bridged mode on subnet {subnet} needs a gateway or auto_assign: true",
        )
    check_inside(err, "gateway", net.gateway_addr, subnet)
    check_inside(err, "ip", net.ip_addr, subnet)
    gateway = net.gateway_addr or first_host(subnet)
    check_ip_not_gateway(err, net.ip_addr, gateway)
    if where == "effective" and net.ip is None and net.auto_assign is not True:
        err(None, f"a bridged network on subnet {subnet} needs an ip or auto_assign: true")
    return errors


def _policy_errors(net: NetworkConfig, prefix: str) -> list[ErrorDetail]:
    """Policies need a tap to be enforced on; each is named once."""
    errors: list[ErrorDetail] = []
    refused = {
        NetworkMode.VSOCK: "applies to a VM's tap; a vsock VM has none (no network traffic to "
        "police), so drop it",
        NetworkMode.CNI: "cannot apply to a cni network: its traffic never crosses a roost "
        "bridge (its plugins connect it), so drop it and police it in the CNI network",
    }
    why = refused.get(net.mode) if net.mode is not None else None
    for field in POLICY_FIELDS:
        if why is not None and getattr(net, field) is not None:
            errors.append(ErrorDetail(f"{prefix}.{field}", why))
    seen: set[str] = set()
    for index, name in enumerate(net.policies or ()):
        if name in seen:
            errors.append(
                ErrorDetail(
                    f"{prefix}.policies.{index}",
                    f"names policy {name!r} again; name each policy once",
                )
            )
        seen.add(name)
    return errors


def _cni_errors(net: NetworkConfig, where: Where, prefix: str) -> list[ErrorDetail]:
    """A cni network names its CNI network in `cni` (a VM's override may inherit it from the
    plugin) and nothing its plugins decide."""
    errors: list[ErrorDetail] = []
    for field in NOT_FOR_CNI:
        if getattr(net, field) is not None:
            hint = " (name the CNI network in cni.network)" if field == "network" else ""
            errors.append(
                ErrorDetail(
                    f"{prefix}.{field}",
                    "is not for cni mode: the CNI network's plugins make the link and give "
                    f"the addresses; drop it{hint}",
                )
            )
    if net.cni is None and where != "vm":
        errors.append(
            ErrorDetail(
                f"{prefix}.cni",
                'is required in cni mode: {"network": "<a cni network or conflist name>"}',
            )
        )
    return errors


def check_inside(
    err: Report,
    field: str,
    address: ipaddress.IPv4Address | None,
    subnet: ipaddress.IPv4Network,
    note: str = "",
) -> None:
    if address is None:
        return
    if address not in subnet:
        err(field, f"{address} is not inside subnet {subnet}{note}")
    elif address == subnet.network_address:
        err(field, f"{address} is the network address of {subnet}; use a host address")
    elif address == subnet.broadcast_address:
        err(field, f"{address} is the broadcast address of {subnet}; use a host address")


def check_ip_not_gateway(
    err: Report, ip: ipaddress.IPv4Address | None, gateway: ipaddress.IPv4Address
) -> None:
    if ip is not None and ip == gateway:
        err("ip", f"{ip} is the gateway's address; choose another")


def network_override(
    base: NetworkConfig | None,
    *,
    mode: str | None = None,
    subnet: str | None = None,
    gateway: str | None = None,
    auto_assign: bool | None = None,
    ip: str | None = None,
    policies: list[str] | None = None,
) -> NetworkConfig | None:
    """A VM's override built from command-line flags, the same way wherever they appear.

    Flags override `base` (e.g. a --config file's network) field by field (`policies` as a
    whole list); a `mode` starts a fresh override from the flags alone. Raises `InvalidError`
    with `network.*` locs.
    """
    flags = {
        "subnet": subnet,
        "gateway": gateway,
        "auto_assign": auto_assign,
        "ip": ip,
        "policies": policies,
    }
    given = {key: value for key, value in flags.items() if value is not None}
    if mode is not None:
        data: dict[str, Any] = {"mode": mode, **given}
    elif given:
        data = {**(base.model_dump(exclude_none=True) if base else {}), **given}
    else:
        return base
    return parse_network(data)


def parse_network(data: Any) -> NetworkConfig:
    """A network as written (field formats only), errors located under `network.`."""
    try:
        return NetworkConfig.model_validate(data)
    except ValidationError as error:
        raise InvalidError.of(
            [
                ErrorDetail("network" if d.loc == "-" else f"network.{d.loc}", d.msg)
                for d in details_of(error)
            ]
        ) from None
