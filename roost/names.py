"""Names every layer checks, kept free of pydantic so the CLI can refuse a bad VM name, or
offer the VMMs by name, before it loads any model: a command that only talks to the daemon
starts in a fraction of the time."""

from __future__ import annotations

import re
from enum import StrEnum

from roost.errors import InvalidError

DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def dns_label(value: str) -> str:
    """`value` if it is a DNS label, else ValueError saying what a name must be."""
    if not DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use a DNS label of 1-63 characters, lower-case "
            "letters, digits and '-', starting and ending with a letter or digit"
        )
    return value


def check_name(name: str, loc: str = "name") -> str:
    """A plugin's or VM's name, or `InvalidError` at `loc` saying what a name must be."""
    try:
        return dns_label(name)
    except ValueError as error:
        raise InvalidError.at(loc, str(error)) from None


class VMMKind(StrEnum):
    """The VMM that runs a VM (the daemon's --vmm unless the VM names one)."""

    FIRECRACKER = "firecracker"
    QEMU = "qemu"
    CLOUD_HYPERVISOR = "cloud-hypervisor"
