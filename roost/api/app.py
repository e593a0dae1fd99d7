"""The REST API: a thin layer that parses requests, calls the engine and maps errors to
`{"error": {"code", "message", "details"}}` with the right status."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from roost import __version__
from roost.api.endpoints import Endpoint
from roost.engine.core import Engine
from roost.errors import ErrorDetail, InvalidError, NotFoundError, RoostError
from roost.spec import Manifest, VMConfig, load_json, parse
from roost.spec.common import check_name
from roost.spec.parse import dotted

log = logging.getLogger("roost.api")
NDJSON = "application/x-ndjson"
PROGRESS_INTERVAL = 0.2
FOLLOW_INTERVAL = 0.2


def error_response(error: RoostError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.http_status)


def _schema_body(model: type[Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    schema = model.model_json_schema()
    if extra:
        schema = {**schema, "properties": {**schema["properties"], **extra}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _json_body(request: Request) -> Any:
    return load_json(await request.body())


def create_app(engine: Engine, endpoints: list[Endpoint]) -> FastAPI:
    app = FastAPI(title="roost", version=__version__, description="microVMs for plugins")

    @app.exception_handler(RoostError)
    async def _roost_error(_: Request, error: RoostError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: NotFoundError, 405: InvalidError}
        kind = codes.get(error.status_code, RoostError)
        body = kind(f"{error.detail}: see GET /openapi.json for the routes").to_json()
        return JSONResponse(body, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _request_error(_: Request, error: RequestValidationError) -> JSONResponse:
        details = [
            ErrorDetail(dotted(tuple(item["loc"][1:])), item["msg"]) for item in error.errors()
        ]
        return error_response(InvalidError.of(details))

    @app.exception_handler(Exception)
    async def _bug(_: Request, error: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(RoostError(f"internal error (a bug in roost): {error!r}"))

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/v1/plugins")
    def list_plugins() -> JSONResponse:
        return JSONResponse(engine.plugins.list())

    @app.post("/v1/plugins", status_code=201, openapi_extra=_schema_body(Manifest))
    async def install_plugin(
        request: Request, force: bool = Query(False, description="replace an installed plugin")
    ) -> Any:
        manifest = parse(Manifest, await _json_body(request))
        if NDJSON not in request.headers.get("accept", ""):
            result = await run_in_threadpool(engine.plugins.install, manifest, force=force)
            return JSONResponse(result, status_code=201)
        return StreamingResponse(
            _install_with_progress(engine, manifest, force), media_type=NDJSON, status_code=201
        )

    @app.get("/v1/plugins/{name}")
    def show_plugin(name: str) -> JSONResponse:
        return JSONResponse(engine.plugins.show(name))

    @app.delete("/v1/plugins/{name}", status_code=204)
    def remove_plugin(name: str) -> Response:
        engine.plugins.remove(name)
        return Response(status_code=204)

    @app.get("/v1/vms")
    def list_vms() -> JSONResponse:
        return JSONResponse(engine.list_vms())

    create_extra = {
        "name": {"type": "string", "description": "the VM's name (a DNS label)"},
        "start": {"type": "boolean", "default": True},
    }

    @app.post("/v1/vms", status_code=201, openapi_extra=_schema_body(VMConfig, create_extra))
    async def create_vm(request: Request) -> JSONResponse:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise InvalidError.at("-", "must be a JSON object")
        name, start = body.pop("name", None), body.pop("start", True)
        if not isinstance(name, str):
            raise InvalidError.at("name", "is required: the VM's name")
        if not isinstance(start, bool):
            raise InvalidError.at("start", "must be true or false")
        check_name(name)
        config = parse(VMConfig, body)
        result = await run_in_threadpool(engine.create_vm, name, config, start=start)
        return JSONResponse(result, status_code=201)

    @app.get("/v1/vms/{name}")
    def show_vm(name: str) -> JSONResponse:
        return JSONResponse(engine.show_vm(name))

    @app.delete("/v1/vms/{name}", status_code=204)
    def remove_vm(name: str) -> Response:
        engine.destroy_vm(name)
        return Response(status_code=204)

    @app.post("/v1/vms/{name}/start")
    def start_vm(name: str) -> JSONResponse:
        return JSONResponse(engine.start_vm(name))

    @app.post("/v1/vms/{name}/stop")
    def stop_vm(
        name: str,
        timeout: float | None = Query(
            None, ge=0, le=3600, description="seconds to wait for a graceful shutdown"
        ),
        force: bool = Query(False, description="kill at once"),
    ) -> JSONResponse:
        return JSONResponse(engine.stop_vm(name, timeout=timeout, force=force))

    @app.post("/v1/vms/{name}/restart")
    def restart_vm(name: str) -> JSONResponse:
        return JSONResponse(engine.restart_vm(name))

    @app.post("/v1/vms/{name}/pause")
    def pause_vm(name: str) -> JSONResponse:
        return JSONResponse(engine.pause_vm(name))

    @app.post("/v1/vms/{name}/resume")
    def resume_vm(name: str) -> JSONResponse:
        return JSONResponse(engine.resume_vm(name))

    @app.get("/v1/vms/{name}/console")
    def console(
        name: str,
        follow: bool = Query(False, description="keep streaming while the VM runs"),
        offset: int = Query(0, ge=0, description="start at this byte"),
    ) -> Response:
        path, _ = engine.console(name)
        if not follow:
            return PlainTextResponse(_read_from(path, offset))
        return StreamingResponse(_follow(engine, name, path, offset), media_type="text/plain")

    @app.get("/v1/networks")
    def list_networks() -> JSONResponse:
        return JSONResponse(engine.list_networks())

    return app


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as reader:
            reader.seek(offset)
            return reader.read()
    except FileNotFoundError:
        return b""


async def _follow(engine: Engine, name: str, path: Path, offset: int) -> AsyncIterator[bytes]:
    """The console from `offset` on, as it grows, until the VM stops and all is sent."""
    while True:
        chunk = await run_in_threadpool(_read_from, path, offset)
        if chunk:
            offset += len(chunk)
            yield chunk
            continue
        try:
            _, live = await run_in_threadpool(engine.console, name)
        except RoostError:
            return
        if not live:
            return
        await asyncio.sleep(FOLLOW_INTERVAL)


async def _install_with_progress(
    engine: Engine, manifest: Manifest, force: bool
) -> AsyncIterator[bytes]:
    """Progress events as JSON lines while the install runs, then the plugin (or the error)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    last_sent = {"at": 0.0}

    def progress(event: dict[str, Any]) -> None:
        now = time.monotonic()
        done = event.get("done") == event.get("total")
        if event["event"] == "progress" and not done and now - last_sent["at"] < PROGRESS_INTERVAL:
            return
        last_sent["at"] = now
        loop.call_soon_threadsafe(queue.put_nowait, event)

    async def install() -> dict[str, Any]:
        try:
            return await run_in_threadpool(
                engine.plugins.install, manifest, force=force, progress=progress
            )
        except RoostError as error:
            return error.to_json()

    task = asyncio.create_task(install())
    while not task.done() or not queue.empty():
        getter = asyncio.ensure_future(queue.get())
        finished, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in finished:
            yield (json.dumps(getter.result()) + "\n").encode()
        else:
            getter.cancel()
    yield (json.dumps(task.result()) + "\n").encode()
