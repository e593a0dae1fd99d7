"""The non-network fields of manifests, VM configs and patches."""

from __future__ import annotations

from typing import Any

import pytest

from roost.errors import InvalidError
from roost.spec import Artifact, Manifest, VMConfig, VMConfigPatch, parse

BASE: dict[str, Any] = {"name": "web", "version": "1.0.0", "initramfs": {"path": "i.cpio"}}
SHA = "ab" * 32


def locs(model: type[Any], data: dict[str, Any]) -> list[str]:
    with pytest.raises(InvalidError) as caught:
        parse(model, data)
    return [detail.loc for detail in caught.value.details]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"name": "Web"}, ["name"]),
        ({"name": "-web"}, ["name"]),
        ({"name": "w" * 64}, ["name"]),
        ({"name": "web_1"}, ["name"]),
        ({"version": ""}, ["version"]),
        ({"version": "1 0"}, ["version"]),
        ({"schema_version": "2"}, ["schema_version"]),
        ({"colour": "blue"}, ["colour"]),
        ({"initramfs": None}, ["-"]),
        ({"initramfs": {"path": "i", "url": "https://x/i"}}, ["initramfs"]),
        ({"initramfs": {}}, ["initramfs"]),
        ({"initramfs": {"path": "i", "sha256": "xyz"}}, ["initramfs.sha256"]),
        ({"initramfs": {"path": "i", "checksum": SHA}}, ["initramfs.checksum"]),
        ({"kernel": {"url": "ftp://x/vmlinux"}}, ["kernel.url"]),
        ({"kernel": {"path": ""}}, ["kernel.path"]),
        ({"resources": {"vcpus": 0}}, ["resources.vcpus"]),
        ({"resources": {"vcpus": 33}}, ["resources.vcpus"]),
        ({"resources": {"vcpus": "2"}}, ["resources.vcpus"]),
        ({"resources": {"vcpus": True}}, ["resources.vcpus"]),
        ({"resources": {"memory_mib": 15}}, ["resources.memory_mib"]),
        ({"resources": {"memory": 64}}, ["resources.memory"]),
        ({"boot_args": "console=ttyS0 ip=dhcp"}, ["boot_args"]),
        ({"boot_args": "roost.name=other"}, ["boot_args"]),
        ({"labels": {"": "x"}}, ["labels"]),
        ({"labels": {"team": 3}}, ["labels.team"]),
        ({"network": {"mode": "vsock", "bridge": "br0"}}, ["network.bridge"]),
    ],
)
def test_manifest_field_errors(change: dict[str, Any], expected: list[str]) -> None:
    assert locs(Manifest, {**BASE, **change}) == expected


def test_manifest_defaults_and_normalisation() -> None:
    parsed = parse(
        Manifest,
        {
            **BASE,
            "kernel": {"url": "https://example.com/vmlinux", "sha256": SHA.upper()},
            "rootfs": {"path": "/abs/rootfs.ext4"},
            "boot_args": "  console=ttyS0   quiet ",
            "labels": {"b": "2", "a": "1"},
        },
    )
    assert parsed.schema_version == "1"
    assert parsed.resources.vcpus == 1
    assert parsed.resources.memory_mib == 128
    assert parsed.kernel is not None
    assert parsed.kernel.sha256 == SHA
    assert parsed.boot_args == "console=ttyS0 quiet"
    assert list(parsed.labels) == ["a", "b"]
    assert set(parsed.artifacts()) == {"kernel", "initramfs", "rootfs"}


def test_rootfs_alone_is_enough_and_kernel_is_optional() -> None:
    data = {"name": "db", "version": "2", "rootfs": {"path": "root.ext4"}}
    assert parse(Manifest, data).kernel is None


def test_relative_artifact_paths_resolve_against_the_manifest_folder() -> None:
    assert Artifact(path="i.cpio").resolve("/srv/p").path == "/srv/p/i.cpio"
    assert Artifact(path="../k/vmlinux").resolve("/srv/p").path == "/srv/p/../k/vmlinux"
    assert Artifact(path="/abs/i").resolve("/srv/p").path == "/abs/i"
    assert Artifact(url="https://x/i").resolve("/srv/p").url == "https://x/i"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, ["plugin"]),
        ({"plugin": "Web"}, ["plugin"]),
        ({"plugin": "web", "resources": {"vcpus": 64}}, ["resources.vcpus"]),
        ({"plugin": "web", "network": {"mode": "vsock", "ip": "10.0.0.2"}}, ["network.ip"]),
        ({"plugin": "web", "name": "x"}, ["name"]),
        (
            {"plugin": "web", "network": {"mode": "bridged", "subnet": "10.0.0.0/24"}},
            ["network.gateway"],
        ),
    ],
)
def test_vm_config_errors(data: dict[str, Any], expected: list[str]) -> None:
    assert locs(VMConfig, data) == expected


CONFIG = VMConfig.model_validate(
    {
        "plugin": "web",
        "resources": {"vcpus": 2, "memory_mib": 512},
        "boot_args": "quiet",
        "network": {"mode": "dhcp"},
        "labels": {"team": "a"},
    }
)


@pytest.mark.parametrize(
    ("patch", "check"),
    [
        ({}, lambda c: c == CONFIG),
        (
            {"resources": {"vcpus": 4}},
            lambda c: (c.resources.vcpus, c.resources.memory_mib) == (4, 512),
        ),
        (
            {"resources": {"vcpus": None}},
            lambda c: (c.resources.vcpus, c.resources.memory_mib) == (None, 512),
        ),
        (
            {"resources": None},
            lambda c: c.resources.vcpus is None and c.resources.memory_mib is None,
        ),
        (
            {"network": {"ip": "10.57.0.9"}},
            lambda c: (
                c.network is not None and c.network.mode is None and c.network.ip == "10.57.0.9"
            ),
        ),
        ({"network": None}, lambda c: c.network is None and c.boot_args == "quiet"),
        ({"boot_args": None}, lambda c: c.boot_args is None and c.network == CONFIG.network),
        ({"labels": None}, lambda c: c.labels == {}),
        ({"labels": {"x": "y"}}, lambda c: c.labels == {"team": "a", "x": "y"}),  # merged
        ({"labels": {"team": None}}, lambda c: c.labels == {}),
    ],
)
def test_patch_semantics(patch: dict[str, Any], check: Any) -> None:
    patched = parse(VMConfigPatch, patch).apply(CONFIG)
    assert check(patched)
    assert patched.plugin == "web"


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"plugin": "other"}, ["plugin"]),
        ({"resources": {"vcpus": 0}}, ["resources.vcpus"]),
        ({"network": {"mode": "vsock", "subnet": "10.0.0.0/24"}}, ["network.subnet"]),
    ],
)
def test_patch_errors(patch: dict[str, Any], expected: list[str]) -> None:
    assert locs(VMConfigPatch, patch) == expected
