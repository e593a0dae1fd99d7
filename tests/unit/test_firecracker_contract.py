"""Every request the Firecracker driver sends is valid for Firecracker: its path and method
exist in Firecracker's swagger file and its body matches the schema (no unknown fields)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft4Validator

from roost.vmm.base import NIC, LaunchSpec, RunDir, Vsock, VsockBackend
from roost.vmm.firecracker import boot_requests

SPEC = Path(__file__).resolve().parents[1] / "data" / "firecracker.yaml"  # see its README


@pytest.fixture(scope="module")
def swagger() -> dict[str, Any]:
    return yaml.safe_load(SPEC.read_text())


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown properties refused at every level (catches misspelt fields)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def body_schema(swagger: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    for template, operations in swagger["paths"].items():
        prefix = template.split("{")[0]
        if template == path or ("{" in template and path.startswith(prefix)):
            operation = operations.get(method.lower())
            assert operation is not None, f"{method} {path} is not in Firecracker's API"
            [body] = [p for p in operation["parameters"] if p["in"] == "body"]
            return {**closed(body["schema"]), "definitions": closed(swagger["definitions"])}
    raise AssertionError(f"{path} is not in Firecracker's API")


SPECS = {
    "vsock only": dict(nics=(), rootfs=None),
    "bridged with rootfs": dict(nics=(NIC("rtap7", "02:00:00:00:00:07"),), rootfs=Path("/r.ext4")),
    "two NICs": dict(
        nics=(NIC("rtap7", "02:00:00:00:00:07"), NIC("rtap8", "02:00:00:00:00:08")), rootfs=None
    ),
}


@pytest.mark.parametrize("case", list(SPECS))
def test_every_boot_request_matches_firecrackers_schema(swagger: dict[str, Any], case: str) -> None:
    spec = LaunchSpec(
        name="vm-1",
        run_dir=RunDir(Path("/run/roost/vms/vm-1")),
        kernel=Path("/k/vmlinux"),
        initrd=Path("/k/initrd"),
        boot_args="console=ttyS0 roost.name=vm-1",
        vcpus=2,
        memory_mib=256,
        vsock=Vsock(3, Path("/run/roost/vms/vm-1/vsock.sock"), VsockBackend.FIRECRACKER),
        **SPECS[case],  # type: ignore[arg-type]
    )
    requests = boot_requests(spec)
    assert requests[-1] == ("PUT", "/actions", {"action_type": "InstanceStart"})
    for method, path, body in requests:
        errors = list(Draft4Validator(body_schema(swagger, method, path)).iter_errors(body))
        assert errors == [], f"{method} {path}: {[e.message for e in errors]}"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PATCH", "/vm", {"state": "Resumed"}),
    ],
)
def test_control_requests_match_firecrackers_schema(
    swagger: dict[str, Any], method: str, path: str, body: dict[str, Any]
) -> None:
    assert list(Draft4Validator(body_schema(swagger, method, path)).iter_errors(body)) == []


def test_the_contract_check_catches_a_misspelt_field(swagger: dict[str, Any]) -> None:
    schema = body_schema(swagger, "PUT", "/machine-config")
    assert list(Draft4Validator(schema).iter_errors({"vcpu_count": 1, "mem_size_mb": 128}))


def test_every_nic_is_one_network_interface_named_by_its_index_in_list_order() -> None:
    spec = LaunchSpec(
        name="vm-1",
        run_dir=RunDir(Path("/run/roost/vms/vm-1")),
        kernel=Path("/k/vmlinux"),
        initrd=Path("/k/initrd"),
        rootfs=None,
        boot_args="console=ttyS0",
        vcpus=1,
        memory_mib=128,
        nics=(NIC("rtap-b", "02:00:00:00:00:0b"), NIC("rtap-a", "02:00:00:00:00:0a")),
        vsock=None,
    )
    interfaces = [r for r in boot_requests(spec) if r[1].startswith("/network-interfaces/")]
    assert interfaces == [
        (
            "PUT",
            "/network-interfaces/eth0",
            {"iface_id": "eth0", "host_dev_name": "rtap-b", "guest_mac": "02:00:00:00:00:0b"},
        ),
        (
            "PUT",
            "/network-interfaces/eth1",
            {"iface_id": "eth1", "host_dev_name": "rtap-a", "guest_mac": "02:00:00:00:00:0a"},
        ),
    ]
