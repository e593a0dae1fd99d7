"""`roost image build-demo`: a bootable demo plugin built from Debian packages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roost.cli.apps import app
from roost.cli.output import err, out, print_json
from roost.errors import ExitCode

image_app = typer.Typer(help="Guest images.", no_args_is_help=True)
app.add_typer(image_app, name="image")


@image_app.command("build-demo")
def build_demo_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the plugin.")] = Path(
        "build/demo"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Download (never install) a Debian cloud kernel and busybox, and build the demo plugin:
    an ELF vmlinux, an initramfs and a plugin.json with sha256s. A rerun reuses its work."""
    from rich.progress import BarColumn, Progress, TaskID, TextColumn

    from roost.image.demo import ImageBuildError, build_demo

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        console=err.console,
        disable=as_json,
        transient=False,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def report(step: str, done: int | None, total: int | None) -> None:
            if step not in tasks:
                for earlier in tasks.values():  # a new step means the earlier ones are done
                    progress.update(earlier, total=1, completed=1)
                tasks[step] = progress.add_task(step, total=total)
            progress.update(tasks[step], completed=done or 0, total=total)

        try:
            manifest = build_demo(out_dir, progress=report)
        except ImageBuildError as error:
            err.print(f"error: {error}", markup=False)
            raise typer.Exit(ExitCode.FAILURE) from None
    if as_json:
        print_json({"manifest": str(manifest)})
    else:
        out.print(f"demo plugin: {manifest}", markup=False)
