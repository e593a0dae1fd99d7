"""The roost command line: offline tools, the daemon (`roost serve`) and its client.

This module stays light: `roost --version` answers before the command tree (Typer and every
command module) is imported, and `app` is imported from roost.cli.commands when first asked
for.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from roost.cli import VERSION_LINE

if TYPE_CHECKING:
    import typer


def main() -> None:
    # the same line and exit code as the --version option of the tree, without building it
    if sys.argv[1:] == ["--version"]:
        sys.stdout.write(f"{VERSION_LINE}\n")
        return
    from roost.cli.commands import app

    app()


def __getattr__(name: str) -> typer.Typer:
    if name == "app":
        from roost.cli.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
