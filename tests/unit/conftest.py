"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine_fakes import World
from tests.vsock_guest import Rig


@pytest.fixture
def world(tmp_short: Path) -> Iterator[World]:
    """An engine on fakes (no root), with plugin `p`: bridged, auto-assigned on SUBNET. Its
    root is short: a jailed VM's sockets sit deep below it, and Unix socket paths are short."""
    instance = World(tmp_short)
    yield instance
    instance.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    """The vsock backend on a fake guest (tests/vsock_guest.py), with the defaults."""
    with Rig() as instance:
        yield instance
