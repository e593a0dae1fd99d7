"""The API of network policies: list, create (`POST /v1/policies`, 409 `exists`), show (with
each rule's counters), create or replace (`PUT`: 201 when it created, 200 when it replaced)
and remove (409 `policy_in_use` while a VM names it).

Writes change nftables in the daemon's namespace, so they run as operations.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from roost.api.bodies import BodySchemas
from roost.api.operations import OperationGate
from roost.engine.core import Engine
from roost.spec import load_json
from roost.spec.common import check_name
from roost.spec.policy import Policy, parse_policy

Read = Callable[..., Awaitable[Any]]


def add_policy_routes(
    app: FastAPI, engine: Engine, read: Read, gate: OperationGate, bodies: BodySchemas
) -> None:
    """`GET`/`POST /v1/policies`, `GET`/`PUT`/`DELETE /v1/policies/{name}`."""

    async def body_of(request: Request, name: str | None = None) -> Policy:
        policy: Policy = await read(parse_policy, await read(load_json, await request.body()), name)
        return policy

    @app.get("/v1/policies")
    async def list_policies() -> JSONResponse:
        return JSONResponse(await read(engine.policies.list))

    @app.post("/v1/policies", status_code=201, openapi_extra=bodies.of(Policy))
    async def create_policy(request: Request) -> JSONResponse:
        policy = await body_of(request)
        return JSONResponse(await gate.run(engine.policies.create, policy), status_code=201)

    @app.get("/v1/policies/{name}")
    async def show_policy(name: str) -> JSONResponse:
        return JSONResponse(await read(engine.policies.show, check_name(name)))

    @app.put("/v1/policies/{name}", openapi_extra=bodies.of(Policy))
    async def apply_policy(name: str, request: Request) -> JSONResponse:
        policy = await body_of(request, check_name(name))
        view, created = await gate.run(engine.policies.apply, policy)
        return JSONResponse(view, status_code=201 if created else 200)

    @app.delete("/v1/policies/{name}", status_code=204)
    async def remove_policy(name: str) -> Response:
        await gate.run(engine.policies.remove, check_name(name))
        return Response(status_code=204)
