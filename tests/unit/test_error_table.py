"""The README's error table is the one in `roost.errors.CODES`, row for row, and the CLI
rebuilds every code a daemon can send with its own exit code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from roost.errors import CODES, RoostError, error_from_json

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(?P<code>[a-z_]+)` \| (?P<http>\d{3}) \| (?P<exit>\d) \|", re.MULTILINE)


def test_the_readme_lists_every_error_code_with_its_status_and_exit_code() -> None:
    documented = {
        row["code"]: (int(row["http"]), int(row["exit"]))
        for row in ROW.finditer(README.read_text())
    }
    assert documented == {code: (c.http_status, c.exit_code) for code, c in CODES.items()}


@pytest.mark.parametrize("code", sorted(CODES))
def test_an_error_a_daemon_sends_exits_as_its_code_says(code: str) -> None:
    sent = RoostError("it went wrong", code=code)
    rebuilt = error_from_json(sent.http_status, sent.to_json())
    assert (rebuilt.code, rebuilt.exit_code) == (code, CODES[code].exit_code)


def test_a_code_the_cli_does_not_know_is_judged_by_its_status() -> None:
    rebuilt = error_from_json(409, {"error": {"code": "brand_new", "message": "m"}})
    assert (rebuilt.code, rebuilt.exit_code) == ("conflict", 4)
    assert "brand_new" in rebuilt.message
