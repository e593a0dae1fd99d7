"""The roost command line: offline tools, the daemon (`roost serve`) and its client.

This module stays light: `roost --version` answers before the command tree (Typer and every
command module) is imported, a plain `roost vm show NAME` runs without it (roost.cli.fast),
and `app` is imported from roost.cli.commands when first asked for.
"""

from __future__ import annotations

import sys

from roost.cli import VERSION_LINE

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing for `roost --version`

if TYPE_CHECKING:
    import typer


def main() -> None:
    # the same line and exit code as the --version option of the tree, without building it
    if sys.argv[1:] == ["--version"]:
        sys.stdout.write(f"{VERSION_LINE}\n")
        return
    from roost.cli.fast import run_vm_show, vm_show_args

    show = vm_show_args(sys.argv[1:])
    if show is not None:
        run_vm_show(show)
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
