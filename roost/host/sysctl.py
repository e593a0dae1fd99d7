"""Kernel parameters (sysctls) through /proc/sys.

/proc/sys/net shows the network namespace of the thread that opens it, so a thread inside a
namespace (`NetnsWorker`) reads and sets that namespace's values and no other's.
"""

from __future__ import annotations

import errno
from pathlib import Path

from roost.errors import HostError

PROC_SYS = Path("/proc/sys")


def sysctl_path(name: str) -> Path:
    """`net.ipv4.ip_forward` → /proc/sys/net/ipv4/ip_forward."""
    return PROC_SYS / name.replace(".", "/")


def read(name: str) -> str:
    try:
        return sysctl_path(name).read_text().strip()
    except OSError as error:
        raise HostError(f"cannot read sysctl {name}: {error.strerror}") from None


def write(name: str, value: str) -> None:
    try:
        sysctl_path(name).write_text(value)
    except OSError as error:
        hint = "; run as root" if error.errno in (errno.EACCES, errno.EPERM) else ""
        raise HostError(f"cannot set sysctl {name} to {value}: {error.strerror}{hint}") from None
