"""From what a VM is planned and holds to what its driver boots: a pure function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from roost.plan import VMPlan, boot_args
from roost.spec import Manifest, VMConfig
from roost.vmm.base import NIC, LaunchSpec, RunDir, Vsock, VsockBackend


@dataclass(frozen=True)
class Files:
    """Where the VM's files are on the host: the kernel, the initramfs and its own disk."""

    kernel: Path
    initrd: Path | None
    disk: Path | None


def launch_spec(
    plan: VMPlan,
    manifest: Manifest,
    config: VMConfig,
    files: Files,
    run_dir: RunDir,
    *,
    network_args: str | None,
    nics: tuple[NIC, ...],
    cid: int,
    vsock_backend: VsockBackend | None,
    netns: Path | None = None,
) -> LaunchSpec:
    """The driver's launch spec for `plan`, with its interfaces' NICs (tap and guest MAC, in
    the guest's device order) and `network_args` their kernel arguments once allocated;
    `vsock_backend` is None when the VMM can give the VM no vsock device; `netns` the network
    namespace file the VMM runs in (a cni VM's, where its taps are), None for the worker's."""
    return LaunchSpec(
        name=plan.name,
        run_dir=run_dir,
        kernel=files.kernel,
        initrd=files.initrd,
        rootfs=files.disk,
        boot_args=boot_args(manifest, config, plan.name, network_args),
        vcpus=plan.resources.vcpus,
        memory_mib=plan.resources.memory_mib,
        nics=nics,
        vsock=None if vsock_backend is None else Vsock(cid, run_dir.vsock_socket, vsock_backend),
        netns=netns,
    )
