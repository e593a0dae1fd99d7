"""Human output prints values as they are: no emoji codes, no markup from error messages."""

from __future__ import annotations

import pytest
import typer

from roost.cli.output import fail, table
from roost.errors import ConflictError


def test_a_mac_holding_an_emoji_code_is_printed_as_it_is(
    capsys: pytest.CaptureFixture[str],
) -> None:
    table(["NAME", "MAC"], [["vm-1", "02:2e:f4:ab:5b:92"]])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["NAME  MAC", "vm-1  02:2e:f4:ab:5b:92"]


def test_an_error_message_is_not_read_as_markup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as exited:
        fail(ConflictError("VM [bold]x[/bold] is busy :ab:"), as_json=False)
    assert exited.value.exit_code == ConflictError("x").exit_code == 4
    assert capsys.readouterr().err == "error: VM [bold]x[/bold] is busy :ab:\n"
