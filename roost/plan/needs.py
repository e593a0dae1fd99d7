"""What a VM asks of the host it is placed on (`roost.plan.placement.Need`), from its plan.

Pure: the resources are its plan's (the plugin's, overridden by its config); the rest is what
hosts differ in, named as hosts state their `facts`: the binary of its VMM (`vmms`), the
external networks its interfaces join (`external_networks`: the operator's bridges, one host's
each), the conflists of its cni interfaces that no registered cni network carries
(`cni_networks`: read from each host's conf dir), and, for a VM that uses vsock, the vsock device
its VMM gives (`vsock`).
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from roost.plan.network import Attachment
from roost.plan.placement import Need
from roost.plan.vm import VMPlan

# the vsock device each VMM gives its VMs where that is one kind; QEMU's is the kernel's
# vhost-vsock or roost's own vhost-user one, and every host that runs QEMU can give the latter
VSOCK_OF = {"firecracker": "firecracker", "cloud-hypervisor": "cloud-hypervisor"}


def uses_vsock(plan: VMPlan, services: Mapping[int, str]) -> bool:
    """Whether the VM is reached over vsock: it has no network interface (vsock mode), or
    host services its guest dials (`vsock_services`)."""
    return not plan.interfaces.interfaces or bool(services)


def need_of(
    plan: VMPlan,
    vmm: str,
    *,
    vsock: bool,
    registered_cni: Container[str],
    host: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Need:
    """What VM `plan`, run by `vmm`, needs of its host; `vsock`: it uses vsock (`uses_vsock`);
    `registered_cni`: the names of the registered cni networks (their conflists are stored,
    not read from a host); `host` and `labels` narrow the hosts it may go to."""
    external: list[str] = []
    conflists: list[str] = []
    for interface in plan.interfaces.interfaces:
        effective = interface.effective
        if interface.plan.attach is Attachment.EXTERNAL and effective.on_network is not None:
            external.append(effective.on_network)
        cni = effective.cni
        if cni is not None and cni.network not in registered_cni:
            conflists.append(cni.network)
    requires = {"vmms": [vmm]}
    if external:
        requires["external_networks"] = sorted(set(external))
    if conflists:
        requires["cni_networks"] = sorted(set(conflists))
    if vsock and vmm in VSOCK_OF:
        requires["vsock"] = [VSOCK_OF[vmm]]
    return Need(
        vcpus=plan.resources.vcpus,
        memory_mib=plan.resources.memory_mib,
        host=host,
        labels=dict(labels or {}),
        requires=requires,
    )
