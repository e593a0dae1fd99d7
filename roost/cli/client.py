"""The daemon's client for the CLI: HTTP over a Unix socket or TCP, errors as RoostErrors."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from roost.api.endpoints import Endpoint
from roost.errors import RoostError, UnreachableError, error_from_json

# Creating a client's default TLS context costs ~20 ms; nothing here speaks TLS.
_NO_TLS = ssl.create_default_context()
NDJSON = "application/x-ndjson"


class Client:
    def __init__(self, api: str, timeout: float = 600.0) -> None:
        self.endpoint = Endpoint.parse(api, loc="api")
        if self.endpoint.path is not None:
            transport = httpx.HTTPTransport(uds=str(self.endpoint.path), verify=_NO_TLS)
            base = "http://roost"
        else:
            transport = httpx.HTTPTransport(verify=_NO_TLS)
            base = f"http://{self.endpoint.host}:{self.endpoint.port}"
        self._http = httpx.Client(
            transport=transport, base_url=base, timeout=timeout, verify=_NO_TLS
        )

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException:
            raise RoostError(
                f"the roost daemon at {self.endpoint.url} did not answer in time; the operation "
                "may still finish (roost vm show tells)",
                code="timeout",
            ) from None
        except httpx.TransportError as error:
            raise UnreachableError(
                f"cannot reach the roost daemon at {self.endpoint.url} ({error}); is "
                "`roost serve` running there? (--api or $ROOST_API choose another address)"
            ) from None

    def call(self, method: str, path: str, *, body: Any = None, **params: Any) -> Any:
        query = {key: value for key, value in params.items() if value is not None}
        with self._reaching():
            response = self._http.request(method, path, json=body, params=query)
        return self._result(response)

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
        `on_event`, the last is the result (or the error)."""
        query = {key: value for key, value in params.items() if value is not None}
        last: Any = None
        with (
            self._reaching(),
            self._http.stream(
                method, path, json=body, params=query, headers={"accept": NDJSON}
            ) as response,
        ):
            if response.headers.get("content-type", "").startswith(NDJSON):
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    if last is not None:
                        on_event(last)
                    last = json.loads(line)
                if isinstance(last, dict) and "error" in last:
                    raise error_from_json(409, last)
                return last
            response.read()
            return self._result(response)

    def text_stream(self, path: str, **params: Any) -> Iterator[bytes]:
        """The raw body of a GET, chunk by chunk, as the daemon sends it."""
        query = {key: value for key, value in params.items() if value is not None}
        with self._reaching(), self._http.stream("GET", path, params=query) as response:
            if response.status_code >= 400:
                response.read()
                self._result(response)
            yield from response.iter_bytes()

    @staticmethod
    def _result(response: httpx.Response) -> Any:
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
