"""What every benchmark shares: one JSON line on stdout, diagnostics on stderr, percentiles,
and clean-up that still runs on Ctrl-C or SIGTERM (and cannot be cut short by a second one)."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

NETNS_DIR = Path("/run/netns")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def log(message: str) -> None:
    """Progress for the operator; stdout is reserved for the figures."""
    print(message, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in (0, 100]: an observed value, never an interpolation (the
    p99 of 1,000 samples is the 990th smallest)."""
    if not values or not 0 < q <= 100:
        raise ValueError("percentile needs samples and 0 < q <= 100")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p99 and the worst of `seconds` samples, in milliseconds (nearest rank)."""
    return {
        "p50": round(percentile(seconds, 50) * 1000, 3),
        "p99": round(percentile(seconds, 99) * 1000, 3),
        "max": round(max(seconds) * 1000, 3),
    }


def cpu_seconds(pid: int) -> float:
    """CPU time process `pid` has used so far: every live thread's time on a CPU, from
    /proc/<pid>/task/*/schedstat in nanoseconds (/proc/<pid>/stat counts 10 ms ticks, too coarse
    for a transfer of a fraction of a second). Threads that have ended are not counted."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            total += schedstat_ns((task / "schedstat").read_text())
    return total / 1e9


def expect(response: httpx.Response, status: int) -> dict[str, Any]:
    """A response of the daemon's API that must have `status`: its JSON body ({} when it has
    none), or RuntimeError naming the request and what came instead."""
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text}"
        )
    return dict(response.json()) if response.content else {}


def schedstat_ns(text: str) -> int:
    """Nanoseconds on a CPU, the first of a schedstat line's three fields."""
    fields = text.split()
    if len(fields) != 3:
        raise ValueError(f"not a schedstat line: {text!r}")
    return int(fields[0])


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(benchmark: Callable[[], dict[str, Any]]) -> int:
    """Run `benchmark` and print its figures. SIGTERM and SIGHUP interrupt it like Ctrl-C does,
    so its `finally` clean-up runs in every case."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        figures = benchmark()
    except KeyboardInterrupt:
        log("interrupted: cleaned up, no figures")
        return 130
    sys.stdout.write(json.dumps(figures) + "\n")
    sys.stdout.flush()
    return 0


@contextlib.contextmanager
def cleanup() -> Iterator[contextlib.ExitStack]:
    """An exit stack whose callbacks run with SIGINT/SIGTERM/SIGHUP ignored: once clean-up has
    begun, impatience cannot leave half of it undone."""
    stack = contextlib.ExitStack()
    try:
        yield stack
    finally:
        previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in SIGNALS}
        try:
            stack.close()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def namespace(stack: contextlib.ExitStack) -> str:
    """A fresh network namespace `roost-t-<hex>`, deleted when `stack` closes (after SIGKILLing,
    by PID, anything still running inside it)."""
    name = f"roost-t-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    stack.callback(delete_namespace, name)
    return name


def delete_namespace(name: str) -> None:
    pids = subprocess.run(
        ["ip", "netns", "pids", name], check=False, capture_output=True, text=True
    ).stdout
    for pid in map(int, pids.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket (the daemon's, Firecracker's API), kept alive for all of one
    client's requests: a client this light leaves the two cores to what is measured."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self.sock = sock
