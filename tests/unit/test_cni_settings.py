"""`serve --cni-conf-dir` and `--cni-bin-dir` (repeatable, searched in order): what the daemon's
CNI runtime (`Engine.cni`) reads conflists from and runs plugins from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from roost.cli.main import app
from roost.engine.settings import Settings
from tests.engine_fakes import World


@pytest.mark.parametrize(
    ("given", "conf_dir", "bin_dirs"),
    [
        ([], Path("/etc/cni/net.d"), (Path("/usr/lib/cni"), Path("/opt/cni/bin"))),
        (
            ["--cni-conf-dir", "/srv/net.d", "--cni-bin-dir", "/srv/b", "--cni-bin-dir", "/srv/a"],
            Path("/srv/net.d"),
            (Path("/srv/b"), Path("/srv/a")),
        ),
    ],
)
def test_serve_passes_its_cni_dirs_to_the_daemon(
    monkeypatch: pytest.MonkeyPatch, given: list[str], conf_dir: Path, bin_dirs: tuple[Path, ...]
) -> None:
    seen: list[Settings] = []

    def serve(settings: Settings, endpoints: Any) -> None:
        seen.append(settings)

    monkeypatch.setattr("roost.api.server.serve", serve)
    result = CliRunner().invoke(app, ["serve", "--state-dir", "/nonexistent/roost", *given])
    assert result.exit_code == 0, result.output
    assert [(s.cni_conf_dir, s.cni_bin_dirs) for s in seen] == [(conf_dir, bin_dirs)]


def test_the_engine_runs_cni_plugins_from_the_settings_dirs(world: World) -> None:
    settings = world.engine.settings
    assert (world.engine.cni.conf_dir, world.engine.cni.bin_dirs) == (
        settings.cni_conf_dir,
        settings.cni_bin_dirs,
    )
