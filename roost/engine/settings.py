"""The daemon's settings, as `roost serve` takes them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from roost.plan.network import DEFAULT_SUBNET


class QemuMachine(StrEnum):
    MICROVM = "microvm"
    Q35 = "q35"


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


DEFAULT_STATE_DIR = Path("/var/lib/roost")
DEFAULT_RUN_DIR = Path("/run/roost")
DEFAULT_BRIDGE = "roost0"
DEFAULT_NETWORK = "default"


@dataclass(frozen=True)
class Settings:
    state_dir: Path = DEFAULT_STATE_DIR
    run_dir: Path = DEFAULT_RUN_DIR
    database_url: str | None = None
    netns: str | None = None
    firecracker: str | None = None
    kernel: Path | None = None
    default_subnet: str = DEFAULT_SUBNET
    dhcp_bridge: str | None = None
    dhcp_leases: Path | None = None
    vmm: str = "firecracker"
    qemu_machine: str = "microvm"
    accel: str = "auto"
    stop_timeout: float = 3.0
