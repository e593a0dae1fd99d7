"""The API of a cluster's hosts: `GET /v1/hosts`, `GET /v1/hosts/{name}` and
`POST /v1/hosts/{name}/cordon|uncordon|drain` (`roost.engine.hosts`).

Every agent answers for every host from the database, without forwarding: a host that is
offline can still be shown, cordoned and drained. Under SQLite (no cluster) the list is empty
and the rest is 404 saying so.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from roost.engine.core import Engine
from roost.engine.hosts import HostAdmin
from roost.spec.common import check_name

Read = Callable[..., Awaitable[Any]]


def add_host_routes(app: FastAPI, engine: Engine, read: Read) -> None:
    """`GET /v1/hosts`, `GET /v1/hosts/{name}`, `POST /v1/hosts/{name}/cordon`, `/uncordon`
    and `/drain`."""

    @cache
    def hosts() -> HostAdmin:
        """Made at the first request, from an engine that is whole by then."""
        return HostAdmin(engine.settings, engine.db, engine.events, engine.allocator)

    @app.get("/v1/hosts")
    async def list_hosts() -> JSONResponse:
        return JSONResponse(await read(lambda: hosts().list()))

    @app.get("/v1/hosts/{name}")
    async def show_host(name: str) -> JSONResponse:
        return JSONResponse(await read(lambda: hosts().show(check_name(name))))

    @app.post("/v1/hosts/{name}/cordon")
    async def cordon_host(name: str) -> JSONResponse:
        return JSONResponse(await read(lambda: hosts().cordon(check_name(name), True)))

    @app.post("/v1/hosts/{name}/uncordon")
    async def uncordon_host(name: str) -> JSONResponse:
        return JSONResponse(await read(lambda: hosts().cordon(check_name(name), False)))

    @app.post("/v1/hosts/{name}/drain")
    async def drain_host(name: str) -> JSONResponse:
        return JSONResponse(await read(lambda: hosts().drain(check_name(name))))
