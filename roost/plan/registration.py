"""Registering a network (`roost network create`, `POST /v1/networks`): the request, its
field formats and the rules that relate them. Pure: the daemon checks the host (does the bridge
exist, is it a bridge, does the subnet overlap another network) when it registers one. A cni
network is its conflist alone (`{"name", "cni": {...}}`): its plugins decide links and
addresses, so none of the bridge or subnet fields go with it."""

from __future__ import annotations

import ipaddress
import random
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from roost.errors import ErrorDetail, InvalidError
from roost.plan.ipv6 import parse_ipv6_prefix, random_ula_prefix
from roost.plan.registry import (
    RESERVED_BRIDGE_NAMES,
    RESERVED_BRIDGE_PREFIXES,
    RESERVED_NETWORK_NAMES,
    RESERVED_NETWORK_PREFIXES,
)
from roost.spec.cni import Conflist, parse_conflist
from roost.spec.network import (
    check_inside,
    first_host,
    parse_address,
    parse_network_name,
    parse_subnet,
)
from roost.spec.parse import details_of

AUTO_PREFIX = "auto"
# what a cni network has none of: its plugins make its links and give its addresses
NOT_FOR_CNI = ("subnet", "gateway", "bridge", "ipv6_prefix")
BRIDGE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def parse_bridge_name(value: Any) -> str:
    """An interface name the kernel takes (1-15 bytes of [A-Za-z0-9_.-], not `.` or `..`),
    none of the names roost gives its own links."""
    if not isinstance(value, str):
        raise ValueError("must be a string naming a bridge, such as br-lan2")
    if not BRIDGE_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"{value!r} is not an interface name: use 1-15 bytes of letters, digits, '_', '.' "
            "and '-', such as br-lan2"
        )
    if value in RESERVED_BRIDGE_NAMES or value.startswith(RESERVED_BRIDGE_PREFIXES):
        raise ValueError(
            f"{value} is a name roost gives its own links (roost0, rbr*, rtap*); choose another"
        )
    return value


def parse_prefix_or_auto(value: Any) -> str:
    """`auto` (any case) or a strict IPv6 /64 (`roost.plan.ipv6.parse_ipv6_prefix`)."""
    if isinstance(value, str) and value.strip().lower() == AUTO_PREFIX:
        return AUTO_PREFIX
    return str(parse_ipv6_prefix(value))


def random_prefix() -> str:
    """A random unique local /64, from the system's randomness (chosen once per network)."""
    return str(random_ula_prefix(random.SystemRandom()))


class NetworkCreate(BaseModel):
    """A network to register: a managed one (`subnet`, roost's bridge), an `external` one
    (the operator's `bridge`, optionally with the `subnet` behind it) or a `cni` one (its
    conflist, run by roost as a CNI runtime)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    subnet: str | None = None
    gateway: str | None = None
    bridge: str | None = None
    external: bool = False
    ipv6_prefix: str | None = None
    cni: Conflist | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> str:
        name = parse_network_name(value)
        if name in RESERVED_NETWORK_NAMES or name.startswith(RESERVED_NETWORK_PREFIXES):
            raise ValueError(
                f"{name} is a name roost gives its own networks (default, dhcp, net-*); "
                "choose another"
            )
        return name

    @field_validator("subnet", mode="before")
    @classmethod
    def _subnet(cls, value: Any) -> str | None:
        return None if value is None else str(parse_subnet(value))

    @field_validator("gateway", mode="before")
    @classmethod
    def _gateway(cls, value: Any) -> str | None:
        return None if value is None else str(parse_address(value))

    @field_validator("bridge", mode="before")
    @classmethod
    def _bridge(cls, value: Any) -> str | None:
        return None if value is None else parse_bridge_name(value)

    @field_validator("external", mode="before")
    @classmethod
    def _strict_bool(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value

    @field_validator("ipv6_prefix", mode="before")
    @classmethod
    def _ipv6_prefix(cls, value: Any) -> str | None:
        return None if value is None else parse_prefix_or_auto(value)

    @property
    def subnet_net(self) -> ipaddress.IPv4Network | None:
        return None if self.subnet is None else ipaddress.IPv4Network(self.subnet)

    @property
    def gateway_addr(self) -> ipaddress.IPv4Address | None:
        """The gateway given, else the subnet's first host (None without a subnet)."""
        if self.gateway is not None:
            return ipaddress.IPv4Address(self.gateway)
        subnet = self.subnet_net
        return None if subnet is None else first_host(subnet)


def parse_network_create(data: Any) -> NetworkCreate:
    """A network to register, with every rule relating its fields; `InvalidError` at the
    offending fields (a conflist's at `cni.<field>`)."""
    if not isinstance(data, dict):
        raise InvalidError.at("-", "must be a JSON object")
    if data.get("cni") is not None:
        return _parse_cni_network(data)
    try:
        request = NetworkCreate.model_validate(data)
    except ValidationError as error:
        raise InvalidError.of(details_of(error)) from None
    errors: list[ErrorDetail] = []

    def err(field: str | None, msg: str) -> None:
        errors.append(ErrorDetail(field or "-", msg))

    if request.external:
        if request.bridge is None:
            err("bridge", "is required for an external network: the operator's bridge")
        if request.ipv6_prefix is not None:
            err(
                "ipv6_prefix",
                "is only for a managed network: roost never changes an external bridge's addresses",
            )
    elif request.subnet is None:
        err("subnet", "is required for a managed network (or register an external bridge)")
    subnet = request.subnet_net
    if subnet is None:
        if request.gateway is not None:
            err("gateway", "needs a subnet; give the subnet as well, or drop the gateway")
    else:
        check_inside(err, "gateway", request.gateway_addr, subnet)
    if errors:
        raise InvalidError.of(errors)
    return request


def _parse_cni_network(data: dict[str, Any]) -> NetworkCreate:
    """A cni network: its name and its conflist (whose `name`, when it gives none, is the
    network's), with nothing of a bridge or a subnet."""
    rest = {key: value for key, value in data.items() if key != "cni"}
    errors: list[ErrorDetail] = []
    request: NetworkCreate | None = None
    try:
        request = NetworkCreate.model_validate(rest)
    except ValidationError as error:
        errors += details_of(error)
    for field in NOT_FOR_CNI:
        if rest.get(field) is not None:
            errors.append(
                ErrorDetail(
                    field,
                    "is not for a cni network: its conflist's plugins make its links and give "
                    "its addresses; drop it, or drop cni",
                )
            )
    if rest.get("external") is True:
        errors.append(
            ErrorDetail("external", "a network is external or cni, not both; drop one of them")
        )
    conflist = data["cni"]
    if isinstance(conflist, dict) and "name" not in conflist and isinstance(data.get("name"), str):
        conflist = {**conflist, "name": data["name"]}
    parsed: Conflist | None = None
    try:
        parsed = parse_conflist(conflist, loc="cni")
    except InvalidError as error:
        errors += error.details
    if errors or request is None or parsed is None:
        raise InvalidError.of(errors)
    return request.model_copy(update={"cni": parsed})
