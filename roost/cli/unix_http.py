"""HTTP/1.1 to the daemon's Unix socket with the standard library's socket alone: the part of
httpx's client that roost.cli.client uses, sending the same bodies and query strings. A local
command then answers in less time than importing httpx (or http.client, with its email parser
and ssl) would take.

A request per connection (`Connection: close`); an answer's body is framed as HTTP/1.1 says
(chunked, Content-Length, or up to the connection's end) and read as it arrives.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from io import BufferedReader
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

CHUNK = 64 * 1024
MAX_LINE = 64 * 1024  # a status, header or chunk-size line longer than this is not roost's daemon
NO_BODY = (204, 304)


class TransportError(Exception):
    """The socket failed, or what came back was not HTTP; the message says which."""


class TransportTimeoutError(Exception):
    """The daemon did not answer within the client's timeout."""


@contextmanager
def _failing() -> Iterator[None]:
    """Socket and framing errors as the two failures the client tells apart."""
    try:
        yield
    except TimeoutError as error:
        raise TransportTimeoutError(str(error)) from error
    except OSError as error:
        raise TransportError(str(error)) from error
    except ValueError as error:  # a malformed status line, header or chunk size
        raise TransportError(f"the answer is not HTTP/1.1 ({error})") from error


class Response:
    """An answer being read: its status, headers (by lower-case name; a repeated one's values
    joined by ", ", as httpx gives them) and body."""

    def __init__(self, reader: BufferedReader) -> None:
        self._reader = reader
        while True:  # an interim 1xx answer is followed by the real one
            status_line = _line(reader)
            version, _, rest = status_line.partition(" ")
            if not version.startswith("HTTP/1."):
                if not status_line:
                    raise ValueError("the daemon closed the connection without an answer")
                raise ValueError(f"status line {status_line[:80]!r}")
            self.status_code = int(rest[:3])
            self.headers = _headers(reader)
            if not 100 <= self.status_code < 200:
                break
        self._content: bytes | None = None

    def read(self) -> bytes:
        if self._content is None:
            self._content = b"".join(self.iter_bytes())
        return self._content

    def json(self) -> Any:
        return json.loads(self.read())

    def iter_lines(self) -> Iterator[str]:
        pending = b""
        for chunk in self.iter_bytes():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace").rstrip("\r")
        if pending:
            yield pending.decode(errors="replace").rstrip("\r")

    def iter_bytes(self) -> Iterator[bytes]:
        """The body as it arrives (a followed console's lines as the daemon sends them)."""
        if self._content is not None:
            yield self._content
            return
        with _failing():
            if self.status_code in NO_BODY:
                return
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                yield from self._chunked()
            elif "content-length" in self.headers:
                yield from self._counted(int(self.headers["content-length"]))
            else:
                while chunk := self._reader.read1(CHUNK):
                    yield chunk

    def _counted(self, length: int) -> Iterator[bytes]:
        while length > 0:
            chunk = self._reader.read1(min(length, CHUNK))
            if not chunk:
                raise ValueError(f"the body ended {length} bytes short")
            length -= len(chunk)
            yield chunk

    def _chunked(self) -> Iterator[bytes]:
        while True:
            size = int(_line(self._reader).split(";")[0], 16)
            if size == 0:
                _headers(self._reader)  # trailers, up to the empty line
                return
            yield from self._counted(size)
            if self._reader.read(2) != b"\r\n":
                raise ValueError("a chunk does not end with CRLF")


def _line(reader: BufferedReader) -> str:
    line = reader.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ValueError("a line longer than 64 KiB")
    return line.decode("latin-1").rstrip("\r\n")


def _headers(reader: BufferedReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    while line := _line(reader):
        name, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"header line {line[:80]!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return headers


class UnixHTTP:
    """A client of the HTTP server on the Unix socket `path`: a connection per request, each
    sending `headers` (the token) and timing out after `timeout` seconds without progress."""

    TIMEOUTS = (TransportTimeoutError,)
    FAILURES = (TransportError,)

    def __init__(self, path: str, timeout: float, headers: Mapping[str, bytes]) -> None:
        self._path = path
        self._timeout = timeout
        self._headers = dict(headers)

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[Response]:
        body = b"" if json is None else json_body(json)
        sent = {"host": "roost", "accept": "*/*", "connection": "close"}
        if json is not None:
            sent["content-type"] = "application/json"
        if body or method in ("POST", "PUT", "PATCH"):
            sent["content-length"] = str(len(body))
        sent |= {name: value.decode("latin-1") for name, value in self._headers.items()}
        sent |= headers or {}
        head = "".join(f"{name}: {value}\r\n" for name, value in sent.items())
        request = f"{method} {target(path, params or {})} HTTP/1.1\r\n{head}\r\n"
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
            sock.makefile("rb") as reader,
        ):
            sock.settimeout(self._timeout)
            with _failing():
                sock.connect(self._path)
                sock.sendall(request.encode("latin-1") + body)
                response = Response(reader)
            yield response

    def close(self) -> None:
        """Nothing stays open between requests."""


def target(url: str, params: Mapping[str, Any]) -> str:
    """The request target for `url` (a path, or an absolute URL such as a Link header's) with
    `params` added to any query it has, as httpx merges them."""
    parts = urlsplit(url)
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
    query = "&".join(part for part in (parts.query, query_string(params)) if part)
    return f"{path}?{query}" if query else path


def json_body(document: Any) -> bytes:
    """`document` as httpx sends `json=`: compact UTF-8, NaN refused."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def query_string(params: Mapping[str, Any]) -> str:
    """`params` as httpx encodes them: a list is a repeated key, booleans are true/false."""
    pairs = [
        (key, _text(item))
        for key, value in params.items()
        for item in (value if isinstance(value, list | tuple) else [value])
    ]
    return urlencode(pairs)


def _text(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return "" if value is None else str(value)
