"""Field types shared by manifests and VM configs: names, resources, boot args, labels."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

# defined without pydantic, for the CLI's fast start; here for the models and every other layer
from roost.names import DNS_LABEL as DNS_LABEL  # noqa: PLC0414 (a re-export)
from roost.names import VMMKind as VMMKind  # noqa: PLC0414 (a re-export)
from roost.names import check_name as check_name  # noqa: PLC0414 (a re-export)
from roost.names import dns_label as _dns_label

LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,251}[A-Za-z0-9])?")
# Labels are stored with each config version and sent in every listing: 64 of at most 253 + 256
# characters keep a VM's labels under 33 KiB (Kubernetes' key length, a short value).
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_BOOT_ARGS = 1024
MIN_VCPUS, MAX_VCPUS = 1, 32
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 16, 1024 * 1024
# Boot args roost writes itself from the VM's name and network; a plugin must not set them.
RESERVED_BOOT_ARGS = ("ip=", "roost.name=")


def _strict_int(value: Any) -> Any:
    # JSON `true` and `"2"` are not vCPU counts; refuse them instead of coercing.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number")
    return value


def _boot_args(value: str) -> str:
    text = " ".join(value.split())
    if len(text) > MAX_BOOT_ARGS:
        raise ValueError(f"is {len(text)} characters long; the limit is {MAX_BOOT_ARGS}")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    for word in text.split():
        for reserved in RESERVED_BOOT_ARGS:
            if word.startswith(reserved):
                raise ValueError(
                    f"{word!r}: roost sets {reserved}... itself from the VM's name and network; "
                    "describe the network in `network` instead"
                )
    return text


def _label_count(value: Any) -> Any:
    # Before pydantic reads the members: a million labels are refused without reading them.
    if isinstance(value, dict) and len(value) > MAX_LABELS:
        raise ValueError(
            f"has {len(value)} labels; at most {MAX_LABELS} are allowed: keep the ones you "
            "select or report VMs by"
        )
    return value


def _labels(value: dict[str, str]) -> dict[str, str]:
    for key, text in value.items():
        if not LABEL_KEY.fullmatch(key):
            raise ValueError(
                f"label key {key!r} must be 1-253 characters of letters, digits, '.', '_', '/' "
                "and '-', starting and ending with a letter or digit"
            )
        if len(text) > MAX_LABEL_VALUE:
            raise ValueError(f"label {key!r}: values are limited to {MAX_LABEL_VALUE} characters")
    return dict(sorted(value.items()))


def label_selector(text: str) -> tuple[str, str]:
    """A `key=value` selector of VMs by label (the value may be empty); ValueError says what
    is wrong with it."""
    key, equals, value = text.partition("=")
    if not equals:
        raise ValueError(f"{text!r} is not a label selector: write key=value, e.g. tier=web")
    _labels({key: value})
    return key, value


Name = Annotated[str, AfterValidator(_dns_label)]
# the bounds before the validator that wraps them, so the JSON Schema says minimum/maximum
VCPUs = Annotated[int, Field(ge=MIN_VCPUS, le=MAX_VCPUS), BeforeValidator(_strict_int)]
MemoryMiB = Annotated[
    int, Field(ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB), BeforeValidator(_strict_int)
]
BootArgs = Annotated[str, AfterValidator(_boot_args)]
Labels = Annotated[dict[str, str], BeforeValidator(_label_count), AfterValidator(_labels)]


def _label_changes(value: dict[str, str | None]) -> dict[str, str | None]:
    _labels({key: text for key, text in value.items() if text is not None})
    for key in value:
        _labels({key: ""})
    return dict(sorted(value.items()))


# A patch's labels: each key set to its value, or removed with null (a JSON merge patch), so
# two clients changing different labels at once both keep their change.
LabelChanges = Annotated[
    dict[str, str | None], BeforeValidator(_label_count), AfterValidator(_label_changes)
]


class Spec(BaseModel):
    """Base of every spec model: unknown fields are errors (they are usually typos)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(Spec):
    """A plugin's resources; each has a default."""

    vcpus: VCPUs = 1
    memory_mib: MemoryMiB = 128


class ResourcesOverride(Spec):
    """A VM's resources; an unset field keeps the plugin's value."""

    vcpus: VCPUs | None = None
    memory_mib: MemoryMiB | None = None

    def apply(self, base: Resources) -> Resources:
        return Resources(
            vcpus=base.vcpus if self.vcpus is None else self.vcpus,
            memory_mib=base.memory_mib if self.memory_mib is None else self.memory_mib,
        )
