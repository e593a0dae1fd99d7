"""`GET /v1/events` under uvicorn on a Unix socket, in front of an engine fake whose bus the
test publishes on (as engine threads do): the stream's form, where it starts, resuming,
overflow, the filter, heartbeats, what it refuses, and that streams are not operations; then
`roost events` as a user runs it (a process of its own), across a reconnect."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.cli.events import _human, _sse
from roost.engine.events import EventBus
from roost.engine.settings import Settings
from roost.errors import ExitCode
from tests.harness import EventsFollower, wait_for
from tests.unit.test_api_app import Api, FakeEngine, error_of
from tests.unit.test_api_vsock import Served

ROOT = Path(__file__).resolve().parents[2]
Block = tuple[str | None, str | None, str]


class EventsApp(Served):
    """roost's app on a Unix socket in `directory`, over a FakeEngine whose operations wait
    for `engine.release`; one operation may run, none wait."""

    def __init__(self, directory: Path, bus: EventBus | None = None) -> None:
        self.engine = FakeEngine(Settings(max_operations=1, max_queued_operations=0))
        self.bus = self.engine.events = bus or EventBus(first_id=1)
        self.socket = directory / "api.sock"
        endpoints = [Endpoint.parse(f"unix://{self.socket}")]
        super().__init__(create_app(self.engine, endpoints), endpoints)  # type: ignore[arg-type]

    def readers(self) -> int:
        return sum(len(readers) for readers in list(self.bus._readers.values()))

    def end_streams(self) -> None:
        """End every stream from the daemon's side, as a stopping daemon does, but keep the
        bus for the streams that come next."""

        def end() -> None:
            for readers in self.bus._readers.values():
                for reader in list(readers):
                    reader.end()

        self.loop.call_soon_threadsafe(end)

    def close(self) -> None:
        self.engine.release.set()
        self.bus.close()  # else uvicorn waits for the streams to end
        super().close()


@pytest.fixture
def served(tmp_short: Path) -> Iterator[EventsApp]:
    with EventsApp(tmp_short) as served:
        yield served


@contextmanager
def events(served: EventsApp, last_event_id: str | None = None, **params: str) -> Iterator[Any]:
    """The blocks of a stream, once it has opened (its first block read)."""
    headers = {} if last_event_id is None else {"last-event-id": last_event_id}
    transport = httpx.HTTPTransport(uds=str(served.socket))
    with (
        httpx.Client(transport=transport, base_url="http://roost", timeout=10) as client,
        client.stream("GET", "/v1/events", params=params, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        blocks = _sse(response.iter_bytes())
        assert next(blocks) == (None, None, "")  # `retry: 1000`: it follows
        yield blocks


def data(block: Block) -> dict[str, Any]:
    kind, event_id, text = block
    parsed: dict[str, Any] = json.loads(text)
    assert parsed["type"] == kind
    assert event_id is None if kind == "overflow" else parsed["id"] == int(event_id or "")
    return parsed


# ---- the stream ---------------------------------------------------------------------------


def test_a_stream_starts_now_and_says_each_event_as_its_type_id_and_data(
    served: EventsApp,
) -> None:
    served.bus.publish("vm.created", vm="before", plugin="p")
    with events(served) as blocks:
        published = served.bus.publish(
            "vm.status", vm="web-1", status="running", status_reason=None, exit_code=None
        )
        block = next(blocks)
    assert block == ("vm.status", str(published.id), json.dumps(published.data))
    assert data(block) == {
        "id": published.id,
        "type": "vm.status",
        "time": published.data["time"],
        "vm": "web-1",
        "status": "running",
        "status_reason": None,
        "exit_code": None,
    }


def test_a_stream_resumes_after_its_last_event_id(served: EventsApp) -> None:
    for index in range(5):
        served.bus.publish("vm.created", vm=f"v{index}", plugin="p")
    with events(served, last_event_id="2") as blocks:
        served.bus.publish("vm.deleted", vm="v0")
        got = [data(next(blocks)) for _ in range(4)]
    assert [(event["id"], event["type"]) for event in got] == [
        (3, "vm.created"),
        (4, "vm.created"),
        (5, "vm.created"),
        (6, "vm.deleted"),
    ]


def test_a_stream_behind_the_history_gets_overflow_first(tmp_short: Path) -> None:
    with EventsApp(tmp_short, EventBus(history=3, first_id=1)) as served:
        for _ in range(6):
            served.bus.publish("network.created", network="n")
        with events(served, last_event_id="1") as blocks:
            got = [data(next(blocks)) for _ in range(4)]
    assert [event["type"] for event in got] == ["overflow", *["network.created"] * 3]
    assert {"after": 1, "resumes_at": 4}.items() <= got[0].items()
    assert [event["id"] for event in got[1:]] == [4, 5, 6]


def test_vm_filters_the_stream(served: EventsApp) -> None:
    with events(served, vm="web-1") as blocks:
        served.bus.publish("vm.created", vm="web-2", plugin="p")
        served.bus.publish("network.created", network="n")
        served.bus.publish("vm.created", vm="web-1", plugin="p")
        assert data(next(blocks))["vm"] == "web-1"


def test_a_quiet_stream_sends_heartbeats(
    served: EventsApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("roost.api.events.HEARTBEAT", 0.05)
    transport = httpx.HTTPTransport(uds=str(served.socket))
    with (
        httpx.Client(transport=transport, base_url="http://roost", timeout=10) as client,
        client.stream("GET", "/v1/events") as response,
    ):
        chunks = response.iter_bytes()
        received = b""
        while received.count(b": keep-alive\n\n") < 2:
            received += next(chunks)
    assert received.startswith(b"retry: 1000\n\n: keep-alive\n\n")


@pytest.mark.parametrize(
    ("query", "headers", "loc"),
    [
        ("?vm=Web_1", {}, "query.vm"),
        ("?since=3", {}, "query.since"),
        ("", {"last-event-id": "three"}, "header.Last-Event-ID"),
        ("", {"last-event-id": "-1"}, "header.Last-Event-ID"),
    ],
)
def test_what_a_stream_refuses(query: str, headers: dict[str, str], loc: str) -> None:
    engine = FakeEngine()
    api = Api(engine)
    try:
        response = api.request("GET", f"/v1/events{query}", headers=headers)
    finally:
        api.close()
    assert response.status_code == 422
    assert [detail["loc"] for detail in error_of(response)["details"]] == [loc]


def test_fifty_streams_leave_operations_reads_and_healthz_free(served: EventsApp) -> None:
    """Streams are not operations: with one operation slot, the slot's operation runs while
    50 streams are open (and a 51st opens while it holds the slot)."""
    transport = httpx.AsyncHTTPTransport(uds=str(served.socket))
    limits = httpx.Limits(max_connections=100)

    async def scenario() -> None:
        async with (
            httpx.AsyncClient(
                transport=transport, base_url="http://roost", limits=limits, timeout=10
            ) as client,
            AsyncExitStack() as stack,
        ):

            async def opened() -> Any:
                response = await stack.enter_async_context(client.stream("GET", "/v1/events"))
                assert response.status_code == 200
                chunks = response.aiter_bytes()
                assert await anext(chunks) == b"retry: 1000\n\n"
                return chunks

            streams = await asyncio.gather(*(opened() for _ in range(50)))
            assert served.readers() == 50
            operation = asyncio.ensure_future(client.post("/v1/vms/x/pause"))
            await asyncio.sleep(0.2)  # it runs, holding the only slot
            assert not operation.done()
            streams.append(await asyncio.wait_for(opened(), 5))
            for path in ("/healthz", "/v1/vms"):
                assert (await asyncio.wait_for(client.get(path), 2)).status_code == 200
            served.engine.release.set()
            assert (await asyncio.wait_for(operation, 5)).status_code == 200
            published = served.bus.publish("vm.created", vm="a", plugin="p")
            for chunks in streams:
                assert await asyncio.wait_for(anext(chunks), 5) == published.sse()

    asyncio.run(scenario())
    wait_for(lambda: served.readers() == 0, what="the streams' readers to be forgotten")


# ---- roost events -----------------------------------------------------------------------


def roost(socket: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "roost.cli.main", "--api", f"unix://{socket}", *args]


def test_roost_events_json_prints_each_data_object_on_a_line_and_ctrl_c_exits_0(
    served: EventsApp,
) -> None:
    follower = EventsFollower(f"unix://{served.socket}", "--json")
    try:
        wait_for(lambda: served.readers() == 1, what="roost events to follow")
        published = [
            served.bus.publish("plugin.installed", plugin="p", version="1"),
            served.bus.publish("vm.config", vm="web-1", version=2),
        ]
        lines = [follower.line(), follower.line()]
    finally:
        code, err = follower.interrupt()
    assert lines == [json.dumps(event.data) for event in published]
    assert (code, err) == (0, "")


def test_roost_events_resumes_with_last_event_id_across_a_reconnect(served: EventsApp) -> None:
    follower = EventsFollower(f"unix://{served.socket}", "--vm", "web-1")
    try:
        wait_for(lambda: served.readers() == 1, what="roost events to follow")
        served.bus.publish("vm.created", vm="web-1", plugin="p")
        first = follower.line()
        served.end_streams()
        wait_for(lambda: served.readers() == 0, what="the stream to end")
        # published while roost events has no stream: the resumed one sends them
        served.bus.publish("vm.status", vm="web-2", status="running", status_reason=None)
        served.bus.publish("vm.status", vm="web-1", status="crashed", status_reason="oops")
        served.bus.publish("vm.deleted", vm="web-1")
        later = [follower.line(), follower.line()]
    finally:
        code, err = follower.interrupt()
    clock = r"\d\d:\d\d:\d\d"
    assert re.fullmatch(rf"{clock} vm\.created web-1 plugin p", first)
    assert re.fullmatch(rf"{clock} vm\.status web-1 crashed: oops", later[0])
    assert re.fullmatch(rf"{clock} vm\.deleted web-1", later[1])
    assert (code, err) == (0, "the daemon ended the stream; reconnecting\n")


def test_roost_events_without_a_daemon_fails(tmp_short: Path) -> None:
    result = subprocess.run(
        roost(tmp_short / "none.sock", "events"),
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == ExitCode.UNREACHABLE
    assert "cannot reach the roost daemon" in result.stderr


def test_human_lines() -> None:
    time = "2024-05-01T12:00:01.000Z"
    lines = [
        _human({"type": "vm.status", "time": time, "vm": "web-1", "status": "running"}),
        _human({"type": "vm.config", "time": time, "vm": "web-1", "version": 3}),
        _human({"type": "network.removed", "time": time, "network": "net-10-9-0-0-24"}),
        _human({"type": "overflow", "time": time, "after": 7, "resumes_at": 12}),
    ]
    assert [line.split(" ", 1)[1] for line in lines] == [
        "vm.status web-1 running",
        "vm.config web-1 version 3",
        "network.removed net-10-9-0-0-24",
        "overflow: events after id 7 are lost; resuming at id 12",
    ]
