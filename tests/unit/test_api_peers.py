"""Which requests an agent answers itself and which go to a VM's host, and the headers a
forwarded request and its answer carry (roost.api.peers)."""

from __future__ import annotations

import pytest

from roost.api.peers import (
    Local,
    Peer,
    Placement,
    Router,
    VMHost,
    destination,
    forwarded_from,
    request_headers,
    response_headers,
)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v1/vms", Local()),
        ("GET", "/v1/vms/web", Local()),
        ("HEAD", "/v1/vms/web", Local()),
        ("POST", "/v1/vms", Placement()),
        ("DELETE", "/v1/vms/web", VMHost("web")),
        ("POST", "/v1/vms/web/start", VMHost("web")),
        ("POST", "/v1/vms/web/stop", VMHost("web")),
        ("POST", "/v1/vms/web/restart", VMHost("web")),
        ("POST", "/v1/vms/web/pause", VMHost("web")),
        ("POST", "/v1/vms/web/resume", VMHost("web")),
        ("GET", "/v1/vms/web/config", VMHost("web")),
        ("GET", "/v1/vms/web/config/history", VMHost("web")),
        ("PATCH", "/v1/vms/web/config", VMHost("web")),
        ("GET", "/v1/vms/web/console", VMHost("web")),
        ("GET", "/v1/vms/web/vsock/1024", VMHost("web")),
        ("POST", "/v1/vms/web/forwards", VMHost("web")),
        ("GET", "/v1/vms/web/forwards", VMHost("web")),
        ("DELETE", "/v1/vms/web/forwards/3", VMHost("web")),
        ("GET", "/v1/vms/", Local()),
        ("GET", "/v1/vmsx/web/start", Local()),
        ("GET", "/v1/plugins", Local()),
        ("POST", "/v1/networks", Local()),
        ("GET", "/v1/hosts/b", Local()),
        ("GET", "/healthz", Local()),
    ],
)
def test_a_route_goes_where_the_rule_says(method: str, path: str, expected: object) -> None:
    assert destination(method, path) == expected


class _TwoHosts(Router):
    def host_of(self, vm: str) -> Peer | None:
        return Peer("b", "unix:///run/b.sock") if vm.startswith("b") else None


def _scope(method: str, path: str) -> dict[str, object]:
    return {"type": "http", "method": method, "path": path, "headers": []}


def test_a_router_asks_for_the_host_of_a_vm_only_where_the_rule_needs_it() -> None:
    router = _TwoHosts("a")
    assert router.route(_scope("POST", "/v1/vms/b1/start")) == Peer("b", "unix:///run/b.sock")
    assert router.route(_scope("GET", "/v1/vms/b1")) is None  # read here from the database
    assert router.route(_scope("POST", "/v1/vms/a1/start")) is None  # this host's
    assert router.route(_scope("POST", "/v1/vms")) is None  # placement's hook: here by default
    websocket = {"type": "websocket", "path": "/v1/vms/b1/vsock/5", "headers": []}
    assert router.route(websocket) == Peer("b", "unix:///run/b.sock")


def test_a_forwarded_request_drops_the_cookie_and_carries_origin_and_token() -> None:
    sent = request_headers(
        [
            (b"Host", b"a.example:8443"),
            (b"authorization", b"Bearer the-clients"),
            (b"cookie", b"roost_session=the-browsers"),
            (b"x-roost-forwarded", b"somebody"),
            (b"connection", b"keep-alive, X-Private"),
            (b"x-private", b"hop"),
            (b"keep-alive", b"timeout=5"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"te", b"trailers"),
            (b"content-type", b"application/json"),
            (b"content-length", b"12"),
            (b"accept", b"application/x-ndjson"),
            (b"x-roost-client", b"unix"),
        ],
        origin="a",
        token="cluster",
        tcp_client=True,
    )
    assert sent == [
        (b"content-type", b"application/json"),
        (b"content-length", b"12"),
        (b"accept", b"application/x-ndjson"),
        (b"x-roost-forwarded", b"a"),
        (b"x-roost-client", b"tcp"),
        (b"authorization", b"Bearer cluster"),
    ]


def test_a_unix_clients_request_to_a_unix_peer_carries_no_token_nor_client_mark() -> None:
    sent = request_headers(
        [(b"authorization", b"Bearer x"), (b"x-roost-client", b"tcp")],
        origin="a",
        token=None,
        tcp_client=False,
    )
    assert sent == [(b"x-roost-forwarded", b"a")]


def test_a_peers_answer_keeps_its_headers_but_the_hop_by_hop_ones() -> None:
    kept = response_headers(
        [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"close"),
            (b"retry-after", b"2"),
            (b"www-authenticate", b"Bearer"),
            (b"link", b'</v1/vms?after=x>; rel="next"'),
        ]
    )
    assert kept == [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"retry-after", b"2"),
        (b"www-authenticate", b"Bearer"),
        (b"link", b'</v1/vms?after=x>; rel="next"'),
    ]


def test_the_forwarding_host_is_read_from_its_header() -> None:
    assert forwarded_from({"headers": [(b"X-Roost-Forwarded", b"c")]}) == "c"
    assert forwarded_from({"headers": [(b"accept", b"*/*")]}) is None
