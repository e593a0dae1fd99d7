"""Fixtures shared by the integration and end-to-end tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    FIRECRACKER,
    INITRAMFS,
    KERNEL,
    Daemon,
    missing,
    network_namespace,
    short_tmp,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip, with the reason, what this machine cannot run."""
    gaps = missing([FIRECRACKER, KERNEL, INITRAMFS])
    reasons = {
        "root": None if os.geteuid() == 0 else "needs root (network namespaces)",
        "firecracker": (
            f"needs the test Firecracker binary and guest ({', '.join(gaps)}); run make setup"
            if gaps
            else None
        ),
        "kvm": None if Path("/dev/kvm").exists() else "Firecracker guests need /dev/kvm",
        "e2e": "needs build/demo; run make setup" if missing([KERNEL, INITRAMFS]) else None,
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def netns() -> Iterator[str]:
    with network_namespace() as name:
        yield name


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    path = short_tmp()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(netns: str) -> Iterator[Daemon]:
    """A daemon with a dhcp bridge (`brdhcp`, made by the test's "operator") in its netns."""
    from tests.harness import run

    run("ip", "link", "add", "brdhcp", "type", "bridge", netns=netns)
    run("ip", "link", "set", "brdhcp", "up", netns=netns)
    instance = Daemon(netns, "--dhcp-bridge", "brdhcp")
    try:
        yield instance.start()
    finally:
        instance.close()
