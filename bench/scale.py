"""Scale benchmark: one daemon filled with up to N VM records (bridged, `start: false`) by 8
client threads, in steps, to see whether what an operation costs grows with the number of VMs.

A real `roost serve` in a throwaway network namespace; no VMM is started. At each step: the
creates/s of that step and the daemon's RSS; at 1,000 and at N: `GET /v1/vms` p50/p99 and
`GET /v1/vms/{name}` p50; at N also a first page, a page from the middle and a filtered page
(`limit=100`), and `roost vm list -q`'s wall time; then every VM is deleted by 8 threads.
Prints one JSON line of figures on stdout; see bench/README.md.

    .venv/bin/python bench/scale.py [--max 10000]   # as root
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

from bench._common import (
    UnixHTTPConnection,
    cleanup,
    cpu_seconds,
    expect,
    latency_ms,
    log,
    main,
    namespace,
    percentile,
)
from tests.harness import Daemon, short_tmp, write_plugin

PLUGIN = "scale"
SUBNET = ipaddress.IPv4Network("10.212.0.0/16")  # room for 65,533 VMs
CLIENTS = 8
STEPS = (100, 1_000, 2_500, 5_000, 10_000)
GROUPS = 10  # each VM has label group=g<i % GROUPS>, for the filtered page
LIST_SAMPLES = {1_000: 30, 10_000: 10}  # whole listings timed at each mark (fewer when slow)
SHOW_SAMPLES = 200
PAGE_SAMPLES = 50
TARGETS = {
    "create_rate_ratio": 0.8,  # last step's creates/s ÷ the first's, at least
    "list_p50_ms_at_1000": 100.0,
    "page_p50_ms_at_max": 20.0,
    "rss_mib_at_1000": 150.0,
    "delete_over_slowest_create": 0.5,
}


class UnixClient(UnixHTTPConnection):
    """The daemon's API, kept alive for all of one thread's requests."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, timeout=300)

    def call(self, method: str, path: str, body: Any = None, status: int = 200) -> bytes:
        """The response's body; RuntimeError when its status is not `status`."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        payload = None if body is None else json.dumps(body)
        try:
            self.request(method, path, payload, headers)
            response = self.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            if method != "GET":  # only a read is safe to send twice
                raise
            self.close()  # the server ended a connection left idle; open another
            self.request(method, path, payload, headers)
            response = self.getresponse()
        text = response.read()
        if response.status != status:
            raise RuntimeError(f"{method} {path}: {response.status} {text.decode()[:500]}")
        return text


def vm_name(index: int) -> str:
    return f"s{index:05d}"


def in_threads(
    socket_path: Path, items: Sequence[int], work: Callable[[UnixClient, int], None]
) -> float:
    """Run `work` for every item on CLIENTS threads (each with its own connection, taking the
    next item as it is free); the wall time in seconds. The first error is raised."""
    pending = iter(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        client = UnixClient(socket_path)
        try:
            while not errors:
                with lock:
                    item = next(pending, None)
                if item is None:
                    return
                work(client, item)
        except BaseException as error:  # handed to the main thread
            errors.append(error)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(CLIENTS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return seconds


def create(client: UnixClient, index: int) -> None:
    body = {
        "name": vm_name(index),
        "plugin": PLUGIN,
        "start": False,
        "labels": {"group": f"g{index % GROUPS}"},
    }
    client.call("POST", "/v1/vms", body, status=201)


def delete(client: UnixClient, index: int) -> None:
    client.call("DELETE", f"/v1/vms/{vm_name(index)}", status=204)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def memory(pid: int) -> dict[str, Any]:
    """The daemon's RSS and each process it started (its supervisor, when one runs)."""
    return {
        "daemon_rss_mib": rss_mib(pid),
        "children_rss_mib": {str(child): rss_mib(child) for child in children(pid)},
    }


def timed(client: UnixClient, path: str, samples: int) -> list[float]:
    seconds = []
    for _ in range(samples):
        started = time.perf_counter()
        client.call("GET", path)
        seconds.append(time.perf_counter() - started)
    return seconds


def listings(client: UnixClient, count: int, pid: int) -> dict[str, Any]:
    """Whole listings and single VMs' views, once `count` VMs exist; with the daemon's CPU time
    per listing, which others' load on the machine changes far less than the wall time."""
    started = time.perf_counter()
    body = client.call("GET", "/v1/vms")  # the first: each VM's JSON made (later ones kept)
    first_ms = (time.perf_counter() - started) * 1000
    found = json.loads(body)
    if len(found) != count:
        raise RuntimeError(f"GET /v1/vms gave {len(found)} VMs, {count} exist")
    samples = LIST_SAMPLES.get(count, 5)
    shown = [f"/v1/vms/{vm_name(random.randrange(count))}" for _ in range(SHOW_SAMPLES)]
    show_seconds = []
    for path in shown:
        started = time.perf_counter()
        client.call("GET", path)
        show_seconds.append(time.perf_counter() - started)
    cpu = cpu_seconds(pid)
    listed = timed(client, "/v1/vms", samples)
    list_cpu_ms = (cpu_seconds(pid) - cpu) / samples * 1000
    return {
        "list_ms": latency_ms(listed),
        "first_list_ms": round(first_ms, 3),
        "list_cpu_ms": round(list_cpu_ms, 1),
        "list_samples": samples,
        "list_bytes": len(body),
        "show_p50_ms": round(percentile(show_seconds, 50) * 1000, 3),
    }


def pages(client: UnixClient, count: int) -> dict[str, Any]:
    """Pages of 100: the first, one from the middle (after=NAME), one filtered by label."""
    paths = {
        "first_page": "/v1/vms?limit=100",
        "middle_page": "/v1/vms?" + urlencode({"limit": 100, "after": vm_name(count // 2)}),
        "label_page": "/v1/vms?" + urlencode({"limit": 100, "label": "group=g3"}),
    }
    return {
        f"{what}_p50_ms": round(percentile(timed(client, path, PAGE_SAMPLES), 50) * 1000, 3)
        for what, path in paths.items()
    }


def cli_list_seconds(api: str, count: int) -> float | None:
    """`roost vm list -q`'s wall time (None while this tree's vm list has no -q)."""
    roost = Path(sys.executable).parent / "roost"
    help_text = subprocess.run(
        [str(roost), "vm", "list", "--help"], capture_output=True, text=True, check=False
    ).stdout
    if "--quiet" not in help_text:
        return None
    started = time.perf_counter()
    listed = subprocess.run(
        [str(roost), "--api", api, "vm", "list", "-q"], capture_output=True, text=True, check=True
    ).stdout.split()
    seconds = time.perf_counter() - started
    if len(listed) != count:
        raise RuntimeError(f"roost vm list -q gave {len(listed)} names, {count} exist")
    return round(seconds, 3)


def steps_to(maximum: int) -> list[int]:
    return [step for step in STEPS if step < maximum] + [maximum]


def verdict(figures: dict[str, Any], maximum: int) -> dict[str, bool]:
    """Each target (those whose mark the run reached)."""
    steps = figures["steps"]
    rates = [step["creates_per_second"] for step in steps]
    checks = {
        "create_rate_ratio": rates[-1] >= TARGETS["create_rate_ratio"] * rates[0],
        "delete_rate": figures["deletes_per_second"]
        >= TARGETS["delete_over_slowest_create"] * min(rates),
    }
    at_1000 = figures["at"].get("1000")
    if at_1000 is not None:
        checks["list_p50_at_1000"] = at_1000["list_ms"]["p50"] <= TARGETS["list_p50_ms_at_1000"]
        rss = next(step["daemon_rss_mib"] for step in steps if step["vms"] == 1_000)
        checks["rss_at_1000"] = rss <= TARGETS["rss_mib_at_1000"]
    paged = figures["at"][str(maximum)]
    checks["page_p50_at_max"] = (
        max(paged[key] for key in ("first_page_p50_ms", "middle_page_p50_ms", "label_page_p50_ms"))
        <= TARGETS["page_p50_ms_at_max"]
    )
    return checks


def run(maximum: int) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"benchmark": "scale", "skipped": "needs root (network namespaces)"}
    with cleanup() as stack:
        daemon = Daemon(namespace(stack))
        stack.callback(daemon.close)
        stack.callback(daemon.stop)  # before close: 10,000 deletes at the end are not needed
        base = short_tmp()
        stack.callback(lambda: subprocess.run(["rm", "-rf", str(base)], check=False))
        daemon.start()
        assert daemon.process is not None
        pid = daemon.process.pid
        manifest = write_plugin(
            base,
            PLUGIN,
            resources={"vcpus": 1, "memory_mib": 128},
            network={
                "mode": "bridged",
                "subnet": str(SUBNET),
                "gateway": str(SUBNET.network_address + 1),
                "auto_assign": True,
            },
        )
        headers = {"content-type": "application/json"}
        expect(daemon.http.post("/v1/plugins", content=manifest.read_bytes(), headers=headers), 201)
        figures: dict[str, Any] = {"steps": [], "at": {}}
        client = UnixClient(daemon.socket)
        stack.callback(client.close)
        made = 0
        for step in steps_to(maximum):
            cpu = cpu_seconds(pid)
            seconds = in_threads(daemon.socket, range(made, step), create)
            rate = (step - made) / seconds
            cpu_ms = (cpu_seconds(pid) - cpu) / (step - made) * 1000
            made = step
            figures["steps"].append(
                {
                    "vms": step,
                    "creates_per_second": round(rate, 1),
                    "daemon_cpu_ms_per_create": round(cpu_ms, 2),
                    **memory(pid),
                }
            )
            log(f"{step} VMs: {rate:.1f} creates/s, daemon RSS {rss_mib(pid)} MiB")
            if step in (1_000, maximum):
                figures["at"][str(step)] = listings(client, step, pid)
                log(f"  listings at {step}: {figures['at'][str(step)]}")
        figures["at"][str(maximum)] |= pages(client, maximum)
        figures["vm_list_q_seconds"] = cli_list_seconds(daemon.api, maximum)
        log(f"  pages and CLI at {maximum}: {figures['at'][str(maximum)]}")
        cpu = cpu_seconds(pid)
        seconds = in_threads(daemon.socket, range(maximum), delete)
        figures["deletes_per_second"] = round(maximum / seconds, 1)
        figures["daemon_cpu_ms_per_delete"] = round((cpu_seconds(pid) - cpu) / maximum * 1000, 2)
        log(f"deleted {maximum} VMs: {figures['deletes_per_second']} deletes/s")
        figures["after_deletes"] = memory(pid)
        if json.loads(client.call("GET", "/v1/vms")):
            raise RuntimeError("VMs remain after every one was deleted")
    checks = verdict(figures, maximum)
    return {
        "benchmark": "scale",
        "max_vms": maximum,
        "clients": CLIENTS,
        **figures,
        "targets": TARGETS,
        "checks": checks,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "meets_targets": all(checks.values()),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max", type=int, default=10_000, help="VMs at the last step")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    sys.exit(main(lambda: run(max(100, min(options.max, 65_000)))))
