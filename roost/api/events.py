"""`GET /v1/events`: the daemon's events as Server-Sent Events (in a cluster, every host's:
`roost.engine.clusterevents`).

A stream, not an operation: it takes no operation slot and no thread (it waits on the event
loop for what the bus hands it), so any number of readers leave `--max-operations` and the
read threads to requests. It ends when its reader leaves or the daemon stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI, Header, Query
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from roost.engine.events import EventBus, Subscription
from roost.spec.common import check_name

HEARTBEAT = 15.0  # seconds between keep-alive comments on a quiet stream
# the stream's first block: how long a browser's EventSource waits before it reconnects, and
# for every client the sign that it follows
RETRY = b"retry: 1000\n\n"
MAX_ID = 2**63 - 1
EVENT_STREAM = "text/event-stream"


def add_event_routes(app: FastAPI, bus: EventBus) -> None:
    @app.get(
        "/v1/events",
        response_class=StreamingResponse,
        responses={200: {"content": {EVENT_STREAM: {}}, "description": "an event stream"}},
    )
    async def events(
        vm: str | None = Query(None, description="only the events of this VM"),
        last_event_id: int | None = Header(
            None,
            alias="Last-Event-ID",
            ge=0,
            le=MAX_ID,
            description="resume after this event (from the last 1,000; a cluster's last 10,000)",
        ),
    ) -> StreamingResponse:
        """Events from now on, or after `Last-Event-ID`; `event: overflow` says some were
        lost. Subscribed before the answer starts: nothing published after the request
        arrived is missed."""
        reader = bus.subscribe(last_event_id, None if vm is None else check_name(vm, "query.vm"))
        return _EventStream(reader)


class _EventStream(StreamingResponse):
    """The stream of one subscription, which ends with the response however that ends (its
    client may leave before the first event, when no generator's `finally` would run)."""

    def __init__(self, reader: Subscription) -> None:
        super().__init__(
            _stream(reader),
            media_type=EVENT_STREAM,
            # no proxy may hold events back, nor a cache keep them
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
        self.reader = reader

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reader.close()


async def _stream(reader: Subscription) -> AsyncIterator[bytes]:
    yield RETRY
    while True:
        events = await reader.next(HEARTBEAT)
        if events is None:
            return
        if not events:
            yield b": keep-alive\n\n"
            continue
        yield b"".join(event.sse() for event in events)
