"""The API of a real daemon under the requests a hostile or clumsy client sends: TCP without
the token or for another host, bodies that are not JSON or too large, clients that leave
halfway, and enough slow operations to fill every thread the API once had."""

from __future__ import annotations

import http.server
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import Daemon

pytestmark = [pytest.mark.root, pytest.mark.firecracker]


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def tcp_daemon(netns: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Daemon, str, str]]:
    """A daemon on its Unix socket and on a loopback TCP port, with a token; yields it, the
    TCP base URL and the token."""
    token = secrets.token_hex(16)
    monkeypatch.setenv("ROOST_TOKEN", token)
    port = free_loopback_port()
    daemon = Daemon(netns, "--listen", f"tcp://127.0.0.1:{port}", "--max-body-bytes", "65536")
    try:
        daemon.start()
        yield daemon, f"http://127.0.0.1:{port}", token
    finally:
        daemon.close()


def code_of(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def test_over_tcp_only_the_token_and_the_listeners_host_get_in(
    tcp_daemon: tuple[Daemon, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, base_url, token = tcp_daemon
    auth = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, timeout=30) as tcp:
        assert tcp.get("/healthz").status_code == 200
        nobody = tcp.get("/v1/vms")
        assert (nobody.status_code, code_of(nobody)) == (401, "unauthorized")
        wrong = tcp.get("/v1/vms", headers={"authorization": f"Bearer {token[:-1]}x"})
        assert (wrong.status_code, code_of(wrong)) == (401, "unauthorized")
        assert tcp.get("/v1/vms", headers=auth).json() == []
        # a web page's request, through DNS rebinding, names its own host
        rebound = tcp.get("/v1/vms", headers={**auth, "host": f"evil.example:{base_url[-5:]}"})
        assert (rebound.status_code, code_of(rebound)) == (421, "misdirected")
        assert tcp.get("/v1/vms", headers={**auth, "host": "localhost"}).status_code == 200
        # a form or text/plain post from a browser needs no preflight: refused as such
        form = tcp.post(
            "/v1/plugins",
            content=b'{"name": "p"}',
            headers={**auth, "content-type": "text/plain"},
        )
        assert (form.status_code, code_of(form)) == (415, "unsupported_media_type")
    # HTTP/1.0 without a Host at all
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(
            b"GET /v1/vms HTTP/1.0\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
        )
        assert b" 421 " in raw.recv(4096).split(b"\r\n")[0]
    # the Unix socket: no token, any Host
    assert daemon.http.get("/v1/vms", headers={"host": "evil.example"}).json() == []
    # the CLI sends $ROOST_TOKEN
    tcp_api = base_url.replace("http://", "tcp://")
    listed = daemon.cli("--api", tcp_api, "vm", "list", "--json")
    assert (listed.exit_code, listed.json()) == (0, [])
    monkeypatch.setenv("ROOST_TOKEN", "not-the-token")
    refused = daemon.cli("--api", tcp_api, "vm", "list", "--json")
    assert (refused.exit_code, refused.json()["error"]["code"]) == (5, "unauthorized")


def test_a_body_over_the_limit_is_answered_413_and_the_client_reads_the_answer(
    tcp_daemon: tuple[Daemon, str, str],
) -> None:
    daemon, _, _ = tcp_daemon
    json_type = {"content-type": "application/json"}
    big = b'{"name": "x", "plugin": "p", "labels": {"k": "' + b"a" * (64 << 20) + b'"}}'
    began = time.monotonic()
    by_length = daemon.http.post("/v1/vms", content=big, headers=json_type)
    took = time.monotonic() - began
    assert (by_length.status_code, code_of(by_length)) == (413, "too_large")

    def chunks() -> Iterator[bytes]:
        yield big[: 1 << 20]
        for _ in range(63):
            yield b"a" * (1 << 20)

    chunked = daemon.http.post("/v1/vms", content=chunks(), headers=json_type)
    assert (chunked.status_code, code_of(chunked)) == (413, "too_large")
    print(f"a 64 MiB body refused in {took:.2f}s")
    assert took < 30
    assert daemon.http.get("/v1/vms").json() == []
    assert "Traceback" not in daemon.logs()


def test_clients_that_leave_halfway_log_no_traceback_and_the_api_keeps_answering(
    daemon: Daemon,
) -> None:
    halves = [
        b"POST /v1/vms HTTP/1.1\r\nHost: roost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"name": "x", ',
        b"POST /v1/plugins HTTP/1.1\r\nHost: roost\r\nContent-Type: application/json\r\n"
        b'Transfer-Encoding: chunked\r\n\r\n10\r\n{"name": "p", "v',
        b"POST /v1/vms HTTP/1.1\r\nHost: roost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10\r\n\r\n",
        b"GET /v1/vms HTTP/1.1\r\nHost: ro",
    ]
    began = time.monotonic()
    for index in range(1000):
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(daemon.socket))
            client.sendall(halves[index % len(halves)])
    left = time.monotonic() - began
    began = time.monotonic()
    assert daemon.http.get("/healthz").status_code == 200
    answered = time.monotonic() - began
    time.sleep(0.5)  # what the daemon would log about the last ones
    print(f"1000 clients left in {left:.2f}s; /healthz then answered in {answered * 1000:.0f} ms")
    logs = daemon.logs()
    assert "Traceback" not in logs
    assert "Exception in ASGI application" not in logs
    assert "internal error" not in logs
    assert answered < 1
    assert daemon.http.get("/v1/vms").json() == []


class _SlowArtifacts(http.server.BaseHTTPRequestHandler):
    """Serves every path as a 1 MiB file that stalls after its first byte until `release` is
    set: a download that holds an operation thread for as long as the test wants."""

    release = threading.Event()
    started: list[str] = []

    def do_GET(self) -> None:
        size = 1 << 20
        self.send_response(200)
        self.send_header("content-length", str(size))
        self.end_headers()
        self.wfile.write(b"\0")
        self.wfile.flush()
        self.started.append(self.path)
        self.release.wait(60)
        self.wfile.write(b"\0" * (size - 1))

    def log_message(self, *_: Any) -> None:
        pass


def test_healthz_and_reads_answer_at_once_while_45_slow_installs_run(daemon: Daemon) -> None:
    _SlowArtifacts.release.clear()
    _SlowArtifacts.started.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowArtifacts)
    server.daemon_threads = True
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    port = server.server_address[1]
    results: list[int] = []

    def install(index: int) -> None:
        manifest = {
            "name": f"slow{index}",
            "version": "1",
            "initramfs": {"url": f"http://127.0.0.1:{port}/slow{index}.cpio"},
        }
        results.append(daemon.http.post("/v1/plugins", json=manifest).status_code)

    installs = [threading.Thread(target=install, args=(i,)) for i in range(45)]
    try:
        for thread in installs:
            thread.start()
        deadline = time.monotonic() + 30
        while len(_SlowArtifacts.started) < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_SlowArtifacts.started) >= 16, "the installs did not start downloading"
        timings = {}
        for path in ["/healthz", "/v1/vms", "/v1/plugins", "/v1/networks"]:
            began = time.monotonic()
            assert daemon.http.get(path, timeout=30).status_code == 200
            timings[path] = time.monotonic() - began
        downloading = len(_SlowArtifacts.started)
    finally:
        _SlowArtifacts.release.set()
        for thread in installs:
            thread.join(120)
        server.shutdown()
        server.server_close()
    print(
        f"with {downloading} installs downloading and the rest queued: "
        + ", ".join(f"{path} {took * 1000:.0f} ms" for path, took in timings.items())
    )
    assert max(timings.values()) < 1
    assert downloading == 16  # --max-operations' default: the other 29 wait their turn
    assert results == [201] * 45
    for index in range(45):
        daemon.http.delete(f"/v1/plugins/slow{index}")
