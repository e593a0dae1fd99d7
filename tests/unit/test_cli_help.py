"""Every command's --help reads in an 80-column terminal: no line is longer, and no option's
name or metavar is cut short."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from roost.cli.main import app


def command_paths() -> list[list[str]]:
    """Every command and group of the CLI, as the words that name it."""
    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():  # a group's commands
            walk(sub, [*path, name])

    walk(root, [])
    return paths


def test_the_walk_finds_the_config_commands() -> None:
    assert ["vm", "config", "patch"] in command_paths()


@pytest.mark.parametrize("path", command_paths(), ids=lambda path: " ".join(path) or "roost")
def test_help_fits_80_columns_and_cuts_nothing(path: list[str]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, result.output
    assert "…" not in result.output
    command: Any = typer.main.get_command(app)
    for word in path:
        command = command.commands[word]
    for parameter in command.params:
        for option in getattr(parameter, "opts", []) + getattr(parameter, "secondary_opts", []):
            if option.startswith("-"):
                assert option in result.output, f"{option} is missing from the help"
