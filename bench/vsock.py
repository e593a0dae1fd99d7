"""vsock benchmark: one bridged QEMU VM of the demo plugin under a real roost daemon, and the
same transfers through its vsock device (roost's own, on the VM's `uds_path`) and through its
TCP NIC, in the same run; then connection set-up latency on `uds_path` and through the API.

The guest's bench service (vsock and TCP port 1025, see roost/image/guest/init) takes
`sink <N>` (it reads N bytes and answers `done <N>`) and `source <N>` (it sends N bytes); the
client code is the same for both transports. The NIC is reached from inside the daemon's
network namespace, where the bridge's host side lives. Prints one JSON line of figures on
stdout; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/

import httpx

from bench._common import (
    cleanup,
    cpu_seconds,
    expect,
    latency_ms,
    log,
    main,
    namespace,
    netns_path,
)
from roost.host.netns import NetnsWorker
from tests.harness import (
    DEMO,
    INITRAMFS,
    KERNEL,
    Daemon,
    demo_plugin,
    missing,
    process_alive,
    short_tmp,
    wait_ready,
)

VM = "bench"
PLUGIN = "roost-demo"
BENCH_PORT = 1025  # the demo guest's bench service, on vsock and TCP
ECHO_PORT = 1024  # the demo guest's vsock echo
CHUNK = 1 << 20  # bytes per send and per receive buffer, on every path
TARGET_RATIO = 0.8  # vsock MiB/s ÷ NIC MiB/s, each direction
TARGET_UDS_P50_MS = 5.0
READY_TIMEOUT = 120.0  # a TCG boot takes a few seconds; the harness retries a hung one once
IO_TIMEOUT = 60.0
PATHS = ("vsock", "nic", "api")
DIRECTIONS = {"host_to_guest": "sink", "guest_to_host": "source"}


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a network namespace, a bridge and taps)"
    if shutil.which("qemu-system-x86_64") is None:
        return "no qemu-system-x86_64 (apt-get install qemu-system-x86)"
    gaps = missing([DEMO / "plugin.json", KERNEL, INITRAMFS])
    if gaps:
        return f"missing {', '.join(gaps)} (make setup builds them)"
    return None


# ---- the bench protocol, over any connected stream ------------------------------------------


class Stream:
    """A connected socket and what was read past the last line."""

    def __init__(self, sock: socket.socket, pending: bytes = b"") -> None:
        self.sock = sock
        self.pending = pending
        sock.settimeout(IO_TIMEOUT)

    def line(self, limit: int = 128) -> bytes:
        while b"\n" not in self.pending:
            if len(self.pending) > limit:
                raise RuntimeError(f"no line within {limit} bytes: {self.pending[:80]!r}")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"the peer closed before a whole line ({self.pending!r})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line + b"\n"

    def close(self) -> None:
        self.sock.close()


def hybrid_connect(uds_path: str, port: int) -> Stream:
    """Firecracker's hybrid vsock: `CONNECT <port>`, answered `OK <hostport>`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(IO_TIMEOUT)
        sock.connect(uds_path)
        sock.sendall(b"CONNECT %d\n" % port)
        stream = Stream(sock)
        answer = stream.line()
    except BaseException:
        sock.close()
        raise
    if not answer.startswith(b"OK "):
        sock.close()
        raise RuntimeError(f"CONNECT {port} on {uds_path} was answered {answer!r}")
    return stream


def sink(stream: Stream, nbytes: int, payload: memoryview) -> float:
    """Seconds from the request to the guest's `done` for `nbytes` sent host → guest."""
    started = time.perf_counter()
    stream.sock.sendall(b"sink %d\n" % nbytes)
    left = nbytes
    while left:
        piece = payload[: min(left, len(payload))]
        stream.sock.sendall(piece)
        left -= len(piece)
    answer = stream.line()
    elapsed = time.perf_counter() - started
    if answer != b"done %d\n" % nbytes:
        raise RuntimeError(f"sink {nbytes} was answered {answer!r}")
    return elapsed


def source(stream: Stream, nbytes: int, buffer: bytearray) -> float:
    """Seconds from the request to the last of `nbytes` sent guest → host."""
    view = memoryview(buffer)
    started = time.perf_counter()
    stream.sock.sendall(b"source %d\n" % nbytes)
    got = len(stream.pending)
    while got < nbytes:
        n = stream.sock.recv_into(view[: min(len(view), nbytes - got)])
        if not n:
            raise RuntimeError(f"source {nbytes}: the guest closed after {got} bytes")
        got += n
    elapsed = time.perf_counter() - started
    if got != nbytes:
        raise RuntimeError(f"source {nbytes}: {got} bytes came")
    return elapsed


# ---- the same through the API's WebSocket ---------------------------------------------------


async def _ws_open(api_socket: Path, port: int) -> Any:
    from websockets.asyncio.client import unix_connect

    uri = f"ws://localhost/v1/vms/{VM}/vsock/{port}?timeout=10"
    return await unix_connect(
        str(api_socket), uri, compression=None, max_size=None, open_timeout=30
    )


async def _ws_transfer(api_socket: Path, direction: str, nbytes: int, payload: bytes) -> float:
    """One transfer through `GET /v1/vms/{name}/vsock/1025`, as `roost vm connect` makes it:
    binary messages both ways (timed from the request, the WebSocket already open)."""
    websocket = await _ws_open(api_socket, BENCH_PORT)
    try:
        started = time.perf_counter()
        if direction == "sink":
            await websocket.send(b"sink %d\n" % nbytes)
            left = nbytes
            while left:
                piece = payload[: min(left, len(payload))]
                await websocket.send(piece)
                left -= len(piece)
            answer = b""
            while not answer.endswith(b"\n"):
                answer += await websocket.recv(decode=False)
            if answer != b"done %d\n" % nbytes:
                raise RuntimeError(f"sink {nbytes} through the API was answered {answer!r}")
        else:
            await websocket.send(b"source %d\n" % nbytes)
            got = 0
            while got < nbytes:
                got += len(await websocket.recv(decode=False))
        return time.perf_counter() - started
    finally:
        await websocket.close()


async def _ws_latencies(api_socket: Path, count: int) -> tuple[list[float], list[str]]:
    """Seconds from the request until the upgrade completed (the daemon has dialled the guest's
    echo port first), one connection at a time, and the failures. Each connection then has a
    byte echoed (untimed), so the guest has accepted it before the next one comes: its echo
    forks per connection, and unpaced connections would overflow its accept backlog."""
    from websockets.exceptions import InvalidHandshake

    samples, failures = [], []
    for _ in range(count):
        started = time.perf_counter()
        try:
            websocket = await _ws_open(api_socket, ECHO_PORT)
        except (OSError, InvalidHandshake, TimeoutError) as error:
            failures.append(repr(error))
            continue
        samples.append(time.perf_counter() - started)
        try:
            await websocket.send(b"x")
            await websocket.recv(decode=False)
        finally:
            await websocket.close()
    return samples, failures


def _uds_latencies(uds_path: str, count: int) -> tuple[list[float], list[str]]:
    """Seconds from connect() on `uds_path` until `OK`, paced as `_ws_latencies` is."""
    samples, failures = [], []
    for _ in range(count):
        started = time.perf_counter()
        try:
            stream = hybrid_connect(uds_path, ECHO_PORT)
        except (OSError, RuntimeError) as error:
            failures.append(repr(error))
            continue
        samples.append(time.perf_counter() - started)
        try:
            stream.sock.sendall(b"x")
            if stream.sock.recv(1) != b"x":
                raise RuntimeError(f"the echo on port {ECHO_PORT} did not echo")
        finally:
            stream.close()
    return samples, failures


# ---- the VM, and what its processes spend ---------------------------------------------------


@dataclass
class Target:
    """The running VM as the benchmark reaches it."""

    uds_path: str
    ip: str
    qemu_pid: int
    backend_pid: int
    daemon_pid: int
    accel: str
    worker: NetnsWorker  # a thread inside the daemon's namespace, for the NIC's sockets
    api_socket: Path

    def open(self, path: str) -> Stream:
        if path == "vsock":
            return hybrid_connect(self.uds_path, BENCH_PORT)
        address = (self.ip, BENCH_PORT)
        # a socket belongs to the namespace it was made in: only the connect runs in there
        return Stream(self.worker.run(lambda: socket.create_connection(address, timeout=10)))


@dataclass
class Sample:
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds used meanwhile


def _cpu(target: Target) -> dict[str, float]:
    return {
        "backend": cpu_seconds(target.backend_pid),
        "qemu": cpu_seconds(target.qemu_pid),
        "daemon": cpu_seconds(target.daemon_pid),  # the API's relay
        "client": cpu_seconds(os.getpid()),  # this script, all its threads
    }


def measure(target: Target, path: str, direction: str, nbytes: int) -> Sample:
    payload = os.urandom(CHUNK)
    before = _cpu(target)
    if path == "api":
        seconds = asyncio.run(_ws_transfer(target.api_socket, direction, nbytes, payload))
    else:
        stream = target.open(path)
        try:
            if direction == "sink":
                seconds = sink(stream, nbytes, memoryview(payload))
            else:
                seconds = source(stream, nbytes, bytearray(CHUNK))
        finally:
            stream.close()
    after = _cpu(target)
    return Sample(seconds, {name: after[name] - before[name] for name in before})


def _accel(pid: int) -> str:
    words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for flag, value in itertools.pairwise(words):
        if flag == b"-accel":
            return value.decode()
    return "unknown"


# ---- the benchmark -------------------------------------------------------------------------


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """The harness prints a retried boot on stdout, which is reserved for the figures."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _start(daemon: Daemon, plugin_dir: Path) -> dict[str, Any]:
    """The daemon, the demo plugin and the VM, through the API (an interrupt reaches us, not a
    CLI that would turn it into an exit status)."""
    daemon.start()
    manifest = demo_plugin(
        plugin_dir, PLUGIN, network={"mode": "bridged"}, resources={"vcpus": 1, "memory_mib": 256}
    ).read_bytes()
    headers = {"content-type": "application/json"}
    expect(daemon.http.post("/v1/plugins", content=manifest, headers=headers), 201)
    expect(daemon.http.post("/v1/vms", json={"name": VM, "plugin": PLUGIN, "start": True}), 201)
    with _stdout_to_stderr():
        wait_ready(daemon, VM, timeout=READY_TIMEOUT)
    return expect(daemon.http.get(f"/v1/vms/{VM}"), 200)


def _remove(daemon: Daemon) -> None:
    """A forced stop (nothing to keep), then DELETE, through the API; again while the VM is
    busy (an interrupted create or restart is still finishing in the daemon)."""
    if daemon.process is None or daemon.process.poll() is not None:
        return
    deadline = time.monotonic() + 60
    for method, path in (("POST", f"/v1/vms/{VM}/stop?force=true"), ("DELETE", f"/v1/vms/{VM}")):
        while True:
            try:
                response = daemon.http.request(method, path)
            except httpx.HTTPError as error:
                log(f"{method} {path}: {error}")
                return
            if response.status_code == 404:
                return
            if response.status_code != 409 or time.monotonic() > deadline:
                break
            time.sleep(0.1)


def _mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / (1 << 20) / seconds


def run(mib: int, rounds: int, connections: int) -> dict[str, Any]:
    reason = skip_reason()
    if reason is not None:
        return {"benchmark": "vsock", "skipped": reason}
    nbytes = mib << 20
    samples: dict[tuple[str, str], list[Sample]] = {}
    pids: list[int] = []
    with cleanup() as stack:
        netns = namespace(stack)
        daemon = Daemon(netns, "--vmm", "qemu", firecracker=None)
        stack.callback(daemon.close)
        stack.callback(_remove, daemon)
        log(f"starting roost serve --vmm qemu in {netns} and booting {VM} (demo plugin)")
        plugin_dir = short_tmp()
        stack.callback(shutil.rmtree, plugin_dir, ignore_errors=True)
        vm = _start(daemon, plugin_dir)
        worker = NetnsWorker(netns)
        stack.callback(worker.close)
        uds_path = vm["vsock"]["uds_path"]
        qemu_pid = vm["vmm"]["pid"]
        backend_pid = int((Path(uds_path).parent / "vsock.pid").read_text())
        assert daemon.process is not None
        pids += [qemu_pid, backend_pid]
        target = Target(
            uds_path=uds_path,
            ip=vm["network"]["ip"],
            qemu_pid=qemu_pid,
            backend_pid=backend_pid,
            daemon_pid=daemon.process.pid,  # the daemon, not its VMMs' supervisor
            accel=_accel(qemu_pid),
            worker=worker,
            api_socket=daemon.socket,
        )
        log(
            f"{VM} is ready: {target.ip}, vsock {uds_path} (backend {vm['vsock']['backend']}), "
            f"QEMU pid {qemu_pid} ({target.accel}), vsock device pid {backend_pid}"
        )
        api_refused = _api_refusal(daemon.socket)
        paths = PATHS if api_refused is None else tuple(p for p in PATHS if p != "api")
        if api_refused is not None:
            log(f"not through the API: {api_refused}")
        for number in range(rounds):
            # the paths take turns going first, so none always runs on a fresher guest
            order = paths[number % len(paths) :] + paths[: number % len(paths)]
            for path in order:
                for direction, request in DIRECTIONS.items():
                    sample = measure(target, path, request, nbytes)
                    samples.setdefault((path, direction), []).append(sample)
                    log(
                        f"round {number + 1}/{rounds} {path} {direction}: "
                        f"{_mib_s(nbytes, sample.seconds):.1f} MiB/s"
                    )
        log(f"connection set-up: {connections} x CONNECT {ECHO_PORT} on uds_path")
        uds_samples, uds_failures = _uds_latencies(uds_path, connections)
        api_samples: list[float] = []
        api_failures: list[str] = []
        if api_refused is None:
            log(f"connection set-up: {connections} x the API's WebSocket to port {ECHO_PORT}")
            api_samples, api_failures = asyncio.run(_ws_latencies(daemon.socket, connections))
        for what, failed in (("uds_path", uds_failures), ("API", api_failures)):
            if failed:
                log(f"{len(failed)} connections through {what} failed, e.g. {failed[0]}")
    left = [f"pid {pid}" for pid in pids if process_alive(pid)]
    left += [f"netns {netns}"] if netns_path(netns).exists() else []
    left += [f"dir {daemon.dir}"] if daemon.dir.exists() else []
    result = figures(samples, nbytes, rounds, uds_samples, api_samples, target.accel, left)
    result |= {"connect_uds_failed": len(uds_failures), "connect_api_failed": len(api_failures)}
    return result | ({"api_skipped": api_refused} if api_refused else {})


def _api_refusal(api_socket: Path) -> str | None:
    """Why the API's vsock WebSocket cannot be measured (e.g. a daemon without the route), or
    None when one opens."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus

    async def probe() -> None:
        websocket = await _ws_open(api_socket, ECHO_PORT)
        await websocket.close()

    try:
        asyncio.run(probe())
    except InvalidStatus as refusal:
        body = refusal.response.body or b""
        return (
            f"GET /v1/vms/{VM}/vsock/{ECHO_PORT} answered {refusal.response.status_code}: "
            + (body.decode(errors="replace")[:200])
        )
    except (OSError, InvalidHandshake, TimeoutError) as error:
        return f"the WebSocket did not open: {error!r}"
    return None


def figures(
    samples: dict[tuple[str, str], list[Sample]],
    nbytes: int,
    rounds: int,
    uds: list[float],
    api: list[float],
    accel: str,
    leftovers: list[str],
) -> dict[str, Any]:
    """The figures of a run: each path and direction by its best transfer; the API's are
    null when it was not measured (no samples)."""
    best = {key: min(values, key=lambda s: s.seconds) for key, values in samples.items()}
    rate: dict[tuple[str, str], float | None] = {
        (path, direction): None for path in PATHS for direction in DIRECTIONS
    }
    rate |= {key: round(_mib_s(nbytes, sample.seconds), 1) for key, sample in best.items()}
    ratio = {  # the same bytes both ways: MiB/s over MiB/s is seconds over seconds
        direction: round(best["nic", direction].seconds / best["vsock", direction].seconds, 3)
        for direction in DIRECTIONS
    }
    uds_ms, api_ms = latency_ms(uds), latency_ms(api) if api else None
    meets = min(ratio.values()) >= TARGET_RATIO and uds_ms["p50"] <= TARGET_UDS_P50_MS
    result: dict[str, Any] = {"benchmark": "vsock", "vmm": "qemu", "accel": accel}
    for path in PATHS:
        for direction in DIRECTIONS:
            result[f"{path}_{direction}_mib_s"] = rate[path, direction]
    result |= {
        "throughput_ratio_host_to_guest": ratio["host_to_guest"],
        "throughput_ratio_guest_to_host": ratio["guest_to_host"],
        "connect_uds_ms": uds_ms,
        "connect_api_ms": api_ms,
        "mib_per_transfer": nbytes >> 20,
        "rounds": rounds,
        "connections": len(uds),
        "round_mib_s": {
            f"{path}_{direction}": [round(_mib_s(nbytes, s.seconds), 1) for s in values]
            for (path, direction), values in samples.items()
        },
        # CPU seconds per wall second of the best transfer: 1.0 is one CPU kept busy
        "cpu_share_of_best": {
            f"{path}_{direction}": {
                name: round(used / sample.seconds, 2) for name, used in sample.cpu.items()
            }
            for (path, direction), sample in best.items()
        },
        # what each process spent per MiB moved in the best transfer
        "cpu_ms_per_mib_of_best": {
            f"{path}_{direction}": {
                name: round(used * 1000 / (nbytes / (1 << 20)), 2)
                for name, used in sample.cpu.items()
            }
            for (path, direction), sample in best.items()
        },
        "targets": {"throughput_ratio": TARGET_RATIO, "connect_uds_p50_ms": TARGET_UDS_P50_MS},
        "meets_targets": meets,
        "leftovers": leftovers,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    return result


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64, help="MiB per transfer (default 64)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="transfers per path and direction; the best counts"
    )
    parser.add_argument(
        "--connections", type=int, default=200, help="connections timed per set-up figure"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    sys.exit(
        main(
            lambda: run(
                min(max(1, options.mib), 1024),
                max(1, options.rounds),
                max(1, options.connections),
            )
        )
    )
