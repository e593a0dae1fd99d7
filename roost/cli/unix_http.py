"""HTTP/1.1 to the daemon's Unix socket with the standard library alone: the part of httpx's
client that roost.cli.client uses, sending the same bodies and query strings. A local command
then answers in less time than importing httpx would take."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit

CHUNK = 64 * 1024


class TransportError(Exception):
    """The socket failed, or what came back was not HTTP; the message is the cause's."""


class TransportTimeoutError(Exception):
    """The daemon did not answer within the client's timeout."""


@contextmanager
def _failing() -> Iterator[None]:
    """Socket and protocol errors as the two failures the client tells apart."""
    try:
        yield
    except TimeoutError as error:
        raise TransportTimeoutError(str(error)) from error
    except (OSError, http.client.HTTPException) as error:
        raise TransportError(str(error)) from error


class _Connection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("roost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Response:
    """An answer being read: its status, headers (by lower-case name) and body."""

    def __init__(self, raw: http.client.HTTPResponse) -> None:
        self._raw = raw
        self.status_code = raw.status
        self.headers = {name.lower(): value for name, value in raw.getheaders()}
        self._content: bytes | None = None

    def read(self) -> bytes:
        if self._content is None:
            with _failing():
                self._content = self._raw.read()
        return self._content

    def json(self) -> Any:
        return json.loads(self.read())

    def iter_lines(self) -> Iterator[str]:
        while True:
            with _failing():
                line = self._raw.readline()
            if not line:
                return
            yield line.decode(errors="replace").rstrip("\r\n")

    def iter_bytes(self) -> Iterator[bytes]:
        """The body as it arrives (a followed console's lines as the daemon sends them)."""
        while True:
            with _failing():
                chunk = self._raw.read1(CHUNK)
            if not chunk:
                return
            yield chunk


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
        sent: dict[str, str | bytes] = {"accept": "*/*", **self._headers, **(headers or {})}
        body = None
        if json is not None:
            body = json_body(json)
            sent["content-type"] = "application/json"
        connection = _Connection(self._path, self._timeout)
        try:
            with _failing():
                connection.request(method, target(path, params or {}), body, sent)
                raw = connection.getresponse()
            yield Response(raw)
        finally:
            connection.close()

    def close(self) -> None:
        """Nothing stays open between requests."""


def target(url: str, params: Mapping[str, Any]) -> str:
    """The request target for `url` (a path, or an absolute URL such as a Link header's) with
    `params` added to any query it has, as httpx merges them."""
    parts = urlsplit(url)
    query = "&".join(part for part in (parts.query, query_string(params)) if part)
    return f"{parts.path or '/'}?{query}" if query else parts.path or "/"


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
