"""`GET /metrics`: the engine's metrics and the API's own requests, in the Prometheus text
format. Open like `/healthz` (scrapers carry no token); the `Host` check still applies.

Each app has a registry of its own (not prometheus_client's global one), so tests can build
several apps; a scrape reads the database, so it runs on the read threads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from roost.engine.core import Engine

Read = Callable[..., Awaitable[Any]]
UNMATCHED = "unmatched"  # the route label of a path no route has


def add_metrics(app: FastAPI, engine: Engine, read: Read) -> None:
    """The `/metrics` route, and the middleware that counts requests (outside every other,
    so that refusals before a route runs count too)."""
    # each counter's and histogram's `_created` series (when it began) tells a scraper nothing
    # it needs here, and would double the output (prometheus_client's own, process-wide switch)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    registry.register(engine.metrics)
    requests = Counter(
        "roost_api_requests",
        "API requests answered, by method, route template and status (a WebSocket's accepted "
        "upgrade as 101)",
        ["method", "route", "status"],
        registry=registry,
    )
    app.add_middleware(RequestCounter, requests=requests)

    @app.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """The Prometheus text format (0.0.4), or what the scraper's `Accept` asks for
        (OpenMetrics, or the text format's version 1.0.0)."""
        encode, media_type = choose_encoder(request.headers.get("accept", ""))
        return Response(await read(encode, registry), media_type=media_type)


class RequestCounter:
    """Counts each request once its answer starts, by its route's template (never its path:
    names in paths would make a series per VM)."""

    def __init__(self, app: ASGIApp, *, requests: Counter) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        counted = False

        async def counting(message: Message) -> None:
            nonlocal counted
            status = _status(message)
            if status is not None and not counted:
                counted = True
                self._count(scope, status)
            await send(message)

        try:
            await self.app(scope, receive, counting)
        except BaseException:
            if not counted:  # the server answers 500 for what the app raised
                self._count(scope, 500)
            raise

    def _count(self, scope: Scope, status: int) -> None:
        method = scope.get("method", "GET")
        self.requests.labels(method, _template(scope), str(status)).inc()


def _status(message: Message) -> int | None:
    """The status an ASGI message starts an answer with, if it starts one."""
    kind = message["type"]
    if kind in ("http.response.start", "websocket.http.response.start"):
        return int(message["status"])
    if kind == "websocket.accept":
        return 101
    if kind == "websocket.close":  # before an accept: refused without a denial response
        return 403
    return None


def _template(scope: Scope) -> str:
    """The template of the route the request reached, or would have reached had it not been
    refused before routing (by the guard)."""
    route = scope.get("route")
    if route is None:
        routes = getattr(scope.get("app"), "routes", [])
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return str(getattr(route, "path", UNMATCHED))
