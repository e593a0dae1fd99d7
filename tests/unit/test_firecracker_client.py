"""The Firecracker API client's HTTP/1.1 against a scripted Unix-socket peer: answers split
across reads, answers without a body, refusals, and a connection that drops. (The real
Firecracker exercises the usual path in the integration tests; these are the edges it does not
produce on demand.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.errors import VMMFailedError
from roost.vmm.firecracker import FirecrackerAPI
from tests.harness import serve_unix


class Peer:
    """Accepts connections on `path` and answers each request with the next scripted chunks
    (a list of byte strings sent one by one; None closes the connection instead)."""

    def __init__(self, path: Path, script: list[list[bytes] | None]) -> None:
        self.requests: list[bytes] = []
        self._script = script
        self._server, self._thread = serve_unix(path, self._serve)

    def _serve(self, listener: socket.socket) -> None:
        while self._script:
            connection, _ = listener.accept()
            with connection:
                while self._script:
                    request = connection.recv(65536)
                    if not request:
                        break
                    self.requests.append(request)
                    chunks = self._script.pop(0)
                    if chunks is None:
                        break
                    for chunk in chunks:
                        connection.sendall(chunk)

    def close(self) -> None:
        self._server.close()
        self._thread.join(5)


@pytest.fixture
def peer(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Peer, FirecrackerAPI]]:
    path = tmp_path / "api.sock"
    peer = Peer(path, request.param)
    api = FirecrackerAPI(path, timeout=5)
    yield peer, api
    api.close()
    peer.close()


BODY = b'{"state":"Running"}'
SPLIT = [b"HTTP/1.1 200 \r\nContent-Length: ", b"19\r\nServer: x\r\n", b"\r\n" + BODY[:5], BODY[5:]]
NO_BODY = [b"HTTP/1.1 204 \r\nServer: Firecracker API\r\n\r\n"]
REFUSED = [b'HTTP/1.1 400 \r\nContent-Length: 25\r\n\r\n{"fault_message":"nope"}\n']


@pytest.mark.parametrize("peer", [[SPLIT, NO_BODY]], indirect=True)
def test_answers_split_across_reads_and_answers_without_a_body(
    peer: tuple[Peer, FirecrackerAPI],
) -> None:
    server, api = peer
    assert api.call("GET", "/") == {"state": "Running"}
    assert api.call("PUT", "/machine-config", {"vcpu_count": 1}) is None
    get, put = server.requests
    assert get.startswith(b"GET / HTTP/1.1\r\n") and get.endswith(b"Content-Length: 0\r\n\r\n")
    assert put.endswith(b'\r\n\r\n{"vcpu_count": 1}')


@pytest.mark.parametrize("peer", [[REFUSED]], indirect=True)
def test_a_refusal_says_firecrackers_reason(peer: tuple[Peer, FirecrackerAPI]) -> None:
    _, api = peer
    with pytest.raises(VMMFailedError, match="Firecracker refused PUT /vsock: nope"):
        api.call("PUT", "/vsock", {"guest_cid": 3})


@pytest.mark.parametrize("peer", [[None, NO_BODY]], indirect=True)
def test_a_dropped_connection_fails_the_call_and_the_next_one_reconnects(
    peer: tuple[Peer, FirecrackerAPI],
) -> None:
    _, api = peer
    with pytest.raises(VMMFailedError, match="PATCH /vm failed: Firecracker closed"):
        api.call("PATCH", "/vm", {"state": "Paused"})
    assert api.call("PATCH", "/vm", {"state": "Paused"}) is None
