"""`roost vm connect`, `vm forward` and the daemon's forwards, as a user runs them: the CLI as a
process of its own (real stdin, stdout and signals) against roost's app under uvicorn whose
guests are fakes of a VMM's hybrid-vsock socket; the forwards' routes against a fake of
them."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from roost.api.endpoints import Endpoint
from roost.cli.main import app
from roost.errors import ConflictError
from tests.unit.test_api_vsock import TOKEN, Served, ServedApp

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(tmp_short: Path) -> Iterator[ServedApp]:
    with ServedApp(tmp_short) as served:
        yield served


def roost(served: ServedApp, *args: str, api: str | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "roost.cli.main",
        "--api",
        api or f"unix://{served.socket}",
        *args,
    ]


def spawn(argv: list[str], **options: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        **options,
    )


def finish(process: subprocess.Popen[bytes], stdin: bytes | None = None) -> tuple[int, bytes, str]:
    """The process's exit code, stdout and stderr once it ended (killed and reaped if it does
    not end within 30 s)."""
    try:
        out, err = process.communicate(stdin, timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"still running after 30 s: {err.decode()}") from None
    return process.returncode, out, err.decode()


def cli(served: ServedApp, *args: str) -> tuple[int, str, str]:
    """The CLI in-process, for what needs no stdin."""
    result = CliRunner().invoke(app, ["--api", f"unix://{served.socket}", *args])
    return result.exit_code, result.stdout, result.stderr


# ---- vm connect -------------------------------------------------------------------------


def test_connect_carries_a_mebibyte_through_stdin_and_stdout_intact(served: ServedApp) -> None:
    served.guest("v1")
    payload = os.urandom(1 << 20)
    code, out, err = finish(spawn(roost(served, "vm", "connect", "v1", "1024")), payload)
    assert (code, err) == (0, "")
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_connect_ends_when_the_guest_closes_though_stdin_is_still_open(
    served: ServedApp,
) -> None:
    async def answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"bye\n")
        writer.close()

    served.guest("v1", answer_and_close)
    process = spawn(roost(served, "vm", "connect", "v1", "1024"))
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"hi\n")
    process.stdin.flush()
    try:
        assert process.wait(10) == 0
        assert process.stdout.read() == b"bye\n"
    finally:
        finish(process)


def test_connect_waits_up_to_linger_seconds_for_a_reply_after_stdin_ends(
    served: ServedApp,
) -> None:
    async def slow_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        await asyncio.sleep(1.5)
        writer.write(b"pong")
        await writer.drain()
        await reader.read()

    served.guest("v1", slow_reply)
    began = time.monotonic()
    process = spawn(roost(served, "vm", "connect", "v1", "1024", "--linger", "3"))
    code, out, _ = finish(process, b"ping")
    assert (code, out) == (0, b"pong")
    assert time.monotonic() - began < 1.5 + 3 + 3  # the reply, the linger, a start-up


def test_ctrl_c_ends_connect_with_exit_0(served: ServedApp) -> None:
    served.guest("v1")
    process = spawn(roost(served, "vm", "connect", "v1", "1024"))
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(b"up?\n")
        process.stdin.flush()
        assert process.stdout.readline() == b"up?\n"  # connected and relaying
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        finish(process)


def test_connect_over_tcp_sends_the_token_from_the_environment(served: ServedApp) -> None:
    served.guest("v1")
    argv = roost(served, "vm", "connect", "v1", "1024", api=f"tcp://127.0.0.1:{served.tcp_port}")
    with_token = spawn(argv, env={**os.environ, "ROOST_TOKEN": TOKEN})
    assert finish(with_token, b"tcp") == (0, b"tcp", "")
    environment = {key: value for key, value in os.environ.items() if key != "ROOST_TOKEN"}
    code, _, err = finish(spawn(argv, env=environment), b"tcp")
    assert code == 5  # unauthorized
    assert "Authorization: Bearer" in err


def test_connect_to_an_unknown_vm_exits_3(served: ServedApp) -> None:
    code, _, err = cli(served, "vm", "connect", "ghost", "1024")
    assert code == 3
    assert "VM 'ghost' does not exist" in err


def test_connect_to_a_vm_whose_vmm_does_not_run_exits_4(served: ServedApp) -> None:
    served.engine.targets["stopped"] = ConflictError("VM 'stopped' is stopped")
    assert cli(served, "vm", "connect", "stopped", "1024")[0] == 4


def test_connect_to_a_port_nobody_answers_fails_within_its_timeout_naming_vm_and_port(
    served: ServedApp,
) -> None:
    served.guest("quiet", "silent")
    began = time.monotonic()
    code, _, err = cli(served, "vm", "connect", "quiet", "1024", "--timeout", "1")
    assert code == 6
    assert time.monotonic() - began < 3
    assert "cannot connect to vsock port 1024 of VM 'quiet' within 1s" in " ".join(err.split())


@pytest.mark.parametrize("args", [["v1", "0"], ["v1", "1024", "--timeout", "0"], ["Bad_", "1"]])
def test_connect_with_an_invalid_port_timeout_or_name_exits_1(
    served: ServedApp, args: list[str]
) -> None:
    served.guest("v1")
    assert cli(served, "vm", "connect", *args)[0] == 1


def test_connect_to_a_daemon_that_is_not_there_exits_5(served: ServedApp) -> None:
    result = CliRunner().invoke(
        app, ["--api", "unix:///nonexistent.sock", "vm", "connect", "v1", "1"]
    )
    assert result.exit_code == 5
    assert "cannot reach the roost daemon" in result.stderr


# ---- vm forward -------------------------------------------------------------------------


def listening(process: subprocess.Popen[bytes]) -> tuple[str, int]:
    """The address a `vm forward --json` listens on, from the line it prints."""
    assert process.stdout is not None
    printed = b""
    while not printed.endswith(b"}\n"):
        line = process.stdout.readline()
        assert line, "vm forward ended before it listened"
        printed += line
    host, _, port = json.loads(printed)["listen"].rpartition(":")
    return host, int(port)


def exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data` and end the sending side (a half-close) while reading to the end."""

    def send() -> None:
        try:
            connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)
        except OSError as error:  # the peer closed first, as a failed forward does
            if error.errno not in (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET):
                raise

    with socket.create_connection(address, timeout=10) as connection:
        sending = threading.Thread(target=send)
        sending.start()
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        sending.join()
        return received


class Forwarding:
    """`roost vm forward NAME SPEC --json` running as a process, listening at `address` (once
    the block is entered); `interrupt()` ends it with Ctrl-C: its exit code and stderr."""

    def __init__(self, served: ServedApp, name: str, spec: str) -> None:
        self.process = spawn(roost(served, "vm", "forward", name, spec, "--json"))

    def __enter__(self) -> Forwarding:
        try:
            self.address = listening(self.process)
        except BaseException:
            finish(self.process)
            raise
        return self

    def interrupt(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        code, _, err = finish(self.process)
        return code, err

    def __exit__(self, *_exc: object) -> None:
        if self.process.poll() is None:
            finish(self.process)


def test_forward_relays_each_tcp_connection_to_the_guest_until_ctrl_c(served: ServedApp) -> None:
    guest = served.guest("v1")
    with Forwarding(served, "v1", "127.0.0.1:0:1024") as forwarding:
        address = forwarding.address
        payload = os.urandom(256 * 1024)
        assert exchange(address, payload) == payload  # the reply outlives the half-close
        with (
            socket.create_connection(address, timeout=10) as first,
            socket.create_connection(address, timeout=10) as second,
        ):
            first.sendall(b"one")
            second.sendall(b"two")
            assert (first.recv(3), second.recv(3)) == (b"one", b"two")
        assert guest.connects == ["CONNECT 1024\n"] * 3
        code, err = forwarding.interrupt()
    assert code == 0
    assert "forwarding 127.0.0.1:" in err


def test_a_forwarded_connection_that_fails_is_reported_and_the_listener_stays(
    served: ServedApp,
) -> None:
    with Forwarding(served, "v1", "0:1024") as forwarding:  # no VM v1 yet
        assert exchange(forwarding.address, b"lost") == b""
        assert exchange(forwarding.address, b"lost again") == b""
        served.guest("v1")
        assert exchange(forwarding.address, b"found") == b"found"
        code, err = forwarding.interrupt()
    assert code == 0
    assert err.count("failed: VM 'v1' does not exist") == 2


@pytest.mark.parametrize(
    "spec",
    ["1024", "a:b", "8080:0", "8080:x", "70000:1024", ":8080:1024", "[::1:8080:1", "::1:80:1"],
)
def test_a_forward_spec_that_is_not_addr_hostport_guestport_exits_1(
    served: ServedApp, spec: str
) -> None:
    code, _, err = cli(served, "vm", "forward", "v1", spec)
    assert code == 1
    assert "[ADDR:]HOSTPORT:GUESTPORT" in err


def test_a_forward_on_an_address_in_use_exits_4(served: ServedApp) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, _, err = cli(served, "vm", "forward", "v1", f"{port}:1024")
    assert code == 4
    assert "in use" in err


# ---- the daemon's forwards --------------------------------------------------------------


class FakeForwards:
    """A fake of the daemon's forwards routes (another part of roost serves the real ones):
    forwards by VM in memory, 409 for a `listen` taken, 404 for an unknown id."""

    def __init__(self) -> None:
        self.forwards: dict[int, dict[str, Any]] = {}
        self.app = FastAPI()
        self.app.post("/v1/vms/{name}/forwards")(self.add)
        self.app.get("/v1/vms/{name}/forwards")(self.list)
        self.app.delete("/v1/vms/{name}/forwards/{forward_id}")(self.remove)

    async def add(self, name: str, request: Request) -> JSONResponse:
        body = await request.json()
        if any(forward["listen"] == body["listen"] for forward in self.forwards.values()):
            error = ConflictError(f"{body['listen']} is in use")
            return JSONResponse(error.to_json(), status_code=409)
        forward = {"id": len(self.forwards) + 1, **body}
        self.forwards[forward["id"]] = forward
        return JSONResponse(forward, status_code=201)

    async def list(self, name: str) -> JSONResponse:
        return JSONResponse(list(self.forwards.values()))

    async def remove(self, name: str, forward_id: int) -> Response:
        if self.forwards.pop(forward_id, None) is None:
            error = {"error": {"code": "not_found", "message": "no such forward", "details": []}}
            return JSONResponse(error, status_code=404)
        return Response(status_code=204)


@pytest.fixture
def forwards(tmp_short: Path) -> Iterator[tuple[FakeForwards, str]]:
    fake = FakeForwards()
    endpoint = Endpoint.parse(f"unix://{tmp_short / 'api.sock'}")
    with Served(fake.app, [endpoint]):
        yield fake, endpoint.url


def test_persisted_forwards_are_added_listed_and_removed_through_the_daemon(
    forwards: tuple[FakeForwards, str],
) -> None:
    fake, api = forwards

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, ["--api", api, "vm", *args])

    added = run("forward", "v1", "8080:1024", "--persist")
    assert (added.exit_code, added.stdout) == (0, "1\n")
    added = run("forward", "v1", "[::1]:8081:1025", "--persist", "--json")
    assert json.loads(added.stdout) == {"id": 2, "listen": "[::1]:8081", "guest_port": 1025}
    taken = run("forward", "v1", "127.0.0.1:8080:7", "--persist")
    assert taken.exit_code == 4
    assert "127.0.0.1:8080 is in use" in taken.stderr
    listed = run("forwards", "v1")
    assert listed.stdout.splitlines() == [
        "ID  LISTEN          GUEST PORT",
        "1   127.0.0.1:8080  1024",
        "2   [::1]:8081      1025",
    ]
    assert [f["id"] for f in json.loads(run("forwards", "v1", "--json").stdout)] == [1, 2]
    assert run("unforward", "v1", "1").exit_code == 0
    assert list(fake.forwards) == [2]
    assert run("unforward", "v1", "1").exit_code == 3
