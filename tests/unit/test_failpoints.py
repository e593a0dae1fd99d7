"""Every step an operation records has a failpoint id in `failpoints.STEPS`, every id there is
reached by its operation, in the table's order, and the README lists exactly these ids."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from roost.engine import failpoints, steps
from roost.engine.steps import Steps
from roost.spec import VMConfig
from tests.engine_fakes import World

README = Path(__file__).parents[2] / "README.md"


def test_every_id_is_reached_in_the_tables_order(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached: list[str] = []
    monkeypatch.setattr(steps, "failpoint", reached.append)
    engine = world.engine
    engine.create_vm("vm", VMConfig(plugin="p"))
    engine.pause_vm("vm")
    engine.resume_vm("vm")
    engine.stop_vm("vm")
    engine.start_vm("vm")
    engine.restart_vm("vm")
    engine.destroy_vm("vm")
    assert reached == list(failpoints.STEPS)


def test_a_step_without_an_id_is_refused() -> None:
    with pytest.raises(AssertionError, match="no id"):
        Steps("stop", "vm").done("unlisted", "something")


def test_the_readme_lists_every_id() -> None:
    listed = re.findall(r"^\| `([a-z]+:[a-z-]+)` \|", README.read_text(), re.MULTILINE)
    assert listed == list(failpoints.STEPS)
