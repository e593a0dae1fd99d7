"""Pure planning: from specs and daemon defaults to what must exist for a VM."""

from roost.plan.network import (
    IPAM,
    AntiSpoof,
    Attachment,
    DefaultNetwork,
    EffectiveNetwork,
    NetworkPlan,
    Source,
    kernel_ip_arg,
    plan_network,
    resolve_network,
)
from roost.plan.vm import VMPlan, boot_args, plan_vm

__all__ = [
    "IPAM",
    "AntiSpoof",
    "Attachment",
    "DefaultNetwork",
    "EffectiveNetwork",
    "NetworkPlan",
    "Source",
    "VMPlan",
    "boot_args",
    "kernel_ip_arg",
    "plan_network",
    "plan_vm",
    "resolve_network",
]
