"""How long the CLI takes from exec to exit: `roost --version`, `roost vm show NAME` and
`roost vm list -q`, each run as a fresh process against a running daemon (started here, in a
throwaway network namespace), beside `python3 -c pass` in the same run, alternating so that a
change in the machine's load falls on every command alike.

Prints one JSON line: the median and p90 wall time of each command in milliseconds, each
command's median over `python3 -c pass`'s, and whether the targets hold (`--version` within
80 ms and `vm show` within 110 ms of `python3 -c pass`).

    .venv/bin/python bench/cli.py [--runs 20]   # as root
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

from bench._common import cleanup, expect, log, main, namespace, netns_path, percentile
from tests.harness import Daemon, write_plugin

PLUGIN = "bench-cli"
VM = "cli-0"
TARGETS_MS = {"version": 80.0, "vm_show": 110.0}  # over `python3 -c pass`, median


def roost_argv() -> list[str]:
    """The installed `roost` entry point beside this interpreter (what a user runs)."""
    script = Path(sys.executable).parent / "roost"
    if not script.exists():
        raise RuntimeError(f"{script} is missing: pip install -e . installs the roost command")
    return [str(script)]


def commands(api: str, quiet_list: bool) -> dict[str, list[str]]:
    roost = roost_argv()
    return {
        "python_pass": [sys.executable, "-c", "pass"],
        "version": [*roost, "--version"],
        "vm_show": [*roost, "--api", api, "vm", "show", VM],
        "vm_list": [*roost, "--api", api, "vm", "list", "-q" if quiet_list else "--json"],
    }


def has_quiet_list(api: str) -> bool:
    """Whether this tree's `roost vm list` has -q yet (else the benchmark times --json)."""
    help_text = subprocess.run(
        [*roost_argv(), "--api", api, "vm", "list", "--help"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return "--quiet" in help_text


def wall_time(argv: list[str]) -> float:
    """Seconds from spawning `argv` to reaping it; a failure is an error, not a figure."""
    started = time.perf_counter()
    finished = subprocess.run(argv, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"{argv} exited {finished.returncode}: {finished.stderr.decode()}")
    return seconds


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(percentile(seconds, 50) * 1000, 1),
        "p90_ms": round(percentile(seconds, 90) * 1000, 1),
    }


def benchmark(runs: int) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"benchmark": "cli", "skipped": "needs root (the daemon runs in its own netns)"}
    with cleanup() as stack:
        netns = namespace(stack)
        daemon = Daemon(netns)
        stack.callback(daemon.close)
        daemon.start()
        manifest = write_plugin(daemon.dir, PLUGIN)
        headers = {"content-type": "application/json"}
        expect(daemon.http.post("/v1/plugins", content=manifest.read_bytes(), headers=headers), 201)
        body = {"name": VM, "plugin": PLUGIN, "start": False}
        expect(daemon.http.post("/v1/vms", json=body), 201)
        quiet = has_quiet_list(daemon.api)
        argvs = commands(daemon.api, quiet)
        for argv in argvs.values():  # warm the page cache and the .pyc files
            wall_time(argv)
        samples: dict[str, list[float]] = {name: [] for name in argvs}
        for number in range(runs):
            for name, argv in argvs.items():
                samples[name].append(wall_time(argv))
            log(f"run {number + 1}/{runs}")
    left = [f"netns {netns}"] if netns_path(netns).exists() else []
    figures = {name: summary(seconds) for name, seconds in samples.items()}
    base = figures["python_pass"]["median_ms"]
    over = {name: round(figures[name]["median_ms"] - base, 1) for name in argvs}
    return {
        "benchmark": "cli",
        "runs": runs,
        **figures,
        "over_python_pass_ms": {name: ms for name, ms in over.items() if name != "python_pass"},
        "vm_list_form": "-q" if quiet else "--json (no -q in this tree yet)",
        "targets_over_python_pass_ms": TARGETS_MS,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "leftovers": left,
        "meets_targets": all(over[name] <= limit for name, limit in TARGETS_MS.items()),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each command (default 20)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    sys.exit(main(lambda: benchmark(args.runs)))
