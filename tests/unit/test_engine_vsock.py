"""The engine and a VM's vsock: its device process lives and ends with its VMM, and the
daemon's listeners for its services follow its VMM (on fakes: no root, no VMM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from roost.errors import ConflictError, HostError, NotFoundError
from roost.spec import VMConfig, VMConfigPatch
from roost.vmm.base import HybridVsock, KernelVsock, VsockBackend
from tests.engine_fakes import World
from tests.harness import wait_for


def vsock_config(**services: str) -> VMConfig:
    return VMConfig.model_validate(
        {"plugin": "p", "vsock_services": {port: target for port, target in services.items()}}
    )


def test_a_vm_whose_vsock_device_dies_is_stopped_as_crashed_naming_the_device(
    world: World,
) -> None:
    world.driver.with_device = True
    world.engine.create_vm("a", VMConfig(plugin="p"))
    vmm, device = world.driver.started[-1], world.driver.devices[-1]
    device.child.kill()
    device.child.wait()
    wait_for(lambda: world.engine.show_vm("a")["status"] == "crashed", what="the crash")
    shown = world.engine.show_vm("a")
    assert "vsock device" in shown["status_reason"]
    assert f"pid {device.pid}" in shown["status_reason"]
    assert vmm.child.poll() is not None  # the VMM was stopped: its guest's vsock is gone
    assert shown["exit_code"] == vmm.child.returncode  # the VMM's, not the device's
    assert world.engine.live == {}


def test_a_vsock_device_that_ends_with_its_vmm_is_the_vmms_own_end(world: World) -> None:
    world.driver.with_device = True
    world.engine.create_vm("a", VMConfig(plugin="p"))
    vmm, device = world.driver.started[-1], world.driver.devices[-1]
    device.child.kill()  # the device noticed QEMU go first, as it does on a guest poweroff
    vmm.child.kill()
    wait_for(lambda: world.engine.show_vm("a")["status"] != "running", what="the exit")
    shown = world.engine.show_vm("a")
    assert shown["status_reason"] == "the VMM was killed by signal 9"
    assert device.child.poll() is not None


def test_stopping_a_vm_ends_its_vsock_device_too(world: World) -> None:
    world.driver.with_device = True
    world.engine.create_vm("a", VMConfig(plugin="p"))
    device = world.driver.devices[-1]
    world.engine.stop_vm("a", timeout=0, force=True)
    assert device.child.poll() is not None
    assert world.engine.show_vm("a")["status"] == "stopped"


def test_services_are_listened_for_while_the_vmm_runs_and_not_after(world: World) -> None:
    world.engine.create_vm("a", vsock_config(**{"5000": "unix:///run/agent.sock"}))
    target, services = world.listeners.listening["a"]
    assert target == HybridVsock(world.root / "run" / "vms" / "a" / "vsock.sock")
    assert services == {5000: "unix:///run/agent.sock"}
    world.engine.stop_vm("a", timeout=0, force=True)
    assert "a" not in world.listeners.listening
    world.engine.start_vm("a")
    assert "a" in world.listeners.listening
    world.engine.destroy_vm("a")
    assert world.listeners.removed == ["a"]
    assert world.listeners.listening == {}


def test_a_service_listener_that_cannot_be_bound_fails_the_create_and_leaves_nothing(
    world: World,
) -> None:
    world.listeners.fail = True
    with pytest.raises(HostError, match="fake failure"):
        world.engine.create_vm("a", vsock_config(**{"5000": "tcp://127.0.0.1:9"}))
    world.assert_nothing_left("a")


def test_the_vsock_target_is_known_only_while_a_vmm_runs(world: World) -> None:
    with pytest.raises(NotFoundError):
        world.engine.vsock_target("nobody")
    world.engine.create_vm("a", VMConfig(plugin="p"))
    assert isinstance(world.engine.vsock_target("a"), HybridVsock)
    world.engine.pause_vm("a")
    assert isinstance(world.engine.vsock_target("a"), HybridVsock)  # paused: dialled, times out
    world.engine.stop_vm("a", timeout=0, force=True)
    with pytest.raises(ConflictError, match="start it first"):
        world.engine.vsock_target("a")


def test_a_kernel_vsock_vm_is_reached_by_its_cid_and_shows_no_socket(world: World) -> None:
    world.driver.vsock_backend = lambda: VsockBackend.KERNEL  # type: ignore[method-assign]
    shown = world.engine.create_vm("a", VMConfig(plugin="p"))
    assert shown["vsock"] == {
        "cid": shown["vsock"]["cid"],
        "uds_path": None,
        "available": True,
        "backend": "kernel",
        "reason": None,
    }
    assert world.engine.vsock_target("a") == KernelVsock(shown["vsock"]["cid"])
    assert world.listeners.listening["a"][0] == KernelVsock(shown["vsock"]["cid"])
    assert world.driver.launched[-1].vsock is not None
    assert world.driver.launched[-1].vsock.backend is VsockBackend.KERNEL


def test_a_cloud_hypervisor_vm_is_reached_by_its_hybrid_socket(world: World) -> None:
    world.driver.vsock_backend = lambda: VsockBackend.CLOUD_HYPERVISOR  # type: ignore[method-assign]
    shown = world.engine.create_vm("a", VMConfig(plugin="p"))
    uds_path = world.root / "run" / "vms" / "a" / "vsock.sock"
    assert shown["vsock"] == {
        "cid": shown["vsock"]["cid"],
        "uds_path": str(uds_path),
        "available": True,
        "backend": "cloud-hypervisor",
        "reason": None,
    }
    assert world.engine.vsock_target("a") == HybridVsock(uds_path)
    assert world.listeners.listening["a"][0] == HybridVsock(uds_path)


def test_the_backend_a_vm_started_with_is_kept_when_the_driver_changes_its_choice(
    world: World,
) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"))
    world.driver.vsock_backend = lambda: VsockBackend.KERNEL  # type: ignore[method-assign]
    assert world.engine.show_vm("a")["vsock"]["backend"] == "firecracker"
    assert isinstance(world.engine.vsock_target("a"), HybridVsock)
    world.engine.restart_vm("a")
    assert world.engine.show_vm("a")["vsock"]["backend"] == "kernel"


def test_changing_a_running_vms_services_needs_a_restart_and_the_restart_applies_them(
    world: World,
) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"))
    patched = world.engine.patch_config(
        "a", VMConfigPatch.model_validate({"vsock_services": {"5000": "tcp://127.0.0.1:80"}})
    )
    assert patched["version"] == 2
    assert world.engine.show_vm("a")["restart_required"] is True
    assert world.listeners.listening["a"][1] == {}  # the running version's: none yet
    world.engine.restart_vm("a")
    assert world.listeners.listening["a"][1] == {5000: "tcp://127.0.0.1:80"}
    assert world.engine.show_vm("a")["restart_required"] is False


def test_only_a_jailed_firecracker_vms_tap_is_given_to_the_jailers_uid(world: World) -> None:
    """Under --jailer every jailed VMM runs as the one uid: a tap it owns it may open, so a
    VM's tap whose VMM is not jailed is not given to it (or any jailed VMM could take it)."""
    object.__setattr__(world.settings, "jailer", Path("/opt/jailer"))
    world.engine.drivers["firecracker"] = world.driver
    world.engine.create_vm("j", VMConfig(plugin="p", vmm="firecracker"))
    world.engine.create_vm("o", VMConfig(plugin="p"))
    taps = {name: world.engine.show_vm(name)["network"]["tap"] for name in ("j", "o")}
    assert world.links.owned == {taps["j"]}
