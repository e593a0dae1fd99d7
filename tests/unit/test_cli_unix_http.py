"""The CLI's own HTTP/1.1 over a Unix socket (roost.cli.unix_http) against a server that
answers with exactly the bytes each test gives: every framing of a body HTTP/1.1 allows, an
interim answer, and what is not HTTP or ends too soon as the failures the client tells apart."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from roost.cli.unix_http import TransportError, TransportTimeoutError, UnixHTTP


class OneAnswer:
    """A Unix socket that takes one request and answers it with `answer`, then closes."""

    def __init__(self, path: Path, answer: bytes, *, hold: bool = False) -> None:
        self.request = b""
        self._answer, self._hold = answer, hold
        self._released = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        connection, _ = self._server.accept()
        with connection:
            while b"\r\n\r\n" not in self.request:
                self.request += connection.recv(65536)
            head, _, body = self.request.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length:
                body += connection.recv(65536)
                self.request = head + b"\r\n\r\n" + body
            connection.sendall(self._answer)
            if self._hold:
                self._released.wait(10)

    def close(self) -> None:
        self._released.set()
        self._thread.join()
        self._server.close()


Answering = Callable[..., OneAnswer]


@pytest.fixture
def answering(tmp_path: Path) -> Iterator[Answering]:
    servers: list[OneAnswer] = []

    def start(answer: bytes, *, hold: bool = False) -> OneAnswer:
        server = OneAnswer(tmp_path / f"s{len(servers)}.sock", answer, hold=hold)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def client(path: Path, timeout: float = 10) -> UnixHTTP:
    return UnixHTTP(str(path), timeout, {"authorization": b"Bearer s3cret"})


def body_of(path: Path) -> tuple[int, dict[str, str], bytes]:
    with client(path).stream("GET", "/v1/vms") as response:
        return response.status_code, response.headers, response.read()


def test_a_request_says_what_it_is(answering: Answering, tmp_path: Path) -> None:
    server = answering(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}")
    with client(tmp_path / "s0.sock").stream(
        "POST", "/v1/vms", json={"name": "é"}, params={"force": True}
    ) as response:
        assert (response.status_code, response.json()) == (201, {})
    head, _, body = server.request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/vms?force=true HTTP/1.1"
    assert {
        "host: roost",
        "content-type: application/json",
        "authorization: Bearer s3cret",
        f"content-length: {len(body)}",
        "connection: close",
    } <= set(lines[1:])
    assert json.loads(body) == {"name": "é"}


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nhello world",  # up to the connection's end
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
    ],
)
def test_every_framing_of_a_body_reads_the_same(
    answering: Answering, tmp_path: Path, answer: bytes
) -> None:
    answering(answer)
    assert body_of(tmp_path / "s0.sock")[::2] == (200, b"hello world")


def test_lines_come_as_they_are_sent(answering: Answering, tmp_path: Path) -> None:
    answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"a"\r\n5\r\n:1}\r\n\r\n6\r\n{"b":2\r\n1\r\n}\r\n0\r\n\r\n'
    )
    with client(tmp_path / "s0.sock").stream("GET", "/x") as response:
        assert list(response.iter_lines()) == ['{"a":1}', '{"b":2}']


def test_headers_are_read_by_lower_case_name_and_a_repeated_one_joined(
    answering: Answering, tmp_path: Path
) -> None:
    answering(b"HTTP/1.1 204 No Content\r\nLink: <a>\r\nlink: <b>\r\nRetry-After: 3\r\n\r\n")
    status, headers, body = body_of(tmp_path / "s0.sock")
    assert (status, body) == (204, b"")
    assert headers == {"link": "<a>, <b>", "retry-after": "3"}


@pytest.mark.parametrize(
    "answer",
    [
        b"",  # closed without an answer
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
    ],
)
def test_what_is_not_http_or_ends_too_soon_is_a_transport_error(
    answering: Answering, tmp_path: Path, answer: bytes
) -> None:
    answering(answer)
    with pytest.raises(TransportError):
        body_of(tmp_path / "s0.sock")


def test_a_daemon_that_does_not_answer_in_time_is_a_timeout(
    answering: Answering, tmp_path: Path
) -> None:
    answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", hold=True)
    with (
        pytest.raises(TransportTimeoutError),
        client(tmp_path / "s0.sock", 0.2).stream("GET", "/x") as response,
    ):
        response.read()


def test_no_socket_is_a_transport_error_saying_why(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match=r"\[Errno 2\] No such file or directory"):
        body_of(tmp_path / "missing.sock")
