"""How the CLI talks to people and scripts: JSON on stdout, tables for humans, errors on
stderr, and exit codes scripts can trust."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from roost.errors import ExitCode, RoostError

# no emoji codes: a MAC such as 02:2e:f4:ab:5b:92 holds ":ab:", which rich would draw as 🆎
out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def fail(error: RoostError, as_json: bool) -> NoReturn:
    """Report `error` (stderr for people, the error object on stdout with --json) and exit."""
    if as_json:
        print_json(error.to_json())
    err.print(f"[red]error:[/red] {escape(error.message)}", markup=True)
    for detail in error.details:
        if f"{detail.loc}: {detail.msg}" != error.message:
            err.print(f"  {detail.loc}: {detail.msg}", markup=False)
    raise typer.Exit(error.exit_code)


def usage_error(message: str) -> NoReturn:
    """A command line that cannot mean anything (exit 2): what was wrong and what to write."""
    err.print(f"error: {message}", markup=False)
    raise typer.Exit(ExitCode.USAGE)


@contextmanager
def reporting(as_json: bool) -> Iterator[None]:
    """Turn any `RoostError` raised inside into the right output and exit code."""
    try:
        yield
    except RoostError as error:
        fail(error, as_json)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table (no borders, no trailing spaces), easy on eyes and on `awk`."""
    cells = [list(columns), *[[_cell(value) for value in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        line = "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True))
        out.print(line.rstrip(), markup=False, highlight=False)


def fields(pairs: Sequence[tuple[str, Any]]) -> None:
    """A two-column key/value listing for `show`-style output."""
    width = max(len(key) for key, _ in pairs)
    for key, value in pairs:
        out.print(f"{key.ljust(width)}  {_cell(value)}", markup=False, highlight=False)


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"
