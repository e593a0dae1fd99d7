"""The API of networks: list, register (`POST /v1/networks`), show and remove them.

Registering and removing a network makes or removes a bridge, so they run as operations;
registering an external network (it lets VMs onto a host bridge) or a cni one (its plugins run
as root) is an operator's act, so only the daemon's Unix socket, whose clients are root, may do
it: TCP clients get 403 `forbidden`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from roost.api.bodies import BodySchemas
from roost.api.operations import OperationGate
from roost.api.replies import on_unix_socket
from roost.engine.core import Engine
from roost.errors import ErrorDetail, RoostError
from roost.plan.registration import NetworkCreate, parse_network_create
from roost.spec import load_json
from roost.spec.common import check_name

Read = Callable[..., Awaitable[Any]]


def add_network_routes(
    app: FastAPI, engine: Engine, read: Read, gate: OperationGate, bodies: BodySchemas
) -> None:
    """`GET /v1/networks`, `POST /v1/networks` (201), `GET` and `DELETE` (204) of one."""

    @app.get("/v1/networks")
    async def list_networks() -> JSONResponse:
        return JSONResponse(await read(engine.list_networks))

    @app.post("/v1/networks", status_code=201, openapi_extra=bodies.of(NetworkCreate))
    async def create_network(request: Request) -> JSONResponse:
        asked = await read(parse_network_create, await read(load_json, await request.body()))
        if asked.external and not on_unix_socket(request.scope):
            raise RoostError(
                "external: registering an operator's bridge is an operator's act; do it over "
                "the daemon's Unix socket (as root)",
                [ErrorDetail("external", "only the daemon's Unix socket may register one")],
                code="forbidden",
            )
        if asked.cni is not None and not on_unix_socket(request.scope):
            raise RoostError(
                "cni: a conflist's plugins run as root, so registering one is an operator's "
                "act; do it over the daemon's Unix socket (as root)",
                [ErrorDetail("cni", "only the daemon's Unix socket may register one")],
                code="forbidden",
            )
        return JSONResponse(await gate.run(engine.networks.create, asked), status_code=201)

    @app.get("/v1/networks/{name}")
    async def show_network(name: str) -> JSONResponse:
        return JSONResponse(await read(engine.networks.show, check_name(name)))

    @app.delete("/v1/networks/{name}", status_code=204)
    async def remove_network(name: str) -> Response:
        await gate.run(engine.networks.remove, check_name(name))
        return Response(status_code=204)
