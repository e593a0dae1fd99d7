"""Golden files of today's networking for the seed's examples (docs: network-modes.md): for each,
the resolved network and its plan, the guest's command line with the `ip=` the engine builds,
the tap and what its anti-spoofing is given, every VMM's configuration, and (as root, in a
throwaway namespace) the nftables ruleset the firewall installs for the tap.

Every config valid today must keep meaning exactly this. The files under tests/data/golden/
are written only on request, `ROOST_GOLDEN_UPDATE=1 .venv/bin/pytest
tests/unit/test_golden_network.py` (as root, for the rulesets; then review the diff like code);
otherwise a difference fails the test.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from roost.engine.hostnet import HostNetwork, TapPlan
from roost.engine.launch import Files, launch_spec
from roost.engine.steps import Steps
from roost.host.firewall import Firewall
from roost.host.netns import NetnsWorker
from roost.plan import IPAM, DefaultNetwork, plan_network, plan_vm
from roost.plan.vm import effective_json
from roost.spec import Manifest, VMConfig
from roost.state import alloc
from roost.vmm import cloud_hypervisor, firecracker, qemu
from roost.vmm.base import NIC, RunDir, VsockBackend
from tests.engine_fakes import FakeFirewall, FakeLinks
from tests.harness import run

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
UPDATE = os.environ.get("ROOST_GOLDEN_UPDATE") == "1"

VM_NAME = "web-1"
VM_ID = 7  # the record's id: the tap is named from it
GUEST_MAC = "02:00:00:00:00:07"  # what alloc.new_mac hands out: locally administered unicast
CID = 3
RUN_DIR = RunDir(Path("/run/roost/vms") / VM_NAME)
FILES = Files(kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd.gz"), disk=None)
BRIDGES = {"managed": "rbr1", "external": "brdhcp"}  # a first managed network; --dhcp-bridge

WEB_SERVICE = {  # the seed's "Plugin Manifest with Bridged Networking"
    "mode": "bridged",
    "subnet": "10.100.0.0/24",
    "gateway": "10.100.0.1",
    "auto_assign": True,
}
MANUAL = {"mode": "bridged", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1"}


@dataclass(frozen=True)
class Example:
    """A plugin's network, a VM's override (None: absent) and, for roost-assigned addresses,
    the one the allocator hands out first (the next free after the gateway)."""

    plugin: dict[str, Any] | None
    vm: dict[str, Any] | None
    allocated: str | None = None


EXAMPLES = {
    "vsock": Example({"mode": "vsock"}, None),
    "bridged-auto-assign": Example(WEB_SERVICE, None, allocated="10.100.0.2"),
    "bridged-manual-ip": Example(MANUAL, {"mode": "bridged", "ip": "10.1.0.5"}),
    "dhcp-plugin": Example({"mode": "dhcp"}, None),
    "dhcp-vm-override": Example(WEB_SERVICE, {"mode": "dhcp"}),
    "vm-ip-inherits-plugin-subnet": Example(WEB_SERVICE, {"ip": "10.100.0.50"}),
    "vm-own-subnet": Example(
        WEB_SERVICE,
        {
            "mode": "bridged",
            "subnet": "10.200.0.0/24",
            "gateway": "10.200.0.1",
            "ip": "10.200.0.10",
        },
    ),
    "vm-own-subnet-auto-assign": Example(
        {"mode": "vsock"},
        {"mode": "bridged", "subnet": "10.30.0.0/24", "auto_assign": True},
        allocated="10.30.0.2",
    ),
    "vm-override-to-vsock": Example(WEB_SERVICE, {"mode": "vsock"}),
    "no-network": Example(None, None, allocated="10.57.0.2"),
    "no-network-vm-ip": Example(None, {"mode": "bridged", "ip": "10.57.0.9"}),
}


@dataclass(frozen=True)
class Built:
    """One example as the engine builds it once the address is allocated."""

    manifest: Manifest
    config: VMConfig
    data: dict[str, Any]
    tap: TapPlan | None


@dataclass(frozen=True)
class Holder:
    id: int


def documents(example: Example) -> tuple[dict[str, Any], dict[str, Any]]:
    manifest: dict[str, Any] = {
        "name": "web-service",
        "version": "1.0.0",
        "initramfs": {"path": str(FILES.initrd)},
        "boot_args": "console=ttyS0",
    }
    if example.plugin is not None:
        manifest["network"] = example.plugin
    config: dict[str, Any] = {"plugin": "web-service"}
    if example.vm is not None:
        config["network"] = example.vm
    return manifest, config


def build(example: Example) -> Built:
    """The example through resolution, allocation (as the engine does it, with the address
    given) and the launch spec, with everything each layer would be handed."""
    manifest_json, config_json = documents(example)
    manifest = Manifest.model_validate(manifest_json)
    config = VMConfig.model_validate(config_json)
    plan = plan_vm(VM_NAME, manifest, config, DefaultNetwork.from_cidr())
    effective = plan.network
    if plan.net.ipam is IPAM.AUTO:
        assert example.allocated is not None
        effective = effective.with_ip(ipaddress.IPv4Address(example.allocated))
    else:
        assert example.allocated is None
    net = plan_network(effective, VM_NAME)
    tap = alloc.tap_name(Holder(VM_ID)) if net.tap else None
    mac = GUEST_MAC if net.nic else None
    tap_plan = None
    if tap is not None and mac is not None:
        gateway = None
        if effective.subnet is not None and effective.gateway is not None:
            gateway = alloc.gateway_interface(effective.gateway, effective.subnet)
        tap_plan = TapPlan(
            tap=tap,
            mac=mac,
            bridge=BRIDGES[net.attach.value],
            network_id=1 if net.ipam is not IPAM.NONE else None,
            attach=net.attach,
            gateway=gateway,
            antispoof=net.antispoof,
            ip=None if effective.ip is None else str(effective.ip),
        )

    def spec_for(backend: VsockBackend) -> Any:
        nics = (NIC(tap=tap, mac=mac),) if tap is not None and mac is not None else ()
        return launch_spec(
            plan, manifest, config, FILES, RUN_DIR, network_args=net.kernel_ip_arg, nics=nics,
            cid=CID, vsock_backend=backend,
        )  # fmt: skip

    data = {
        "manifest": manifest_json,
        "config": config_json,
        "allocated_ip": example.allocated,
        "resolved": {"network": plan.network.to_json(), "plan": plan.net.to_json()},
        "effective": effective_json(plan, effective, "firecracker"),
        "plan": net.to_json(),
        "boot_args": spec_for(VsockBackend.FIRECRACKER).boot_args,
        "tap": None
        if tap_plan is None
        else {
            "name": tap_plan.tap,
            "host_mac": alloc.tap_mac(tap_plan.mac),
            "guest_mac": tap_plan.mac,
            "bridge": tap_plan.bridge,
            "bridge_address": None if tap_plan.gateway is None else str(tap_plan.gateway),
            "protect": protect_calls(tap_plan),
        },
        "firecracker": [
            list(request)
            for request in firecracker.boot_requests(spec_for(VsockBackend.FIRECRACKER))
        ],
        "qemu": qemu.qemu_argv(
            Path("/usr/bin/qemu-system-x86_64"),
            spec_for(VsockBackend.KERNEL),
            machine="microvm",
            accel="tcg",
            tsc_khz=2_600_000,
        ),
        "cloud_hypervisor": cloud_hypervisor.vm_config(spec_for(VsockBackend.CLOUD_HYPERVISOR)),
    }
    return Built(manifest, config, data, tap_plan)


class RecordingFirewall(FakeFirewall):
    """What the host network asks of the firewall for a tap."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def protect(self, tap: str, mac: str, ip: str | None) -> None:
        self.calls.append({"tap": tap, "mac": mac, "ip": ip})
        super().protect(tap, mac, ip)


def host_links() -> FakeLinks:
    """The daemon's links before the VM: only the operator's dhcp bridge."""
    links = FakeLinks()
    links.links[BRIDGES["external"]] = "bridge"
    return links


def protect_calls(tap: TapPlan) -> list[dict[str, Any]]:
    firewall = RecordingFirewall()
    HostNetwork(host_links(), firewall, lambda _: True).attach(Steps("create", VM_NAME), tap)
    return firewall.calls


def check(path: Path, actual: Any) -> None:
    """Compare with the golden file, or write it when asked to (ROOST_GOLDEN_UPDATE=1)."""
    text = json.dumps(actual, indent=2, sort_keys=True) + "\n"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing; write it with ROOST_GOLDEN_UPDATE=1 and review it"
    assert json.loads(path.read_text()) == actual, (
        f"{path.name} differs from today's behaviour; if the change is intended, rewrite it "
        "with ROOST_GOLDEN_UPDATE=1 and review the diff"
    )


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_a_seed_example_plans_boots_and_configures_its_vmm_as_today(name: str) -> None:
    check(GOLDEN / f"{name}.json", build(EXAMPLES[name]).data)


def ruleset(netns: str) -> Any:
    """The firewall's table as nftables lists it, without what differs between runs
    (handles, the listing's metadata)."""
    listed = json.loads(run("nft", "-j", "list", "table", "bridge", "roost", netns=netns).stdout)

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key != "handle"}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    return [strip(item) for item in listed["nftables"] if "metainfo" not in item]


@pytest.mark.root
@pytest.mark.parametrize("name", [name for name in EXAMPLES if build(EXAMPLES[name]).tap])
def test_a_seed_examples_tap_gets_todays_antispoofing_rules(name: str, netns: str) -> None:
    tap = build(EXAMPLES[name]).tap
    assert tap is not None
    worker = NetnsWorker(netns)
    try:
        host = HostNetwork(host_links(), Firewall(worker), lambda _: True)
        host.attach(Steps("create", VM_NAME), tap)
        check(GOLDEN / f"{name}.nft.json", ruleset(netns))
    finally:
        worker.close()


def test_the_golden_files_are_exactly_the_examples() -> None:
    expected = {f"{name}.json" for name in EXAMPLES}
    expected |= {f"{name}.nft.json" for name in EXAMPLES if build(EXAMPLES[name]).tap}
    assert {path.name for path in GOLDEN.glob("*.json")} == expected
