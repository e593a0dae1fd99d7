"""The vsock WebSocket of the real app, served by a real uvicorn on a Unix socket and a loopback
TCP port, in front of an engine fake whose guests are fakes of a VMM's hybrid-vsock socket:
refusals are the usual error object with its status, the framing's end of input and linger,
and relays that hold no operation slot."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.api.server import bind
from roost.engine.events import EventBus
from roost.engine.settings import Settings
from roost.errors import ConflictError, NotFoundError, RoostError
from roost.vmm.base import HybridVsock, VsockTarget
from tests.unit.test_vsock_client import FakeHybridVsock, GuestService, echo

T = TypeVar("T")
S = TypeVar("S", bound="Served")
TOKEN = "vsock-test-token"


class FakeVsockEngine:
    """The engine as the vsock route sees it (and `/healthz` and a pause): `targets` maps a
    VM's name to its vsock target, or to the error the lookup raises; an unknown VM is not
    found."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.events = EventBus()
        self.metrics = CollectorRegistry()  # a collector of no metrics
        self.targets: dict[str, VsockTarget | RoostError] = {}
        self.lookup_threads: set[str] = set()

    def vsock_target(self, name: str) -> VsockTarget:
        self.lookup_threads.add(threading.current_thread().name)
        found = self.targets.get(name)
        if found is None:
            raise NotFoundError(f"VM {name!r} does not exist")
        if isinstance(found, RoostError):
            raise found
        return found

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def pause_vm(self, name: str) -> dict[str, Any]:
        return {"name": name, "status": "paused"}


class Served:
    """An ASGI app under uvicorn on `endpoints`, on an event loop of its own thread (`loop`),
    which also runs the fakes of the app's guests; stopped by `close`."""

    def __init__(self, app: Any, endpoints: list[Endpoint]) -> None:
        self.listeners = [bind(endpoint) for endpoint in endpoints]
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="served-app")
        self.thread.start()
        self.serving = asyncio.run_coroutine_threadsafe(
            self.server.serve(sockets=self.listeners), self.loop
        )
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            assert not self.serving.done(), self.serving.result()
            time.sleep(0.01)

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(30)

    def close(self) -> None:
        self.server.should_exit = True
        self.serving.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        for listener in self.listeners:
            listener.close()


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServedApp(Served):
    """roost's app, on a Unix socket in `directory` and a loopback TCP port, in front of a
    FakeVsockEngine; TCP clients need TOKEN, and one operation may run, none wait."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        settings = Settings(token=TOKEN, max_operations=1, max_queued_operations=0)
        self.engine = FakeVsockEngine(settings)
        self.socket = directory / "api.sock"
        self.tcp_port = free_loopback_port()
        endpoints = [
            Endpoint.parse(f"unix://{self.socket}"),
            Endpoint.parse(f"tcp://127.0.0.1:{self.tcp_port}"),
        ]
        self.guests: list[FakeHybridVsock] = []
        super().__init__(create_app(self.engine, endpoints), endpoints)  # type: ignore[arg-type]

    def guest(
        self, name: str, guest: GuestService | Literal["silent", "closes"] = echo, **options: Any
    ) -> FakeHybridVsock:
        """VM `name`, whose VMM's hybrid vsock socket is a fake with this guest."""
        fake = FakeHybridVsock(self.directory / f"{name}.vsock", guest, **options)
        self.on_loop(fake.start())
        self.guests.append(fake)
        self.engine.targets[name] = HybridVsock(fake.path)
        return fake

    def close(self) -> None:
        for fake in self.guests:
            self.on_loop(fake.stop())
        super().close()


@pytest.fixture
def served(tmp_short: Path) -> Iterator[ServedApp]:
    with ServedApp(tmp_short) as served:
        yield served


def run(scenario: Awaitable[T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(60):
            return await scenario

    return asyncio.run(bounded())


def websocket(served: ServedApp, path: str, **options: Any) -> Any:
    """A WebSocket client to `path` over the app's Unix socket."""
    return unix_connect(str(served.socket), f"ws://localhost{path}", compression=None, **options)


async def refusal(served: ServedApp, path: str) -> tuple[int, dict[str, Any], float]:
    """The status and error object the upgrade to `path` was refused with, and how long the
    answer took."""
    began = time.monotonic()
    with pytest.raises(InvalidStatus) as refused:
        await websocket(served, path)
    took = time.monotonic() - began
    response = refused.value.response
    return response.status_code, json.loads(response.body)["error"], took


async def until_closed(client: ClientConnection) -> tuple[bytes, float]:
    """Everything the daemon sends until it closes the WebSocket, and when it closed."""
    received = b""
    with contextlib.suppress(ConnectionClosedOK):
        while True:
            message = await client.recv()
            assert isinstance(message, bytes)
            received += message
    return received, time.monotonic()


# ---- relays -----------------------------------------------------------------------------


def test_a_mebibyte_goes_to_the_guest_and_back_intact(served: ServedApp) -> None:
    served.guest("v1")
    payload = os.urandom(1 << 20)

    async def scenario() -> bytes:
        async with websocket(served, "/v1/vms/v1/vsock/1024") as client:
            sending = asyncio.create_task(send_in_chunks(client, payload))
            received = b""
            while len(received) < len(payload):
                received += await client.recv()
            await sending
            return received

    received = run(scenario())
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert "served-app" not in served.engine.lookup_threads  # the lookup reads the database


async def send_in_chunks(client: ClientConnection, payload: bytes) -> None:
    for offset in range(0, len(payload), 50_000):
        await client.send(payload[offset : offset + 50_000])


def test_the_guest_closing_closes_the_websocket_with_1000_saying_so(served: ServedApp) -> None:
    async def answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"bye\n")
        writer.close()

    served.guest("v1", answer_and_close)

    async def scenario() -> tuple[bytes, Any, Any]:
        async with websocket(served, "/v1/vms/v1/vsock/1024") as client:
            await client.send(b"hi\n")
            received, _ = await until_closed(client)
            return received, client.close_code, client.close_reason

    assert run(scenario()) == (b"bye\n", 1000, "the guest closed the connection")


def test_after_the_clients_empty_message_a_late_reply_arrives_then_the_linger_closes(
    served: ServedApp,
) -> None:
    seen_end: list[bool] = []

    async def late_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await reader.read(1)
        seen_end.append(reader.at_eof())
        writer.write(b"pong")
        await writer.drain()
        await reader.read()  # silent until the host closes

    served.guest("v1", late_reply)

    async def scenario() -> tuple[bytes, float, Any]:
        async with websocket(served, "/v1/vms/v1/vsock/1024?linger=1") as client:
            await client.send(b"ping")
            await client.send(b"")
            ended = time.monotonic()
            received, closed = await until_closed(client)
            return received, closed - ended, client.close_code

    received, took, code = run(scenario())
    assert received == b"pong"
    assert seen_end == [False]  # the guest's side was not half-closed
    assert 1.4 <= took < 2.5  # the reply at 0.5 s, then 1 s of silence
    assert code == 1000


def test_a_text_message_is_refused_with_1003(served: ServedApp) -> None:
    served.guest("v1")

    async def scenario() -> Any:
        async with websocket(served, "/v1/vms/v1/vsock/1024") as client:
            await client.send("hello")
            with pytest.raises(ConnectionClosedError):
                await client.recv()
            return client.close_code

    assert run(scenario()) == 1003


def test_a_client_that_closes_closes_the_guests_connection_at_once(served: ServedApp) -> None:
    guest = served.guest("v1")

    async def scenario() -> float:
        async with websocket(served, "/v1/vms/v1/vsock/1024?linger=30") as client:
            await client.send(b"x")
            assert await client.recv() == b"x"
        closed = time.monotonic()
        while guest.open:
            await asyncio.sleep(0.01)
        return time.monotonic() - closed

    assert run(scenario()) < 1


def test_a_client_that_hangs_up_during_the_dial_stops_it(served: ServedApp) -> None:
    guest = served.guest("quiet", "silent")

    async def scenario() -> float:
        with pytest.raises(TimeoutError):
            await websocket(served, "/v1/vms/quiet/vsock/1024?timeout=60", open_timeout=0.5)
        left = time.monotonic()
        while guest.open:
            await asyncio.sleep(0.01)
        return time.monotonic() - left

    assert run(scenario()) < 2  # not the 60 s the dial had


def test_fifty_relays_hold_no_operation_slot_and_the_api_still_answers(served: ServedApp) -> None:
    served.guest("v1")

    async def scenario() -> tuple[list[int], list[bytes]]:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(websocket(served, f"/v1/vms/v1/vsock/{1000 + i}"))
                for i in range(50)
            ]
            transport = httpx.AsyncHTTPTransport(uds=str(served.socket))
            async with httpx.AsyncClient(transport=transport, base_url="http://roost") as api:
                # one operation slot and no queue: a relay holding one would make this busy
                answers = [
                    (await api.get("/healthz")).status_code,
                    (await api.post("/v1/vms/x/pause")).status_code,
                ]
            for i, client in enumerate(clients):
                await client.send(b"%d" % i)
            echoed = [await client.recv() for client in clients]
            return answers, echoed

    answers, echoed = run(scenario())
    assert answers == [200, 200]
    assert echoed == [b"%d" % i for i in range(50)]
    assert len(served.guests[0].connects) == 50


# ---- refusals ---------------------------------------------------------------------------


def test_an_unknown_vm_is_refused_404_not_found(served: ServedApp) -> None:
    status, error, _ = run(refusal(served, "/v1/vms/ghost/vsock/1024"))
    assert (status, error["code"]) == (404, "not_found")
    assert "ghost" in error["message"]


def test_a_vm_whose_vmm_does_not_run_is_refused_409_conflict(served: ServedApp) -> None:
    served.engine.targets["stopped"] = ConflictError("VM 'stopped' is stopped")
    status, error, _ = run(refusal(served, "/v1/vms/stopped/vsock/1024"))
    assert (status, error["code"]) == (409, "conflict")


def test_a_guest_that_does_not_answer_is_refused_502_after_the_timeout_naming_vm_and_port(
    served: ServedApp,
) -> None:
    served.guest("quiet", "silent")
    status, error, took = run(refusal(served, "/v1/vms/quiet/vsock/1024?timeout=1.5"))
    assert (status, error["code"]) == (502, "vmm_failed")
    assert "vsock port 1024 of VM 'quiet'" in error["message"]
    assert 1.5 <= took < 2.5


@pytest.mark.parametrize(
    ("path", "loc"),
    [
        ("/v1/vms/v1/vsock/0", "port"),
        ("/v1/vms/v1/vsock/4294967295", "port"),
        ("/v1/vms/v1/vsock/-1", "port"),
        ("/v1/vms/v1/vsock/http", "port"),
        ("/v1/vms/v1/vsock/" + "9" * 5000, "port"),
        ("/v1/vms/Bad_Name/vsock/1024", "name"),
        ("/v1/vms/v1/vsock/1024?timeout=0", "query.timeout"),
        ("/v1/vms/v1/vsock/1024?timeout=301", "query.timeout"),
        ("/v1/vms/v1/vsock/1024?timeout=nan", "query.timeout"),
        ("/v1/vms/v1/vsock/1024?timeout=soon", "query.timeout"),
        ("/v1/vms/v1/vsock/1024?linger=-1", "query.linger"),
        ("/v1/vms/v1/vsock/1024?linger=inf", "query.linger"),
        ("/v1/vms/v1/vsock/1024?wait=1", "query.wait"),
    ],
)
def test_a_request_that_breaks_a_rule_is_refused_422_at_its_place(
    served: ServedApp, path: str, loc: str
) -> None:
    guest = served.guest("v1")
    status, error, _ = run(refusal(served, path))
    assert (status, error["code"]) == (422, "invalid")
    assert [detail["loc"] for detail in error["details"]] == [loc]
    assert guest.connects == []


def test_the_largest_port_is_dialled(served: ServedApp) -> None:
    guest = served.guest("v1")

    async def scenario() -> None:
        async with websocket(served, "/v1/vms/v1/vsock/4294967294"):
            pass

    run(scenario())
    assert guest.connects == ["CONNECT 4294967294\n"]


# ---- TCP --------------------------------------------------------------------------------


def test_over_tcp_a_websocket_needs_the_token_and_the_listeners_host(served: ServedApp) -> None:
    served.guest("v1")
    url = f"ws://127.0.0.1:{served.tcp_port}/v1/vms/v1/vsock/1024"
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def refused(uri: str = url, **options: Any) -> tuple[int, str, Any]:
        with pytest.raises(InvalidStatus) as refusal:
            await connect(uri, proxy=None, **options)
        response = refusal.value.response
        code = json.loads(response.body)["error"]["code"]
        return response.status_code, code, response.headers.get("WWW-Authenticate")

    async def scenario() -> list[Any]:
        outcomes: list[Any] = [
            await refused(),
            await refused(additional_headers={"Authorization": "Bearer wrong"}),
            # a web page's request through DNS rebinding names its own host
            await refused(
                url.replace("127.0.0.1", "evil.example"),
                host="127.0.0.1",
                additional_headers=auth,
            ),
        ]
        async with connect(url, proxy=None, additional_headers=auth) as client:
            await client.send(b"over tcp")
            outcomes.append(await client.recv())
        return outcomes

    assert run(scenario()) == [
        (401, "unauthorized", "Bearer"),
        (401, "unauthorized", "Bearer"),
        (421, "misdirected", None),
        b"over tcp",
    ]
