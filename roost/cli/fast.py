"""`roost vm show NAME`, the hottest read, without Typer: importing it takes ~28 ms, building
every command's parameters from their signatures ~25 ms more, and importing every command
module about as long again.

Only a command line whose meaning is plain takes this path: `--api URL` pairs, then
`vm show NAME`, with `--json` before or after NAME. It runs the same functions Typer would
call (the root's options, then `vm show`), and ends as Typer's main loop ends each way they can
end: the exit code a command raises, 130 on Ctrl-C, 1 on a closed stdout. Anything else (help,
another option, a value that looks like an option, shell completion) goes to Typer.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class VMShow:
    api: str | None
    name: str
    as_json: bool


def vm_show_args(args: list[str]) -> VMShow | None:
    """`args` as a plain `vm show`, or None when Typer must read them."""
    if any(name.startswith("_") and name.endswith("_COMPLETE") for name in os.environ):
        return None  # a shell asks for completions
    api = None
    rest = args
    while rest[:1] == ["--api"]:
        if len(rest) < 2 or not _plain(rest[1]):
            return None
        api, rest = rest[1], rest[2:]  # as in Typer, the last one given wins
    if rest[:2] != ["vm", "show"]:
        return None
    words = [word for word in rest[2:] if word != "--json"]
    flags = len(rest) - 2 - len(words)
    if len(words) != 1 or not _plain(words[0]) or flags > 1:
        return None
    return VMShow(api, words[0], as_json=flags == 1)


def _plain(word: str) -> bool:
    return bool(word) and not word.startswith("-")


def run_vm_show(command: VMShow) -> None:
    """The command as Typer would run it, ending as Typer's main loop ends."""
    from roost.cli.reach import set_globals
    from roost.cli.views import show_vm

    try:
        set_globals(api=command.api)
        show_vm(command.name, as_json=command.as_json)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as error:
        if error.errno != errno.EPIPE:
            raise
        try:  # Typer's own copy of click (0.29 and later), else click itself
            from typer._click.utils import PacifyFlushWrapper
        except ImportError:
            from click.utils import PacifyFlushWrapper  # type: ignore[no-redef]

        sys.stdout = PacifyFlushWrapper(sys.stdout)
        sys.stderr = PacifyFlushWrapper(sys.stderr)
        sys.exit(1)
    except Exception as error:
        import typer  # imported already by the failure (roost.cli.output.fail) that raised Exit

        if not isinstance(error, typer.Exit):
            raise
        sys.exit(error.exit_code)
