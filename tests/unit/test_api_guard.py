"""Who may ask what, in what form and how much: the token and the `Host` on TCP listeners,
JSON bodies only on every listener, and a body size limit answered before the body is read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.api.guard import Guard
from roost.api.sessions import DAEMON_COOKIE
from roost.api.ui import ViewAuth
from roost.engine.settings import Settings
from tests.asgi import UNIX_SERVER, json_post_scope
from tests.unit.test_api_app import TCP, TOKEN, UNIX, Api, FakeEngine

AUTH = {"authorization": f"Bearer {TOKEN}"}
VM = {"name": "x", "plugin": "p", "start": False}


@pytest.fixture
def engine() -> FakeEngine:
    engine = FakeEngine(Settings(token=TOKEN, max_body_bytes=4096))
    engine.release.set()
    return engine


def ask(
    engine: FakeEngine,
    method: str,
    path: str,
    base_url: str = "http://127.0.0.1:8000",
    endpoints: list[str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    api = Api(engine, base_url, endpoints)
    try:
        return api.request(method, path, **kwargs)
    finally:
        api.close()


# ---- TCP: the token ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN],
)
def test_a_tcp_request_without_the_token_is_unauthorized(
    engine: FakeEngine, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    for method, path, extra in [
        ("GET", "/v1/vms", {}),
        ("POST", "/v1/vms", {"json": VM}),
        ("POST", "/v1/plugins", {"json": {"name": "p"}}),
        ("GET", "/openapi.json", {}),
    ]:
        response = ask(engine, method, path, headers=headers, **extra)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert engine.created == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_a_tcp_request_with_the_token_is_served(engine: FakeEngine, scheme: str) -> None:
    response = ask(
        engine, "POST", "/v1/vms", json=VM, headers={"authorization": f"{scheme} {TOKEN}"}
    )
    assert response.status_code == 201
    assert engine.created == [("x", False)]


def test_healthz_needs_no_token(engine: FakeEngine) -> None:
    assert ask(engine, "GET", "/healthz").status_code == 200


def test_a_tcp_listener_of_a_daemon_without_a_token_serves_nobody() -> None:
    tokenless = FakeEngine(Settings(token=None))
    response = ask(tokenless, "GET", "/v1/vms", headers={"authorization": "Bearer "})
    assert response.status_code == 401
    assert "ROOST_TOKEN" in response.json()["error"]["message"]


# ---- TCP: the Host ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "base_url", "host", "served"),
    [
        (TCP, "http://127.0.0.1:8000", "127.0.0.1:8000", True),
        (TCP, "http://127.0.0.1:8000", "127.0.0.1", True),
        (TCP, "http://127.0.0.1:8000", "localhost:8000", True),
        (TCP, "http://127.0.0.1:8000", "LocalHost", True),
        (TCP, "http://127.0.0.1:8000", "evil.example", False),
        (TCP, "http://127.0.0.1:8000", "evil.example:8000", False),
        (TCP, "http://127.0.0.1:8000", "127.0.0.1:8001", False),
        (TCP, "http://127.0.0.1:8000", "127.0.0.1:+8000", False),
        (TCP, "http://127.0.0.1:8000", "127.0.0.1:8000:8000", False),
        (TCP, "http://127.0.0.1:8000", "localhost.", False),
        (TCP, "http://127.0.0.1:8000", "127.0.0.2:8000", False),
        (TCP, "http://127.0.0.1:8000", "[::1]:8000", False),
        (TCP, "http://127.0.0.1:8000", "127.0.0.1@evil.example", False),
        (TCP, "http://127.0.0.1:8000", "", False),
        ("tcp://[::1]:8000", "http://[::1]:8000", "[::1]:8000", True),
        ("tcp://[::1]:8000", "http://[::1]:8000", "[::1]", True),
        ("tcp://[::1]:8000", "http://[::1]:8000", "[0:0::1]:8000", True),
        ("tcp://[::1]:8000", "http://[::1]:8000", "localhost:8000", True),
        ("tcp://[::1]:8000", "http://[::1]:8000", "::1", False),
        ("tcp://[::1]:8000", "http://[::1]:8000", "[::1", False),
        ("tcp://[::1]:8000", "http://[::1]:8000", "[::1]8000", False),
        ("tcp://[::1]:8000", "http://[::1]:8000", "[localhost]:8000", False),
        ("tcp://[::1]:8000", "http://[::1]:8000", "127.0.0.1:8000", False),
        ("tcp://localhost:8000", "http://127.0.0.1:8000", "localhost:8000", True),
        ("tcp://localhost:8000", "http://127.0.0.1:8000", "localhost", True),
        ("tcp://localhost:8000", "http://127.0.0.1:8000", "127.0.0.1:8000", False),
    ],
)
def test_a_tcp_request_for_another_host_than_the_listeners_is_misdirected(
    engine: FakeEngine, listen: str, base_url: str, host: str, served: bool
) -> None:
    for path in ["/v1/vms", "/healthz"]:
        response = ask(engine, "GET", path, base_url, [listen], headers={**AUTH, "host": host})
        if served:
            assert response.status_code == 200, (path, response.json())
        else:
            assert response.status_code == 421, path
            assert response.json()["error"]["code"] == "misdirected"


def test_a_connection_on_a_port_no_endpoint_names_is_misdirected(engine: FakeEngine) -> None:
    response = ask(engine, "GET", "/healthz", "http://127.0.0.1:9000", [TCP])
    assert response.status_code == 421


def test_the_unix_socket_needs_no_token_and_takes_any_host(engine: FakeEngine) -> None:
    for host in ["roost", "evil.example", "localhost:1"]:
        response = ask(engine, "POST", "/v1/vms", UNIX, json=VM, headers={"host": host})
        assert response.status_code == 201


# ---- every listener: JSON bodies only, and not too much of them -------------------------


@pytest.mark.parametrize("base_url", [UNIX, "http://127.0.0.1:8000"])
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "application/json-patch+json",
    ],
)
def test_a_body_that_is_not_sent_as_json_is_unsupported_media_type(
    engine: FakeEngine, base_url: str, content_type: str | None
) -> None:
    headers = dict(AUTH)
    if content_type is not None:
        headers["content-type"] = content_type
    response = ask(
        engine,
        "POST",
        "/v1/vms",
        base_url,
        content=b'{"name": "x", "plugin": "p"}',
        headers=headers,
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert engine.created == []


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON "]
)
def test_a_json_body_may_say_so_with_parameters(engine: FakeEngine, content_type: str) -> None:
    response = ask(
        engine,
        "POST",
        "/v1/vms",
        UNIX,
        content=b'{"name": "x", "plugin": "p"}',
        headers={"content-type": content_type},
    )
    assert response.status_code == 201


def test_a_request_without_a_body_needs_no_content_type(engine: FakeEngine) -> None:
    assert ask(engine, "POST", "/v1/vms/x/start", UNIX).status_code == 200


def json_body(size: int) -> bytes:
    head, tail = b'{"name": "x", "plugin": "p", "labels": {"k": "', b'"}}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def test_a_body_larger_than_the_limit_is_too_large_by_its_length(engine: FakeEngine) -> None:
    json = {"content-type": "application/json"}
    response = ask(engine, "POST", "/v1/vms", UNIX, content=json_body(4097), headers=json)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert "4096 bytes" in response.json()["error"]["message"]
    assert response.headers["connection"] == "close"
    assert engine.created == []
    response = ask(engine, "POST", "/v1/vms", UNIX, content=json_body(4096), headers=json)
    assert response.status_code != 413


def test_a_chunked_body_is_too_large_as_soon_as_it_passes_the_limit(engine: FakeEngine) -> None:
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(100):
            sent.append(index)
            yield b'{"name": "x", "plugin": "p", "labels": {"k": "' if index == 0 else b"a" * 1000

    response = ask(
        engine,
        "POST",
        "/v1/vms",
        UNIX,
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert engine.created == []
    assert len(sent) == 100  # the rest was read and thrown away, so the client got its answer


def test_a_refused_body_is_answered_first_then_read_and_thrown_away(engine: FakeEngine) -> None:
    """The answer's bytes go out before the body is read; the rest of the body is read before
    the answer ends, so that closing the connection resets nothing the client still sends."""
    app = create_app(engine, [Endpoint.parse(TCP)])  # type: ignore[arg-type]
    events: list[str] = []
    chunks = [b"a" * 1000] * 20

    async def receive() -> dict[str, Any]:
        events.append("receive")
        return {"type": "http.request", "body": chunks.pop(), "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        events.append(f"{message['type']}{'+' if message.get('more_body') else ''}")
        if message["type"] == "http.response.start":
            assert message["status"] == 413
            assert (b"connection", b"close") in message["headers"]

    scope = json_post_scope("/v1/vms", 20000)
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert events == [
        "http.response.start",
        "http.response.body+",
        *["receive"] * 20,
        "http.response.body",
    ]


# ---- WebSockets: the same checks of who may ask ----------------------------------------


def websocket_scope(
    server: tuple[str, int | None], headers: dict[str, str], denial: bool = True
) -> dict[str, Any]:
    """An upgrade to the vsock route, from a server that can send a denial response (an HTTP
    answer to the upgrade) when `denial` says so."""
    return {
        "type": "websocket",
        "path": "/v1/vms/x/vsock/1024",
        "raw_path": b"/v1/vms/x/vsock/1024",
        "query_string": b"",
        "root_path": "",
        "headers": [(name.encode(), value.encode()) for name, value in headers.items()],
        "server": server,
        "client": ("127.0.0.1", 40000),
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}} if denial else {},
    }


def guarded_upgrade(
    scope: dict[str, Any], view: ViewAuth | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """What reached the routes behind the guard (their paths) and what the guard sent."""
    reached: list[str] = []
    sent: list[dict[str, Any]] = []

    async def routes(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    guard = Guard(
        routes, endpoints=[Endpoint.parse(TCP)], token=TOKEN, max_body_bytes=4096, view=view
    )
    asyncio.run(guard(scope, receive, send))  # type: ignore[arg-type]
    return reached, sent


def denial(sent: list[dict[str, Any]]) -> tuple[int, dict[str, bytes], dict[str, Any]]:
    start, body = sent
    assert (start["type"], body["type"]) == (
        "websocket.http.response.start",
        "websocket.http.response.body",
    )
    headers = {name.decode(): value for name, value in start["headers"]}
    return start["status"], headers, json.loads(body["body"])["error"]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}"])
def test_a_tcp_websocket_without_the_token_is_denied_unauthorized_with_the_error_object(
    authorization: str | None,
) -> None:
    headers = {"host": "127.0.0.1:8000"}
    if authorization is not None:
        headers["authorization"] = authorization
    reached, sent = guarded_upgrade(websocket_scope(("127.0.0.1", 8000), headers))
    status, response_headers, error = denial(sent)
    assert (status, error["code"]) == (401, "unauthorized")
    assert response_headers["www-authenticate"] == b"Bearer"
    assert reached == []


def test_a_tcp_websocket_for_another_host_is_denied_misdirected() -> None:
    headers = {"host": "evil.example:8000", **AUTH}
    reached, sent = guarded_upgrade(websocket_scope(("127.0.0.1", 8000), headers))
    status, _, error = denial(sent)
    assert (status, error["code"]) == (421, "misdirected")
    assert reached == []


def test_a_tcp_websocket_with_the_token_and_the_listeners_host_reaches_the_routes() -> None:
    headers = {"host": "127.0.0.1:8000", **AUTH}
    reached, sent = guarded_upgrade(websocket_scope(("127.0.0.1", 8000), headers))
    assert (reached, sent) == (["/v1/vms/x/vsock/1024"], [])


@pytest.mark.parametrize("path", ["/v1/vms/x/vsock/1024", "/ui/static/app.js", "/ui/"])
def test_a_tcp_websocket_with_the_web_view_s_session_but_no_token_is_denied(path: str) -> None:
    view = ViewAuth(DAEMON_COOKIE)
    session = view.sessions.create()
    headers = {
        "host": "127.0.0.1:8000",
        "origin": "http://127.0.0.1:8000",
        "cookie": f"{DAEMON_COOKIE}={session}",
    }
    scope = {**websocket_scope(("127.0.0.1", 8000), headers), "path": path}
    reached, sent = guarded_upgrade(scope, view)
    status, _, error = denial(sent)
    assert (status, error["code"]) == (401, "unauthorized")
    assert reached == []


def test_a_websocket_on_the_unix_socket_needs_no_token_and_takes_any_host() -> None:
    scope = websocket_scope(UNIX_SERVER, {"host": "evil.example"})
    assert guarded_upgrade(scope) == (["/v1/vms/x/vsock/1024"], [])


def test_a_refused_websocket_on_a_server_without_denial_responses_is_closed_1008() -> None:
    scope = websocket_scope(("127.0.0.1", 8000), {"host": "127.0.0.1:8000"}, denial=False)
    assert guarded_upgrade(scope) == ([], [{"type": "websocket.close", "code": 1008}])


def test_a_token_beyond_ascii_matches_as_its_utf8_bytes() -> None:
    engine = FakeEngine(Settings(token="clé-été"))
    token = b"Bearer " + "clé-été".encode()
    assert ask(engine, "GET", "/v1/vms", headers={b"authorization": token}).status_code == 200
    latin1 = b"Bearer " + "clé-été".encode("latin-1")
    assert ask(engine, "GET", "/v1/vms", headers={b"authorization": latin1}).status_code == 401
