"""The daemon's client for the CLI: HTTP over a Unix socket or TCP (HTTPS for an https://
daemon, verified against roost --ca or the system's CAs), errors as RoostErrors.

A daemon that answers `busy` or `recovering` is asked again after the Retry-After it sends,
until the client's timeout; then the CLI fails with `timeout`.

A Unix socket is spoken to with the standard library's http.client: importing httpx alone takes
longer than a local command's whole answer. httpx serves TCP and TLS daemons (and the tests'
in-process transports).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from roost.api.access import read_token
from roost.api.endpoints import Endpoint
from roost.cli.unix_http import UnixHTTP
from roost.errors import CODES, RoostError, UnreachableError, error_from_json

if TYPE_CHECKING:
    import ssl

    import httpx

# OpenSSL's verification errors for a certificate that is not the name's or the address's
NAME_MISMATCHES = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
NDJSON = "application/x-ndjson"
RETRIED_CODES = ("busy", "recovering")
DEFAULT_RETRY_AFTER = 1.0  # seconds, for a retryable answer that says no Retry-After


class Response(Protocol):
    """An answer as either transport gives it (httpx's, or roost.cli.unix_http's)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def read(self) -> bytes: ...

    def json(self) -> Any: ...

    def iter_lines(self) -> Iterator[str]: ...

    def iter_bytes(self) -> Iterator[bytes]: ...


class Client:
    def __init__(
        self,
        api: str,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
        *,
        token_file: Path | None = None,
        ca: Path | None = None,
    ) -> None:
        """`transport` replaces the connection to `api` (tests answer in-process);
        `token_file` and `ca` are roost's --token-file and --ca."""
        self.endpoint = Endpoint.parse(api, loc="api")
        self.timeout = timeout
        self._http: UnixHTTP | httpx.Client
        if self.endpoint.path is not None and transport is None:
            token = read_token(token_file)
            headers = {"authorization": bearer(token)} if token else {}
            self._http = UnixHTTP(str(self.endpoint.path), timeout, headers)
            self._timeouts: tuple[type[BaseException], ...] = UnixHTTP.TIMEOUTS
            self._failures: tuple[type[BaseException], ...] = UnixHTTP.FAILURES
        else:
            self._http = self._httpx_client(transport, token_file, ca)

    def _httpx_client(
        self, transport: httpx.BaseTransport | None, token_file: Path | None, ca: Path | None
    ) -> httpx.Client:
        import httpx

        from roost.api.access import client_context

        uds = str(self.endpoint.path) if self.endpoint.path is not None else None
        verify = client_context(ca) if self.endpoint.tls else _no_tls()
        transport = transport or httpx.HTTPTransport(uds=uds, verify=verify)
        token = read_token(token_file)
        self._timeouts = (httpx.TimeoutException,)
        self._failures = (httpx.TransportError,)
        return httpx.Client(
            transport=transport,
            base_url=self.endpoint.base_url,
            timeout=self.timeout,
            verify=verify,
            headers={b"authorization": bearer(token)} if token else None,
        )

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        try:
            yield
        except self._timeouts:
            raise RoostError(
                f"the roost daemon at {self.endpoint.url} did not answer in time; the operation "
                "may still finish (roost vm show tells)",
                code="timeout",
            ) from None
        except self._failures as error:
            raise unreachable(self.endpoint, error) from None

    @contextmanager
    def _answer(
        self, opening: Callable[[], AbstractContextManager[Response]]
    ) -> Iterator[Response]:
        """The first answer to `opening` that is not `busy` or `recovering`, asking again as
        each such answer's Retry-After says until the client's timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            with self._reaching(), opening() as response:
                refusal = _retryable(response)
                if refusal is None:
                    yield response
                    return
            wait = _retry_after(response)
            if time.monotonic() + wait > deadline:
                raise RoostError(
                    f"the roost daemon at {self.endpoint.url} kept answering "
                    f"{refusal.code} for {self.timeout:g}s ({refusal.message})",
                    code="timeout",
                )
            time.sleep(wait)

    def call(self, method: str, path: str, *, body: Any = None, **params: Any) -> Any:
        query = {key: value for key, value in params.items() if value is not None}
        opening = partial(self._http.stream, method, path, json=body, params=query)
        with self._answer(opening) as response:
            response.read()
        return self._result(response)

    def pages(self, path: str, **params: Any) -> Iterator[Any]:
        """Each page of a GET that pages, first to last: a page that has a next one names it
        in a `Link: <URL>; rel="next"` header, which is followed as it is."""
        query: dict[str, Any] | None = {
            key: value for key, value in params.items() if value is not None
        }
        url: str | None = path
        while url is not None:
            opening = partial(self._http.stream, "GET", url, params=query)
            with self._answer(opening) as response:
                response.read()
            yield self._result(response)
            # the link's own query, untouched (an empty one would replace it)
            url, query = next_link(response.headers.get("link", "")), None

    def stream(
        self,
        method: str,
        path: str,
        *,
        body: Any,
        on_event: Callable[[dict[str, Any]], None],
        **params: Any,
    ) -> Any:
        """Send a request that answers with JSON lines; each but the last goes to
        `on_event`, the last is the result (or the error, rebuilt with its own code)."""
        query = {key: value for key, value in params.items() if value is not None}
        last: Any = None
        with self._answer(
            lambda: self._http.stream(
                method, path, json=body, params=query, headers={"accept": NDJSON}
            )
        ) as response:
            if not response.headers.get("content-type", "").startswith(NDJSON):
                response.read()
                return self._result(response)
            for line in response.iter_lines():
                if not line.strip():
                    continue
                if last is not None:
                    on_event(last)
                last = json.loads(line)
        if isinstance(last, dict) and isinstance(last.get("error"), dict):
            code = last["error"].get("code")
            status = CODES[code].http_status if code in CODES else 500
            raise error_from_json(status, last)
        return last

    def text_stream(
        self, path: str, *, headers: dict[str, str] | None = None, **params: Any
    ) -> Iterator[bytes]:
        """The raw body of a GET, chunk by chunk, as the daemon sends it."""
        query = {key: value for key, value in params.items() if value is not None}
        opening = partial(self._http.stream, "GET", path, params=query, headers=headers)
        with self._answer(opening) as response:
            if response.status_code >= 400:
                response.read()
                self._result(response)
            yield from response.iter_bytes()

    @staticmethod
    def _result(response: Response) -> Any:
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            raise RoostError(
                f"the daemon answered HTTP {response.status_code} with something that is not JSON"
            ) from None
        if response.status_code >= 400:
            raise error_from_json(response.status_code, body)
        return body

    def close(self) -> None:
        self._http.close()


def next_link(header: str) -> str | None:
    """The URL of a `Link` header's `rel="next"`, or None when it has none."""
    for link in header.split(","):  # the URLs roost sends have their commas escaped
        target, _, parameters = link.partition(";")
        if "rel=next" in parameters.replace('"', "").replace(" ", ""):
            return target.strip().removeprefix("<").removesuffix(">")
    return None


def bearer(token: str) -> bytes:
    """The Authorization header for `token` (as `read_token` gives it), as its UTF-8 bytes."""
    return b"Bearer " + token.encode()


@cache
def _no_tls() -> ssl.SSLContext:
    """The TLS context of a client that speaks no TLS: creating one costs ~20 ms, so one is made,
    once, when first needed (httpx would make one for each client)."""
    import ssl

    return ssl.create_default_context()


def unreachable(endpoint: Endpoint, error: BaseException) -> UnreachableError:
    """The daemon at `endpoint` out of reach for `error`, saying what to do: with TLS, trust
    its CA or use a name its certificate holds, or speak TLS to it or not."""
    import ssl

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        fix = (
            "reach it by a name or address its certificate holds"
            if cause.verify_code in NAME_MISMATCHES
            else "name the CA that signed it with roost --ca FILE (without --ca, the system's "
            "CAs are trusted)"
        )
        return UnreachableError(
            f"the roost daemon at {endpoint.url} presented a certificate this CLI does not "
            f"trust ({cause.verify_message}); {fix}"
        )
    if cause is not None:
        return UnreachableError(
            f"no TLS with the roost daemon at {endpoint.url} ({cause.reason or cause}); is it "
            "serving HTTPS (roost serve --tls-cert)? A plain listener is tcp://HOST:PORT"
        )
    other = " (an HTTPS one is https://HOST:PORT)" if endpoint.is_tcp and not endpoint.tls else ""
    return UnreachableError(
        f"cannot reach the roost daemon at {endpoint.url} ({error}); is `roost serve` running "
        f"there{other}? (--api or $ROOST_API choose another address)"
    )


def _retryable(response: Response) -> RoostError | None:
    """The daemon's `busy` or `recovering` refusal in `response`, read whole, or None."""
    if response.status_code != 503:
        return None
    response.read()
    try:
        error = error_from_json(response.status_code, response.json())
    except ValueError:
        return None
    return error if error.code in RETRIED_CODES else None


def _retry_after(response: Response) -> float:
    text = response.headers.get("retry-after", "")
    return float(text) if text.isascii() and text.isdigit() else DEFAULT_RETRY_AFTER
