"""A FAKE `cloud-hypervisor`, for tests on hosts where no real one runs. Standard library only.

It serves Cloud Hypervisor's REST API on `--api-socket PATH` (the one flag of the real
binary's it takes) and plays a VMM with no guest: `vm.create` stores the config and creates the
serial file (truncated, as Cloud Hypervisor does), `vm.boot` binds the hybrid vsock socket the
config names (whose clients' `CONNECT <port>` it refuses by closing them, as for a guest that
does not listen), `vm.pause`/`vm.resume` change the state `vm.info` reports, `vm.power-button`
ends it (its "guest" powers off at once), `vmm.shutdown` ends it. It records every request as
one JSON line `{"socket", "method", "path", "body"}`.

The fake's own flags come before `--api-socket` (`install` writes a wrapper that adds them):
`--record FILE`; `--ignore power-button|shutdown|sigterm` (repeatable: that request is answered
and changes nothing, or SIGTERM is ignored); `--refuse ACTION` (e.g. `vm.boot`: that request
gets a 500 with an error chain, as Cloud Hypervisor answers one it cannot do). Left alone,
SIGTERM kills it (exit status -15), so a test can tell which step of a stop ended it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

VERSION = "fake-cloud-hypervisor"


def install(directory: Path, *flags: str) -> Path:
    """An executable `cloud-hypervisor` in `directory` that runs this fake with `flags`."""
    path = directory / "cloud-hypervisor"
    fake = Path(__file__).resolve()
    words = " ".join(f"'{word}'" for word in (sys.executable, "-I", str(fake), *flags))
    path.write_text(f'#!/bin/sh\nexec {words} "$@"\n')
    path.chmod(0o755)
    return path


class Fake:
    """The VMM's state, shared by the request threads."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.lock = threading.Lock()
        self.config: dict[str, Any] | None = None
        self.state: str | None = None  # None until created, then Created, Running, Paused
        self.vsock: socket.socket | None = None
        self.ending = False  # set by a request that ends the VMM once it is answered

    def record(self, method: str, path: str, body: Any) -> None:
        if self.options.record is None:
            return
        line = {"socket": self.options.api_socket, "method": method, "path": path, "body": body}
        with self.lock, open(self.options.record, "a") as sink:
            sink.write(json.dumps(line) + "\n")

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """The status and JSON body of the answer to one request."""
        action = path.removeprefix("/api/v1/")
        if action in self.options.refuse:
            return 500, [f"Error handling {action}", "refused by the fake, as the test asked"]
        with self.lock:
            match method, action:
                case "GET", "vmm.ping":
                    return 200, {"version": VERSION, "pid": os.getpid()}
                case "GET", "vm.info":
                    if self.config is None:
                        return 404, ["VM is not created"]
                    return 200, {"config": self.config, "state": self.state}
                case "PUT", "vm.create":
                    return self._create(body)
                case "PUT", "vm.boot":
                    return self._boot()
                case "PUT", "vm.pause":
                    return self._change("Running", "Paused")
                case "PUT", "vm.resume":
                    return self._change("Paused", "Running")
                case "PUT", "vm.power-button":
                    if self.state not in ("Running", "Paused"):
                        return 405, ["VM is not booted"]
                    self.ending = "power-button" not in self.options.ignore
                    return 204, None
                case "PUT", "vmm.shutdown":
                    self.ending = "shutdown" not in self.options.ignore
                    return 204, None
        return 404, [f"unknown endpoint {method} {path}"]

    def _create(self, body: Any) -> tuple[int, Any]:
        if self.config is not None:
            return 400, ["VM is already created"]
        if not isinstance(body, dict) or "payload" not in body:
            return 400, ["invalid VM config: no payload"]
        serial = body.get("serial", {})
        if serial.get("mode") == "File":
            Path(serial["file"]).write_bytes(b"")
        self.config, self.state = body, "Created"
        return 204, None

    def _boot(self) -> tuple[int, Any]:
        if self.config is None:
            return 404, ["VM is not created"]
        if self.state != "Created":
            return 400, ["VM is already booted"]
        vsock = self.config.get("vsock")
        if vsock is not None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(vsock["socket"])
            except OSError as error:
                listener.close()
                return 500, ["Error booting VM", f"cannot bind {vsock['socket']}: {error}"]
            listener.listen()
            self.vsock = listener
            threading.Thread(target=refuse_connects, args=(listener,), daemon=True).start()
        serial = self.config.get("serial", {})
        if serial.get("mode") == "File":
            with open(serial["file"], "a") as console:
                console.write("fake cloud-hypervisor: booted (no guest runs)\n")
        self.state = "Running"
        return 204, None

    def _change(self, before: str, after: str) -> tuple[int, Any]:
        if self.config is None:
            return 404, ["VM is not created"]
        if self.state != before:
            return 405, [f"VM is {self.state}, not {before}"]
        self.state = after
        return 204, None


def refuse_connects(listener: socket.socket) -> None:
    """Take each host connection's `CONNECT <port>` line and close it: no guest listens."""
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(1)
            with contextlib.suppress(OSError):
                connection.recv(64)


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fake: Fake


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # connections kept open, as Cloud Hypervisor's
    server: Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        fake = self.server.fake
        fake.record(self.command, self.path, body)
        try:
            status, answer = fake.handle(self.command, self.path, body)
        except Exception as error:  # a config it cannot read: refused, never a dropped line
            status, answer = 500, ["fake cloud-hypervisor failed", repr(error)]
        data = b"" if answer is None else json.dumps(answer).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        if fake.ending:  # the answer is out: stop serving, and exit
            threading.Thread(target=self.server.shutdown, daemon=True).start()

    do_GET = do_PUT = _serve  # noqa: N815 (the names http.server looks for)

    def log_message(self, format: str, *args: Any) -> None:
        print(f"fake cloud-hypervisor: {format % args}", file=sys.stderr, flush=True)

    def address_string(self) -> str:
        return "api-socket"  # a Unix socket's peer has no address


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record")
    parser.add_argument(
        "--ignore", action="append", default=[], choices=["power-button", "shutdown", "sigterm"]
    )
    parser.add_argument("--refuse", action="append", default=[])
    parser.add_argument("--api-socket", required=True)
    options = parser.parse_args()
    if "sigterm" in options.ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fake = Fake(options)
    with Server(options.api_socket, Handler) as server:
        server.fake = fake
        try:
            server.serve_forever(poll_interval=0.05)
        finally:
            os.unlink(options.api_socket)  # as Cloud Hypervisor does on its way out


if __name__ == "__main__":
    main()
