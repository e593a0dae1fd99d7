"""How the CLI talks to people and scripts: JSON on stdout, tables for humans, errors on
stderr, and exit codes scripts can trust."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

from roost.errors import ExitCode, RoostError

if TYPE_CHECKING:
    from rich.console import Console

# What rich's print changes in text printed without markup: control codes it drops, tabs it
# expands, and whitespace it trims at a line's end (beyond the terminal's width). A line free
# of them is written as it is, without importing rich (most of a short command's start).
REWRITTEN_BY_RICH = frozenset("\t\a\b\v\f\r")


class LazyConsole:
    """A rich Console made when first used, with the settings every roost command prints with."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr

    @cached_property
    def console(self) -> Console:
        from rich.console import Console

        # no emoji codes: a MAC such as 02:2e:f4:ab:5b:92 holds ":ab:", which rich would draw as 🆎
        return Console(stderr=self._stderr, highlight=False, soft_wrap=True, emoji=False)

    def print(self, *objects: Any, **options: Any) -> None:
        self.console.print(*objects, **options)


out = LazyConsole(stderr=False)
err = LazyConsole(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def fail(error: RoostError, as_json: bool) -> NoReturn:
    """Report `error` (stderr for people, the error object on stdout with --json) and exit."""
    if as_json:
        print_json(error.to_json())
    import typer  # imported where a command fails: `vm show` (roost.cli.fast) runs without it
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(error.message)}", markup=True)
    for detail in error.details:
        if f"{detail.loc}: {detail.msg}" != error.message:
            err.print(f"  {detail.loc}: {detail.msg}", markup=False)
    raise typer.Exit(error.exit_code)


def usage_error(message: str) -> NoReturn:
    """A command line that cannot mean anything (exit 2): what was wrong and what to write."""
    import typer

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
    plain_lines(
        "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def fields(pairs: Sequence[tuple[str, Any]]) -> None:
    """A two-column key/value listing for `show`-style output."""
    width = max(len(key) for key, _ in pairs)
    plain_lines(f"{key.ljust(width)}  {_cell(value)}" for key, value in pairs)


def plain_lines(lines: Iterable[str]) -> None:
    """`lines` on stdout, exactly as rich prints them without markup or highlighting: written
    as they are when rich would change nothing, else by rich."""
    texts = list(lines)
    if all(_unchanged_by_rich(text) for text in texts):
        sys.stdout.write("".join(f"{text}\n" for text in texts))
        sys.stdout.flush()
    else:
        for text in texts:
            out.print(text, markup=False, highlight=False)


def _unchanged_by_rich(text: str) -> bool:
    return REWRITTEN_BY_RICH.isdisjoint(text) and not any(
        line[-1:].isspace() for line in text.split("\n")
    )


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"
