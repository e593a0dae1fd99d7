"""`serve --stop-timeout`: how long the stops that name no timeout wait for the guest."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from roost.cli.main import app
from roost.engine.settings import Settings
from roost.spec import VMConfig
from roost.vmm.process import VMMProcess
from tests.engine_fakes import World


def test_stops_that_name_no_timeout_wait_the_daemons_stop_timeout(world: World) -> None:
    object.__setattr__(world.settings, "stop_timeout", 0.25)
    waited: list[float] = []
    stop = world.driver.stop

    def recording(process: VMMProcess, timeout: float, force: bool) -> int | None:
        waited.append(timeout)
        return stop(process, timeout, force)

    world.driver.stop = recording  # type: ignore[method-assign]
    world.engine.create_vm("a", VMConfig(plugin="p"))
    world.engine.restart_vm("a")
    world.engine.stop_vm("a")
    world.engine.start_vm("a")
    world.engine.stop_vm("a", timeout=7)
    assert waited == [0.25, 0.25, 7]


@pytest.mark.parametrize(("given", "expected"), [([], 3.0), (["--stop-timeout", "0.5"], 0.5)])
def test_serve_passes_its_stop_timeout_to_the_daemon(
    monkeypatch: pytest.MonkeyPatch, given: list[str], expected: float
) -> None:
    seen: list[Settings] = []

    def serve(settings: Settings, endpoints: Any) -> None:
        seen.append(settings)

    monkeypatch.setattr("roost.api.server.serve", serve)
    result = CliRunner().invoke(app, ["serve", "--state-dir", "/nonexistent/roost", *given])
    assert result.exit_code == 0, result.output
    assert [settings.stop_timeout for settings in seen] == [expected]


@pytest.mark.parametrize("value", ["-1", "3601", "soon"])
def test_serve_refuses_a_stop_timeout_out_of_range_as_a_usage_error(value: str) -> None:
    result = CliRunner().invoke(app, ["serve", "--stop-timeout", value])
    assert result.exit_code == 2
    assert "--stop-timeout" in result.output
