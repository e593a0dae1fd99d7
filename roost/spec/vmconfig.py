"""A VM's own configuration: which plugin, and what it overrides of the plugin's defaults."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, model_validator

from roost.errors import ErrorDetail, InvalidError
from roost.spec.common import (
    BootArgs,
    LabelChanges,
    Labels,
    Name,
    ResourcesOverride,
    Spec,
    VMMKind,
)
from roost.spec.interfaces import BOTH_FORMS, InterfaceConfig, Interfaces, interfaces_errors
from roost.spec.network import NetworkConfig, network_errors

# 0xFFFFFFFF is VMADDR_PORT_ANY, which no listener can be bound to; ports are unsigned 32-bit.
MIN_VSOCK_PORT, MAX_VSOCK_PORT = 1, 0xFFFFFFFE
# each service is a listening socket the daemon holds while the VM runs
MAX_VSOCK_SERVICES = 64
# a Unix socket's address holds 108 bytes, the terminating NUL included
MAX_UNIX_PATH = 107
_PORT_TEXT = re.compile(r"[1-9][0-9]{0,9}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
TARGET_FORMS = "unix:///absolute/path or tcp://host:port"


@dataclass(frozen=True)
class UnixService:
    """A guest-initiated connection's destination: a Unix socket on the host."""

    path: str


@dataclass(frozen=True)
class TCPService:
    """A guest-initiated connection's destination: a TCP address the host can reach."""

    host: str
    port: int


ServiceTarget = UnixService | TCPService


def service_target(text: str) -> ServiceTarget:
    """A `vsock_services` target as the relay dials it; ValueError says what is wrong."""
    if text.startswith("unix://"):
        path = text.removeprefix("unix://")
        if not path.startswith("/"):
            raise ValueError(
                f"{text!r}: the socket path must be absolute, e.g. unix:///run/svc.sock "
                "(three slashes)"
            )
        if "\x00" in path:
            raise ValueError(f"{text!r}: the socket path must not contain NUL characters")
        if len(path.encode()) > MAX_UNIX_PATH:
            raise ValueError(
                f"the socket path is {len(path.encode())} bytes long; a Unix socket's path is "
                f"limited to {MAX_UNIX_PATH} bytes"
            )
        return UnixService(path)
    if text.startswith("tcp://"):
        return _tcp_target(text, text.removeprefix("tcp://"))
    raise ValueError(f"{text!r} is not a service target; use {TARGET_FORMS}")


def _tcp_target(text: str, rest: str) -> TCPService:
    if rest.startswith("["):
        host, bracket, port = rest[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise ValueError(f"{text!r}: write an IPv6 address as tcp://[::1]:port")
        port = port[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            raise ValueError(f"{text!r} needs a host and a port, e.g. tcp://127.0.0.1:8080")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{text!r}: {host!r} is not a host name or IPv4 address")
    if not _PORT_TEXT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the TCP port must be a whole number from 1 to 65535")
    return TCPService(host, int(port))


def _vsock_port(key: Any) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        port = key
    elif isinstance(key, str) and _PORT_TEXT.fullmatch(key):
        port = int(key)
    else:
        raise ValueError(
            f"{key!r} is not a vsock port: use a whole number from {MIN_VSOCK_PORT} to "
            f"{MAX_VSOCK_PORT}"
        )
    if not MIN_VSOCK_PORT <= port <= MAX_VSOCK_PORT:
        raise ValueError(
            f"vsock port {port} is out of range: use {MIN_VSOCK_PORT} to {MAX_VSOCK_PORT}"
        )
    return port


def _vsock_services(value: Any) -> dict[int, str]:
    """Guest ports (JSON keys are strings) mapped to their targets, every problem reported at
    `vsock_services.<port>` (InvalidError, since pydantic would address a bad key elsewhere)."""
    if not isinstance(value, dict):
        raise InvalidError.at(
            "vsock_services", f"must be a JSON object mapping guest ports to {TARGET_FORMS}"
        )
    if len(value) > MAX_VSOCK_SERVICES:
        raise InvalidError.at(
            "vsock_services",
            f"has {len(value)} services; at most {MAX_VSOCK_SERVICES} are allowed",
        )
    services: dict[int, str] = {}
    errors = []
    for key, target in value.items():
        loc = f"vsock_services.{key}"
        try:
            port = _vsock_port(key)
            if not isinstance(target, str):
                raise ValueError(f"must be a string, {TARGET_FORMS}")
            service_target(target)
        except ValueError as error:
            errors.append(ErrorDetail(loc, str(error)))
            continue
        if (
            port in services
        ):  # {"80": ..., "080": ...} cannot happen (no leading zeros); 80 and "80" can
            errors.append(ErrorDetail(loc, f"port {port} is given twice"))
        services[port] = target
    if errors:
        raise InvalidError.of(errors)
    return dict(sorted(services.items()))


VsockServices = Annotated[
    dict[int, str],
    BeforeValidator(_vsock_services),
    Field(
        description=(
            "Host services the guest may connect to: the guest dials the host (CID 2) on the "
            "key's vsock port and roost relays the connection to the target, "
            f"{TARGET_FORMS}. Listened on while the VM runs."
        ),
        json_schema_extra={"propertyNames": {"pattern": "^[1-9][0-9]{0,9}$"}},
    ),
]


def _check_override(
    network: NetworkConfig | None, interfaces: list[InterfaceConfig] | None
) -> None:
    """What can be judged of a VM's network override before it meets the plugin's (its
    interfaces inherit nothing: all of their rules but the registry's)."""
    errors = [] if network is None else network_errors(network, "vm")
    if interfaces is not None:
        if network is not None:
            errors.append(ErrorDetail("interfaces", BOTH_FORMS))
        errors += interfaces_errors(interfaces, "vm")
    if errors:
        raise InvalidError.of(errors)


class VMConfig(Spec):
    """What an operator chose for one VM; unset fields fall back to the plugin's."""

    plugin: Name
    resources: ResourcesOverride = ResourcesOverride()
    boot_args: BootArgs | None = None
    network: NetworkConfig | None = None
    labels: Labels = Field(default_factory=dict)
    vmm: VMMKind | None = None
    # an empty map is left out of the stored JSON: configs written before the field existed
    # compare equal to the same config written now
    vsock_services: VsockServices = Field(default_factory=dict, exclude_if=lambda v: not v)
    # left out of the stored JSON when unset, as vsock_services (`[]` is kept: vsock-only)
    interfaces: Interfaces | None = Field(default=None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _rules(self) -> Self:
        _check_override(self.network, self.interfaces)
        return self


# each form of a VM's network, and the one setting it clears
NETWORK_FORMS = {"network": "interfaces", "interfaces": "network"}


class VMConfigPatch(Spec):
    """A change to a VM's config: an absent member is unchanged, `null` returns to the plugin's
    default, `resources` merges per field, `labels` per key (a key set to null is removed;
    `labels: null` removes them all), `network`, `interfaces` and `vsock_services` are
    replaced as a whole. `network` and `interfaces` are two forms of one thing: a patch that
    carries either (`null` included) clears the other."""

    resources: ResourcesOverride | None = None
    boot_args: BootArgs | None = None
    network: NetworkConfig | None = None
    labels: LabelChanges | None = None
    vmm: VMMKind | None = None
    vsock_services: VsockServices | None = None
    interfaces: Interfaces | None = None

    @model_validator(mode="after")
    def _rules(self) -> Self:
        _check_override(self.network, self.interfaces)
        return self

    def apply(self, config: VMConfig) -> VMConfig:
        """The config this patch turns `config` into (validated again as a whole)."""
        data = config.model_dump(exclude_none=True)
        for field, value in self.model_dump(include=self.model_fields_set).items():
            if field == "resources" and self.resources is not None:
                named = self.resources.model_fields_set
                data["resources"] = {**data["resources"], **{k: value[k] for k in named}}
            elif field == "labels" and value is not None:
                merged = {**data.get("labels", {}), **value}
                data["labels"] = {key: text for key, text in merged.items() if text is not None}
            elif value is None:
                data.pop(field, None)
            else:
                data[field] = value
            if field in NETWORK_FORMS:
                data.pop(NETWORK_FORMS[field], None)
        return VMConfig.model_validate(data)
