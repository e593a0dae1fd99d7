"""A plugin's manifest: what to boot, with what resources, networked how by default."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Self
from urllib.parse import urlparse

from pydantic import AfterValidator, Field, field_validator, model_validator

from roost.errors import ErrorDetail, InvalidError
from roost.spec.common import BootArgs, Labels, Name, Resources, Spec
from roost.spec.interfaces import BOTH_FORMS, Interfaces, interfaces_errors
from roost.spec.network import ModeName, NetworkConfig, NetworkMode, network_errors

SHA256 = re.compile(r"[0-9a-f]{64}")
URL_SCHEMES = ("http", "https", "file")
ARTIFACT_ROLES = ("kernel", "initramfs", "rootfs")
MAX_PATH_BYTES = 4095  # Linux's PATH_MAX, less the terminating NUL
MAX_URL_BYTES = 8192


def _text(value: str, limit: int) -> str:
    """What a path or URL must be to reach the filesystem or the network at all."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text") from None
    if size > limit:
        raise ValueError(f"is {size} bytes long; the limit is {limit}")
    return value


def _sha256(value: str) -> str:
    text = value.strip().lower()
    if not SHA256.fullmatch(text):
        raise ValueError("must be 64 hexadecimal digits (a sha256 digest)")
    return text


class Artifact(Spec):
    """A file the plugin needs: a local `path` or a `url`, optionally pinned by `sha256`.

    A relative `path` is relative to the manifest file's folder; `resolve` makes it absolute.
    """

    path: str | None = None
    url: str | None = None
    sha256: Annotated[str, AfterValidator(_sha256)] | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be empty")
        return _text(value, MAX_PATH_BYTES)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _text(value, MAX_URL_BYTES)
        try:
            parsed = urlparse(value)
            port = parsed.port  # a port out of range or not a number raises here
        except ValueError as error:
            raise ValueError(f"{value!r} is not a valid URL: {error}") from None
        if parsed.scheme not in URL_SCHEMES or not (parsed.hostname or parsed.scheme == "file"):
            raise ValueError(f"{value!r} must be an http://, https:// or file:// URL")
        if port == 0:
            raise ValueError(f"{value!r} names port 0, which no server listens on")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.path is None) == (self.url is None):
            raise ValueError("give exactly one of path or url")
        return self

    def resolve(self, base_dir: str) -> Artifact:
        """The same artifact with a relative path made absolute against `base_dir`."""
        if self.path is None or PurePosixPath(self.path).is_absolute():
            return self
        return self.model_copy(update={"path": str(PurePosixPath(base_dir) / self.path)})


class Manifest(Spec):
    """A plugin: kernel (optional, the daemon has a default), initramfs and/or rootfs,
    boot args, resources, default network and the network modes its VMs may use."""

    schema_version: str = "1"
    name: Name
    version: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^\S+$")]
    description: str | None = None
    kernel: Artifact | None = None
    initramfs: Artifact | None = None
    rootfs: Artifact | None = None
    boot_args: BootArgs | None = None
    resources: Resources = Resources()
    network: NetworkConfig | None = None
    allowed_network_modes: Annotated[list[ModeName], Field(min_length=1)] | None = None
    labels: Labels = Field(default_factory=dict)
    # the plugin's default interfaces, in place of `network`; left out of the stored JSON when
    # unset, so manifests written before the field existed read back unchanged
    interfaces: Interfaces | None = Field(default=None, exclude_if=lambda v: v is None)

    @field_validator("schema_version", mode="before")
    @classmethod
    def _schema_version(cls, value: Any) -> Any:
        if value != "1":
            raise ValueError(f'{value!r} is not supported; this roost reads schema_version "1"')
        return value

    @field_validator("allowed_network_modes", mode="before")
    @classmethod
    def _modes_list(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list):
            raise ValueError("must be a list of network modes")
        return value

    @model_validator(mode="after")
    def _rules(self) -> Self:
        errors = manifest_errors(self)
        if errors:
            raise InvalidError.of(errors)
        return self

    def artifacts(self) -> dict[str, Artifact]:
        """The artifacts the manifest names, by role."""
        found = {role: getattr(self, role) for role in ARTIFACT_ROLES}
        return {role: artifact for role, artifact in found.items() if artifact is not None}

    def allows(self, mode: NetworkMode) -> bool:
        return self.allowed_network_modes is None or mode in self.allowed_network_modes


def manifest_errors(manifest: Manifest) -> list[ErrorDetail]:
    """The rules between a manifest's fields (field formats are pydantic's job)."""
    errors: list[ErrorDetail] = []
    if manifest.initramfs is None and manifest.rootfs is None:
        errors.append(ErrorDetail("-", "a plugin needs an initramfs or a rootfs (or both)"))
    allowed = manifest.allowed_network_modes
    if allowed is not None:
        seen: set[NetworkMode] = set()
        for index, mode in enumerate(allowed):
            if mode in seen:
                errors.append(
                    ErrorDetail(f"allowed_network_modes.{index}", f"{mode} is listed twice")
                )
            seen.add(mode)
    if manifest.interfaces is not None:
        errors += _interfaces_errors(manifest)
    if manifest.network is not None:
        errors += network_errors(manifest.network, "plugin")
        declared = manifest.network.mode
        if declared is not None and allowed is not None and declared not in allowed:
            errors.append(
                ErrorDetail(
                    "network.mode",
                    f"{declared} is not in this plugin's allowed_network_modes "
                    f"({', '.join(allowed)})",
                )
            )
    elif manifest.interfaces is None and allowed is not None and NetworkMode.BRIDGED not in allowed:
        errors.append(
            ErrorDetail(
                "network",
                "is required when allowed_network_modes excludes bridged: without it every VM "
                f"would get the daemon's bridged default; set network.mode to one of "
                f"{', '.join(allowed)}",
            )
        )
    return errors


def _interfaces_errors(manifest: Manifest) -> list[ErrorDetail]:
    """A plugin's default interfaces: their rules, each mode allowed (none at all is vsock)."""
    interfaces = manifest.interfaces
    assert interfaces is not None
    errors: list[ErrorDetail] = []
    if manifest.network is not None:
        errors.append(ErrorDetail("interfaces", BOTH_FORMS))
    errors += interfaces_errors(interfaces, "plugin")
    allowed = manifest.allowed_network_modes
    if allowed is None:
        return errors
    if not interfaces and NetworkMode.VSOCK not in allowed:
        errors.append(
            ErrorDetail(
                "interfaces",
                f"is empty, which is vsock-only, and vsock is not in this plugin's "
                f"allowed_network_modes ({', '.join(allowed)})",
            )
        )
    for index, interface in enumerate(interfaces):
        if interface.mode not in allowed:
            errors.append(
                ErrorDetail(
                    f"interfaces.{index}.mode",
                    f"{interface.mode} is not in this plugin's allowed_network_modes "
                    f"({', '.join(allowed)})",
                )
            )
    return errors
