"""CNI documents: network configuration lists (what an operator writes), results and error
objects (what plugins answer), as the CNI spec 1.0 defines them.

A conflist is validated enough to run it safely (plugin types are binary names, never paths;
the fields roost sets at each call are refused) and otherwise passed to the plugins as
written: each plugin's own fields are its business. A result keeps every interface and every
IP, IPv4 and IPv6 alike; nothing a plugin reported is dropped.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from roost.errors import ErrorDetail, InvalidError
from roost.spec.parse import details_of

# The versions roost passes through to plugins; Debian's plugins (1.1.1) speak up to 1.0.0.
CNI_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
# CHECK exists from 0.4.0 on; older plugins do not know the command.
CHECK_SINCE = ("0.4.0", "1.0.0")
# The spec's rule for a network name, and the same shape for a plugin binary's name (no path).
CNI_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
# The spec's rule for CNI_CONTAINERID.
CONTAINER_ID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
# What roost writes into each plugin's configuration at every call.
RUNTIME_FIELDS = ("prevResult", "runtimeConfig")
MAX_PLUGINS = 32


def _version(value: Any) -> str:
    if value not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{value!r} is not a CNI version roost runs; use one of {', '.join(SUPPORTED_VERSIONS)}"
            f" ({CNI_VERSION} for the plugins installed here)"
        )
    return str(value)


class CniPlugin(BaseModel):
    """One plugin of a list: its `type` (the binary's name) and whatever fields it reads."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    capabilities: dict[str, bool] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _binary_name(cls, value: str) -> str:
        if not CNI_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a plugin name: the name of a binary in a CNI bin dir "
                "(letters, digits, '_', '.', '-'; no path)"
            )
        return value

    def fields(self) -> dict[str, Any]:
        """The plugin's configuration as written (without the fields roost sets per call)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class Conflist(BaseModel):
    """A network configuration list: plugins run in order for ADD, in reverse for DEL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cni_version: str = Field(alias="cniVersion")
    name: str
    plugins: list[CniPlugin] = Field(min_length=1, max_length=MAX_PLUGINS)
    disable_check: bool = Field(default=False, alias="disableCheck")
    # a 1.1 field, accepted so 1.1 lists load; roost runs no GC
    disable_gc: bool = Field(default=False, alias="disableGC")

    @field_validator("cni_version", mode="before")
    @classmethod
    def _supported(cls, value: Any) -> str:
        return _version(value)

    @field_validator("name")
    @classmethod
    def _network_name(cls, value: str) -> str:
        if not CNI_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a CNI network name: letters, digits, '_', '.' and '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("plugins", mode="before")
    @classmethod
    def _no_runtime_fields(cls, value: Any) -> Any:
        if isinstance(value, list):
            for index, plugin in enumerate(value):
                if isinstance(plugin, dict):
                    for field in RUNTIME_FIELDS:
                        if field in plugin:
                            raise ValueError(
                                f"plugins.{index}.{field} is set by roost at each call; "
                                "remove it from the list"
                            )
        return value

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def parse_conflist(data: Any, loc: str = "cni") -> Conflist:
    """A conflist (`plugins`) or a single-plugin conf (`type` at the top), as a `Conflist`;
    `InvalidError` with each problem under `loc` otherwise."""
    if not isinstance(data, dict):
        raise InvalidError.at(loc, "must be a JSON object: a CNI conflist")
    if "plugins" not in data and "type" in data:
        top = {key: data[key] for key in ("cniVersion", "name") if key in data}
        data = {**top, "plugins": [{k: v for k, v in data.items() if k not in top}]}
    try:
        return Conflist.model_validate(data)
    except ValidationError as error:
        raise InvalidError.of(
            [ErrorDetail(_under(loc, d.loc), d.msg) for d in details_of(error)]
        ) from None


def _under(loc: str, inner: str) -> str:
    if not loc or loc == "-":
        return inner
    return loc if inner == "-" else f"{loc}.{inner}"


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CniInterface(BaseModel):
    """An interface a plugin made: `sandbox` is the namespace path for one inside the VM's
    namespace, empty for one on the host (a bridge, a veth's host end)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    mac: str = ""
    mtu: int | None = None
    sandbox: str = ""


class CniIP(BaseModel):
    """One address (with its prefix); `interface` indexes the result's `interfaces`."""

    model_config = ConfigDict(extra="allow", frozen=True)

    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None


class CniRoute(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    dst: IPNetwork
    gw: IPAddress | None = None

    @field_validator("dst", mode="before")
    @classmethod
    def _loose_network(cls, value: Any) -> Any:
        # plugins write routes like 10.88.0.5/24 as well as 10.88.0.0/24
        if isinstance(value, str):
            return ipaddress.ip_network(value, strict=False)
        return value


class CniDNS(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    nameservers: list[str] = Field(default_factory=list)
    domain: str | None = None
    search: list[str] = Field(default_factory=list)
    options: list[str] = Field(default_factory=list)


class CniResult(BaseModel):
    """What ADD answered (spec 1.0; 0.3/0.4 results read the same, their extra fields kept)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    cni_version: str = Field(alias="cniVersion")
    interfaces: list[CniInterface] = Field(default_factory=list)
    ips: list[CniIP] = Field(default_factory=list)
    routes: list[CniRoute] = Field(default_factory=list)
    dns: CniDNS = Field(default_factory=CniDNS)

    def sandbox_interface(self, ifname: str, sandbox: str) -> tuple[int, CniInterface]:
        """The interface `ifname` made inside the namespace `sandbox` (the one a tap is
        connected to) and its index; ValueError when the result has none."""
        for index, interface in enumerate(self.interfaces):
            if interface.name == ifname and interface.sandbox == sandbox:
                return index, interface
        raise ValueError(
            f"the result names no interface {ifname!r} inside {sandbox} "
            f"(it has {', '.join(repr(i.name) for i in self.interfaces) or 'none'})"
        )

    def ips_of(self, index: int) -> list[CniIP]:
        """Every IP of interface `index`, IPv4 and IPv6, in the result's order; an IP that
        names no interface counts for every one (as the spec allows)."""
        return [ip for ip in self.ips if ip.interface is None or ip.interface == index]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def parse_result(data: Any) -> CniResult:
    """A plugin's result; ValueError saying what is wrong with it otherwise."""
    if not isinstance(data, dict):
        raise ValueError("the result is not a JSON object")
    try:
        return CniResult.model_validate(data)
    except ValidationError as error:
        raise ValueError("; ".join(f"{d.loc}: {d.msg}" for d in details_of(error))) from None


class CniError(BaseModel):
    """A plugin's error object (printed on stdout with a non-zero exit)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    code: int
    msg: str
    details: str = ""

    def text(self) -> str:
        more = f" ({self.details})" if self.details and self.details != self.msg else ""
        return f"{self.msg}{more} [CNI error code {self.code}]"


def parse_error(data: Any) -> CniError | None:
    """The error object a plugin printed, or None when `data` is not one."""
    if not isinstance(data, dict):
        return None
    try:
        return CniError.model_validate(data)
    except ValidationError:
        return None


def check_container_id(value: str) -> str:
    """A CNI_CONTAINERID as the spec allows it, or ValueError."""
    if not CONTAINER_ID.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a CNI container id: letters, digits, '_', '.', '-', starting "
            "with a letter or digit"
        )
    return value


def cni_args(args: dict[str, str], loc: str = "cni.args") -> str:
    """`args` as CNI_ARGS (`K1=V1;K2=V2`); InvalidError when a key or value cannot be
    written that way."""
    parts = []
    for key, value in args.items():
        if not key or any(c in key for c in "=;") or ";" in value:
            raise InvalidError.at(
                f"{loc}.{key}",
                "keys must be non-empty without '=' or ';', values without ';' (CNI_ARGS is "
                "K1=V1;K2=V2)",
            )
        parts.append(f"{key}={value}")
    return ";".join(parts)
