"""Fixtures of the end-to-end tests: real guests need the demo plugin `make setup` builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import DEMO


@pytest.fixture
def demo_plugin() -> Path:
    plugin = DEMO / "plugin.json"
    if not plugin.exists():
        pytest.skip(f"{plugin} is missing; run make setup")
    return plugin
