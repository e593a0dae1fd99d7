"""The API layer against an engine fake: where work runs (operations never starve reads or
`/healthz`), what a route takes (no unknown query parameters, finite numbers, offsets a file
can have), and that no request a client can send, or leave half-sent, is an internal error."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client import CollectorRegistry

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.engine.events import EventBus
from roost.engine.settings import Settings
from roost.errors import NotFoundError, RoostError
from tests.asgi import json_post_scope

T = TypeVar("T")
UNIX = "http://roost"  # no port: what uvicorn reports for a Unix socket
TCP = "tcp://127.0.0.1:8000"
TOKEN = "s3cret-token"
MANIFEST = {"name": "p", "version": "1", "initramfs": {"path": "/srv/p/initramfs"}}


class FakePlugins:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.installs: list[dict[str, Any]] = []
        self.failure: Exception | None = None

    def install(
        self, manifest: Any, *, force: bool, any_path: bool, progress: Any = None
    ) -> dict[str, Any]:
        self.installs.append({"name": manifest.name, "force": force, "any_path": any_path})
        if progress is not None:
            progress({"event": "artifact", "role": "initramfs", "source": "/srv/p/initramfs"})
        if self.failure is not None:
            raise self.failure
        self.engine.hold()
        return {"name": manifest.name}

    def list(self) -> list[dict[str, Any]]:
        return []

    def show(self, name: str) -> dict[str, Any]:
        raise NotFoundError(f"plugin {name!r} is not installed")

    def remove(self, name: str) -> None:
        self.engine.hold()


class FakeEngine:
    """Operations that wait on `release` (as a stop waits on its VMM) and count how many wait
    at once; reads that answer at once."""

    def __init__(self, settings: Settings | None = None, console: Path | None = None) -> None:
        self.settings = settings or Settings(token=TOKEN)
        self.plugins = FakePlugins(self)
        self.status = "ok"
        self.console_log = console or Path("/nonexistent/console.log")
        self.release = threading.Event()
        self.events = EventBus()
        self.metrics = CollectorRegistry()  # a collector of no metrics
        self.created: list[tuple[str, bool]] = []
        self.waiting = 0
        self.most_waiting = 0
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            assert self.release.wait(30), "the test never released its operations"
        finally:
            with self._lock:
                self.waiting -= 1

    def health(self) -> dict[str, Any]:
        return {"status": self.status}

    def list_vms(self, query: Any = None) -> list[dict[str, Any]]:
        return []

    def list_vms_encoded(self, query: Any = None) -> list[tuple[str, bytes]]:
        return []

    def list_networks(self) -> list[dict[str, Any]]:
        return []

    def show_vm(self, name: str) -> dict[str, Any]:
        return {"name": name}

    def create_vm(self, name: str, config: Any, *, start: bool = True) -> dict[str, Any]:
        self.created.append((name, start))
        self.hold()
        return {"name": name}

    def stop_vm(self, name: str, *, timeout: float | None, force: bool) -> dict[str, Any]:
        self.hold()
        return {"name": name, "timeout": timeout, "force": force}

    def operation(self, name: str) -> dict[str, Any]:
        self.hold()
        return {"name": name}

    start_vm = restart_vm = pause_vm = resume_vm = operation

    def destroy_vm(self, name: str) -> None:
        self.hold()

    def patch_config(self, name: str, patch: Any, *, restart: bool) -> dict[str, Any]:
        self.hold()
        return {"version": 2}

    def config(self, name: str) -> dict[str, Any]:
        return {"version": 1}

    def config_history(self, name: str) -> list[dict[str, Any]]:
        return [{"version": 1}]

    def console(self, name: str) -> tuple[Path, bool]:
        return self.console_log, False


class Api:
    """An in-process client of the app, on one event loop for the whole test."""

    def __init__(
        self, engine: FakeEngine, base_url: str = UNIX, endpoints: list[str] | None = None
    ) -> None:
        self.app = create_app(engine, [Endpoint.parse(url) for url in endpoints or [TCP]])  # type: ignore[arg-type]
        self.runner = asyncio.Runner()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url=base_url
        )

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.run(self.client.request(method, url, **kwargs))

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(work)

    def close(self) -> None:
        self.runner.run(self.client.aclose())
        self.runner.close()


@pytest.fixture
def engine() -> FakeEngine:
    engine = FakeEngine()
    engine.release.set()
    return engine


@pytest.fixture
def api(engine: FakeEngine) -> Any:
    api = Api(engine)
    yield api
    api.close()


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) >= {"error"}, body
    return dict(body["error"])


# ---- where work runs --------------------------------------------------------------------


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_healthz_and_reads_answer_at_once_while_45_stops_wait_on_their_vmms() -> None:
    engine = FakeEngine()
    api = Api(engine)

    async def scenario() -> tuple[float, float, list[httpx.Response]]:
        stops = [
            asyncio.create_task(api.client.post(f"/v1/vms/vm{i}/stop", params={"timeout": 40}))
            for i in range(45)
        ]
        try:
            await until(lambda: engine.waiting >= 16, "the stops to begin")
            began = time.monotonic()
            health = await asyncio.wait_for(api.client.get("/healthz"), 5)
            health_took = time.monotonic() - began
            assert health.status_code == 200
            began = time.monotonic()
            listed = await asyncio.wait_for(api.client.get("/v1/vms"), 5)
            list_took = time.monotonic() - began
            assert listed.status_code == 200
        finally:
            engine.release.set()
        return health_took, list_took, await asyncio.gather(*stops)

    try:
        health_took, list_took, stops = api.run(scenario())
    finally:
        api.close()
    print(f"healthz {health_took * 1000:.1f} ms, vm list {list_took * 1000:.1f} ms")
    assert health_took < 1 and list_took < 1
    assert {stop.status_code for stop in stops} == {200}
    assert engine.most_waiting == engine.settings.max_operations == 16


OPERATIONS = [
    ("POST", "/v1/vms", {"json": {"name": "x", "plugin": "p", "start": False}}),
    ("POST", "/v1/vms/x/start", {}),
    ("POST", "/v1/vms/x/stop", {"params": {"timeout": 1}}),
    ("POST", "/v1/vms/x/restart", {}),
    ("POST", "/v1/vms/x/pause", {}),
    ("POST", "/v1/vms/x/resume", {}),
    ("DELETE", "/v1/vms/x", {}),
    ("POST", "/v1/plugins", {"json": MANIFEST}),
    ("POST", "/v1/plugins", {"json": MANIFEST, "headers": {"accept": "application/x-ndjson"}}),
    ("DELETE", "/v1/plugins/p", {}),
    ("PATCH", "/v1/vms/x/config", {"json": {"labels": {"a": "b"}}}),
]


@pytest.mark.parametrize(("method", "path", "extra"), OPERATIONS)
def test_an_operation_beyond_the_workers_and_the_queue_is_refused_busy_with_retry_after(
    method: str, path: str, extra: dict[str, Any]
) -> None:
    engine = FakeEngine(Settings(max_operations=2, max_queued_operations=1))
    api = Api(engine)

    async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
        held = [asyncio.create_task(api.client.post(f"/v1/vms/held{i}/pause")) for i in range(3)]
        try:
            await until(lambda: engine.waiting == 2, "two operations to run")
            await asyncio.sleep(0.05)  # the third is queued by now
            refused = await asyncio.wait_for(api.client.request(method, path, **extra), 5)
        finally:
            engine.release.set()
        return refused, await asyncio.gather(*held)

    try:
        refused, held = api.run(scenario())
    finally:
        api.close()
    assert refused.status_code == 503
    assert error_of(refused)["code"] == "busy"
    assert refused.headers["retry-after"] == "2"
    assert [response.status_code for response in held] == [200, 200, 200]
    assert engine.most_waiting == 2


def test_a_queued_operation_runs_when_a_worker_is_free() -> None:
    engine = FakeEngine(Settings(max_operations=1, max_queued_operations=4))
    api = Api(engine)

    async def scenario() -> list[httpx.Response]:
        tasks = [asyncio.create_task(api.client.post(f"/v1/vms/q{i}/start")) for i in range(5)]
        await until(lambda: engine.waiting == 1, "one operation to run")
        engine.release.set()
        return await asyncio.gather(*tasks)

    try:
        responses = api.run(scenario())
    finally:
        api.close()
    assert [response.status_code for response in responses] == [200] * 5
    assert engine.most_waiting == 1


# ---- /healthz ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["ok", "recovering"])
def test_healthz_says_the_engines_status_and_the_version(
    api: Api, engine: FakeEngine, status: str
) -> None:
    engine.status = status
    response = api.request("GET", "/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == status
    assert response.json()["version"]


def test_healthz_is_503_database_gone_when_the_database_vanished(
    api: Api, engine: FakeEngine
) -> None:
    engine.status = "database_gone"
    response = api.request("GET", "/healthz")
    assert response.status_code == 503
    assert response.json()["status"] == "database_gone"
    assert error_of(response)["code"] == "database_gone"


# ---- what a route takes -----------------------------------------------------------------


def test_a_query_parameter_the_route_does_not_take_is_invalid_and_nothing_happens(
    api: Api, engine: FakeEngine
) -> None:
    response = api.request(
        "POST", "/v1/vms", params={"start": "false"}, json={"name": "x", "plugin": "p"}
    )
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid"
    assert [detail["loc"] for detail in error["details"]] == ["query.start"]
    assert engine.created == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz?verbose=1"),
        ("GET", "/v1/vms?plugin=p&owner=me"),
        ("GET", "/v1/vms/x/console?follow=false&from=3"),
        ("POST", "/v1/vms/x/stop?timeout=1&graceful=true"),
        ("DELETE", "/v1/plugins/p?force=true"),
        ("GET", "/v1/networks?x"),
        ("GET", "/v1/vms/x/config?version=1"),
        ("GET", "/v1/vms/x/config/history?limit=3"),
        ("PATCH", "/v1/vms/x/config?restart=true&now=1"),
    ],
)
def test_every_route_refuses_query_parameters_it_does_not_take(
    api: Api, method: str, path: str
) -> None:
    response = api.request(method, path)
    assert response.status_code == 422
    locs = [detail["loc"] for detail in error_of(response)["details"]]
    assert len(locs) == 1 and locs[0].startswith("query.")
    assert locs[0] not in ("query.follow", "query.timeout", "query.plugin")


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_a_stop_timeout_that_is_not_a_finite_number_says_so(api: Api, value: str) -> None:
    response = api.request("POST", "/v1/vms/x/stop", params={"timeout": value})
    assert response.status_code == 422
    [detail] = error_of(response)["details"]
    assert detail == {"loc": "query.timeout", "msg": "must be a finite number"}


@pytest.mark.parametrize("offset", [str(2**63), str(2**64), "9" * 30, "9" * 5000])
def test_a_console_offset_beyond_64_bits_is_invalid_not_an_internal_error(
    api: Api, offset: str, tmp_path: Path
) -> None:
    response = api.request("GET", "/v1/vms/x/console", params={"offset": offset})
    assert response.status_code == 422
    assert error_of(response)["details"][0]["loc"] == "query.offset"


def test_a_console_offset_past_the_end_reads_nothing(engine: FakeEngine, tmp_path: Path) -> None:
    engine.console_log = tmp_path / "console.log"
    engine.console_log.write_text("booted\n")
    api = Api(engine)
    try:
        assert api.request("GET", "/v1/vms/x/console", params={"offset": 2**63 - 1}).text == ""
        assert api.request("GET", "/v1/vms/x/console", params={"offset": 2}).text == "oted\n"
    finally:
        api.close()


@pytest.mark.parametrize("name", ["Bad_Name", "a" * 64, "-x", "x%00y", "%C3%A9"])
def test_a_path_name_that_cannot_be_a_name_is_invalid_at_name(api: Api, name: str) -> None:
    for method, path in [("GET", f"/v1/vms/{name}"), ("POST", f"/v1/vms/{name}/pause")]:
        response = api.request(method, path)
        assert response.status_code == 422, (method, path)
        assert error_of(response)["details"][0]["loc"] == "name"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[" * 200_000, "nested more than 64 deep"),
        (b'{"name": "x", "plugin": "p", "memory_mib": ' + b"9" * 5000 + b"}", "300 digits"),
        (b'{"name": "x", "name": "y", "plugin": "p"}', "appears twice"),
        (b'{"name": "x", "plugin": "\\udc00"}', "surrogate"),
    ],
)
def test_bodies_json_cannot_hold_safely_are_invalid_json(api: Api, body: bytes, says: str) -> None:
    response = api.request(
        "POST", "/v1/vms", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"
    assert says in error_of(response)["message"]


def test_an_install_may_name_any_path_only_from_the_unix_socket(engine: FakeEngine) -> None:
    for base_url, headers in [
        (UNIX, {}),
        ("http://127.0.0.1:8000", {"authorization": f"Bearer {TOKEN}"}),
    ]:
        api = Api(engine, base_url)
        try:
            assert api.request("POST", "/v1/plugins", json=MANIFEST, headers=headers).is_success
        finally:
            api.close()
    assert [install["any_path"] for install in engine.plugins.installs] == [True, False]


# ---- failures that are nobody's fault, and bugs -----------------------------------------


def install_stream(api: Api) -> list[dict[str, Any]]:
    import json

    response = api.request(
        "POST", "/v1/plugins", json=MANIFEST, headers={"accept": "application/x-ndjson"}
    )
    assert response.status_code == 201
    return [json.loads(line) for line in response.text.splitlines() if line]


def test_a_bug_in_a_streamed_install_ends_the_stream_with_an_internal_error_logged_once(
    api: Api, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine.plugins.failure = ZeroDivisionError("division by zero")
    with caplog.at_level(logging.ERROR):
        lines = install_stream(api)
    assert lines[0]["event"] == "artifact"
    assert lines[-1]["error"]["code"] == "internal"
    assert "ZeroDivisionError" in lines[-1]["error"]["message"]
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert len(tracebacks) == 1


def test_a_roost_error_in_a_streamed_install_ends_the_stream_with_its_own_code(
    api: Api, engine: FakeEngine
) -> None:
    engine.plugins.failure = RoostError("the state filesystem is full", code="no_space")
    assert install_stream(api)[-1]["error"]["code"] == "no_space"


def test_a_client_that_leaves_before_its_body_is_whole_is_no_error(
    engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(engine, [])  # type: ignore[arg-type]
    incoming: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"name": "x", "plu', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = json_post_scope("/v1/vms", 400)
    with caplog.at_level(logging.DEBUG):
        asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert not [record for record in caplog.records if record.exc_info]
    assert engine.created == []


def test_closing_the_gate_drops_queued_operations_and_waits_for_running_ones() -> None:
    from roost.api.operations import OperationGate

    gate = OperationGate(workers=1, queued=1)
    release = threading.Event()
    ran: list[str] = []

    def operation(name: str) -> None:
        ran.append(name)
        release.wait(10)
        ran.append(f"{name} done")

    async def scenario() -> None:
        running = gate.submit(operation, "running")
        queued = gate.submit(operation, "queued")
        await until(lambda: ran == ["running"], "the first operation to run")
        threading.Timer(0.2, release.set).start()
        await asyncio.to_thread(gate.close)
        assert ran == ["running", "running done"]
        await running
        assert queued.cancelled()

    asyncio.run(scenario())


def test_the_openapi_document_resolves_every_reference_its_bodies_make(
    engine: FakeEngine,
) -> None:
    document = create_app(engine, []).openapi()  # type: ignore[arg-type]
    schemas = document["components"]["schemas"]

    def references(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from references(value)
        elif isinstance(node, list):
            for item in node:
                yield from references(item)

    found = set(references(document))
    assert "#/components/schemas/ResourcesOverride" in found
    for reference in found:
        assert reference.startswith("#/components/schemas/"), reference
        assert reference.removeprefix("#/components/schemas/") in schemas, reference
    assert "$defs" not in str(document)
    create = document["paths"]["/v1/vms"]["post"]["requestBody"]["content"]["application/json"]
    assert set(create["schema"]["required"]) == {"name", "plugin"}
    vcpus = schemas["ResourcesOverride"]["properties"]["vcpus"]["anyOf"][0]
    assert (vcpus["minimum"], vcpus["maximum"]) == (1, 32)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_console_log_that_is_not_a_regular_file_reads_as_nothing(
    tmp_path: Path, kind: str
) -> None:
    """Under the jailer its VMM's uid owns the console log's directory: a symlink there must
    not show a host file, a FIFO must not hold a read thread forever."""
    from roost.api.app import _read_from

    secret = tmp_path / "secret"
    secret.write_text("root's\n")
    console = tmp_path / "console.log"
    if kind == "symlink":
        console.symlink_to(secret)
    else:
        os.mkfifo(console)
    assert _read_from(console, 0) == b""
    regular = tmp_path / "regular.log"
    regular.write_text("boot\nlogin:")
    assert _read_from(regular, 5) == b"login:"
