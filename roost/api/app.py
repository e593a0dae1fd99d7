"""The REST API: a thin layer that parses requests, calls the engine and maps errors to
`{"error": {"code", "message", "details"}}` with the right status.

Where work runs, so that the API keeps answering: long operations (VM lifecycle, plugin
installs and removals; a future PATCH of a VM's config too) on the operation gate's threads;
reads, body parsing and validation, and console chunks on threads of their own
(`READ_THREADS`); `/healthz` on a few more of its own. Nothing that blocks or takes long runs
on the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from roost import __version__
from roost.api.artifacts import add_artifact_routes
from roost.api.bodies import BodySchemas
from roost.api.endpoints import Endpoint
from roost.api.events import add_event_routes
from roost.api.fencing import Fencing
from roost.api.forwards import ServicePolicy, add_forward_routes
from roost.api.guard import Guard
from roost.api.hosts import add_host_routes
from roost.api.metrics import add_metrics
from roost.api.networks import add_network_routes
from roost.api.operations import OperationGate
from roost.api.peers import Forwarder, Forwarding, Router
from roost.api.placing import ClusterRouter, CreateRequest, Placer, create_request
from roost.api.policies import add_policy_routes
from roost.api.replies import error_response, on_unix_socket
from roost.api.ui import MOUNT, daemon_view
from roost.api.vmlist import add_vm_list_route
from roost.api.vsock import register_vsock_routes
from roost.engine.core import Engine
from roost.errors import ErrorDetail, InvalidError, NotFoundError, RoostError
from roost.spec import Manifest, VMConfig, VMConfigPatch, load_json, parse
from roost.spec.common import check_name
from roost.spec.parse import MESSAGES, dotted

log = logging.getLogger("roost.api")
T = TypeVar("T")
NDJSON = "application/x-ndjson"
PROGRESS_INTERVAL = 0.2
FOLLOW_INTERVAL = 0.2
READ_THREADS = 32
HEALTH_THREADS = 2
MAX_OFFSET = 2**63 - 1  # the largest position a file can be read from

# pydantic's wording for query parameters, rephrased as roost says it elsewhere
QUERY_MESSAGES = {
    **MESSAGES,
    "finite_number": "must be a finite number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "int_parsing": "must be a whole number",
    "int_parsing_size": "must be a whole number",
    "bool_parsing": "must be true or false",
}


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for dependency in dependant.dependencies:
        names |= _query_names(dependency)
    return names


async def _known_query_only(request: Request) -> None:
    """Refuse query parameters the route does not take: ignoring them silently did what the
    client did not ask (`POST /v1/vms?start=false` started the VM)."""
    route = request.scope.get("route")
    known = _query_names(route.dependant) if isinstance(route, APIRoute) else set()
    unknown = [name for name in dict.fromkeys(request.query_params.keys()) if name not in known]
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise InvalidError.of(
            [
                ErrorDetail(f"query.{name}", f"is not a parameter of this route (it takes {takes})")
                for name in unknown
            ]
        )


def create_app(
    engine: Engine,
    endpoints: list[Endpoint],
    router: Router | None = None,
    refusal: Callable[[], RoostError | None] | None = None,
) -> FastAPI:
    """The API of `engine` on `endpoints`; with a `router` (a cluster), the requests it
    sends to another host are forwarded there (roost.api.peers); with a `refusal` (a cluster
    agent's membership), changes are refused while it gives a reason (roost.api.fencing)."""
    settings = engine.settings
    gate = OperationGate(settings.max_operations, settings.max_queued_operations)
    services = ServicePolicy.of(settings, endpoints)
    reads = anyio.CapacityLimiter(READ_THREADS)
    probes = anyio.CapacityLimiter(HEALTH_THREADS)

    async def read(work: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(partial(work, *args), limiter=reads)

    async def json_body(request: Request) -> Any:
        return await read(load_json, await request.body())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if forwarder is not None:
                await forwarder.aclose()
            await anyio.to_thread.run_sync(gate.close)

    app = FastAPI(
        title="roost",
        version=__version__,
        description="microVMs for plugins",
        lifespan=lifespan,
        dependencies=[Depends(_known_query_only)],
    )
    bodies = BodySchemas()
    if refusal is not None:  # inside forwarding: what goes to another host is for it to judge
        app.add_middleware(Fencing, refusal=refusal)
    forwarder = None
    if router is not None:  # inside Guard: a request is checked here before it is sent on
        forwarder = Forwarder(router.host_name, settings.token, settings.ca)
        app.add_middleware(Forwarding, router=router, forwarder=forwarder)
    view, view_auth = daemon_view(settings.token)
    app.add_middleware(
        Guard,
        endpoints=endpoints,
        token=settings.token,
        max_body_bytes=settings.max_body_bytes,
        names=settings.server_names,
        view=view_auth,
    )

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
        details = []
        for item in error.errors():
            template = QUERY_MESSAGES.get(item["type"])
            msg = template.format(**item.get("ctx", {})) if template else item["msg"]
            details.append(ErrorDetail(dotted(tuple(item["loc"])), msg))
        return error_response(InvalidError.of(details))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # the client went away before its request was whole: nothing wrong, nobody to answer
        log.debug("client left during %s %s", request.method, request.url.path)
        return error_response(InvalidError("the request ended before its body was whole"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        # the server logs the traceback as the error leaves the app
        log.error("internal error in %s %s: %r", request.method, request.url.path, error)
        return error_response(RoostError(f"internal error (a bug in roost): {error!r}"))

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        health = await anyio.to_thread.run_sync(engine.health, limiter=probes)
        body = {**health, "version": __version__}
        if health.get("status") != "database_gone":
            return JSONResponse(body)
        gone = RoostError(
            "the daemon's database file is gone or was replaced while it ran; it refuses "
            "changes until it is restarted with its database in place",
            code="database_gone",
        )
        return JSONResponse({**body, **gone.to_json()}, status_code=gone.http_status)

    @app.get("/v1/plugins")
    async def list_plugins() -> JSONResponse:
        return JSONResponse(await read(engine.plugins.list))

    @app.post("/v1/plugins", status_code=201, openapi_extra=bodies.of(Manifest))
    async def install_plugin(
        request: Request, force: bool = Query(False, description="replace an installed plugin")
    ) -> Response:
        manifest = await read(parse, Manifest, await json_body(request))
        install = partial(
            engine.plugins.install,
            manifest,
            force=force,
            any_path=on_unix_socket(request.scope),
        )
        if NDJSON not in request.headers.get("accept", ""):
            return JSONResponse(await gate.run(install), status_code=201)
        return StreamingResponse(
            _install_with_progress(gate, install), media_type=NDJSON, status_code=201
        )

    @app.get("/v1/plugins/{name}")
    async def show_plugin(name: str) -> JSONResponse:
        return JSONResponse(await read(engine.plugins.show, check_name(name)))

    @app.delete("/v1/plugins/{name}", status_code=204)
    async def remove_plugin(name: str) -> Response:
        await gate.run(engine.plugins.remove, check_name(name))
        return Response(status_code=204)

    add_artifact_routes(app, engine, read)
    add_vm_list_route(app, engine, read)

    create_extra = {
        "name": {"type": "string", "description": "the VM's name (a DNS label)"},
        "start": {"type": "boolean", "default": True},
        "host": {"type": "string", "description": "the host to create it on (a cluster's)"},
        "host_labels": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "labels its host must have (a cluster's)",
        },
    }

    def create_here(wanted: CreateRequest, unix_client: bool) -> dict[str, Any]:
        services.check(wanted.config.vsock_services, unix_client)
        return engine.create_vm(wanted.name, wanted.config, start=wanted.start)

    placer = None
    if isinstance(router, ClusterRouter) and forwarder is not None:
        placer = Placer(engine, router, forwarder, partial(gate.run, create_here), read)

    @app.post("/v1/vms", status_code=201, openapi_extra=bodies.of(VMConfig, create_extra, ["name"]))
    async def create_vm(request: Request) -> Response:
        raw = await request.body()
        if placer is not None:
            return await placer.create(raw, request.scope, request.receive)
        unix_client = on_unix_socket(request.scope)

        def create() -> dict[str, Any]:
            """Parsed and judged on the operation's own thread: off the event loop, without
            a hand-over to another thread first (each costs about a millisecond here)."""
            return create_here(create_request(load_json(raw), cluster=False), unix_client)

        return JSONResponse(await gate.run(create), status_code=201)

    @app.get("/v1/vms/{name}")
    async def show_vm(name: str) -> JSONResponse:
        return JSONResponse(await read(engine.show_vm, check_name(name)))

    @app.delete("/v1/vms/{name}", status_code=204)
    async def remove_vm(name: str) -> Response:
        await gate.run(engine.destroy_vm, check_name(name))
        return Response(status_code=204)

    @app.post("/v1/vms/{name}/start")
    async def start_vm(name: str) -> JSONResponse:
        return JSONResponse(await gate.run(engine.start_vm, check_name(name)))

    @app.post("/v1/vms/{name}/stop")
    async def stop_vm(
        name: str,
        timeout: float | None = Query(
            None,
            ge=0,
            le=3600,
            allow_inf_nan=False,
            description="seconds to wait for a graceful shutdown",
        ),
        force: bool = Query(False, description="kill at once"),
    ) -> JSONResponse:
        stop = partial(engine.stop_vm, check_name(name), timeout=timeout, force=force)
        return JSONResponse(await gate.run(stop))

    @app.post("/v1/vms/{name}/restart")
    async def restart_vm(name: str) -> JSONResponse:
        return JSONResponse(await gate.run(engine.restart_vm, check_name(name)))

    @app.post("/v1/vms/{name}/pause")
    async def pause_vm(name: str) -> JSONResponse:
        return JSONResponse(await gate.run(engine.pause_vm, check_name(name)))

    @app.post("/v1/vms/{name}/resume")
    async def resume_vm(name: str) -> JSONResponse:
        return JSONResponse(await gate.run(engine.resume_vm, check_name(name)))

    @app.get("/v1/vms/{name}/config")
    async def show_config(name: str) -> JSONResponse:
        return JSONResponse(await read(engine.config, check_name(name)))

    @app.get("/v1/vms/{name}/config/history")
    async def config_history(name: str) -> JSONResponse:
        return JSONResponse(await read(engine.config_history, check_name(name)))

    @app.patch("/v1/vms/{name}/config", openapi_extra=bodies.of(VMConfigPatch))
    async def patch_config(
        name: str,
        request: Request,
        restart: bool = Query(False, description="apply at once: restart the VM if it must"),
    ) -> JSONResponse:
        check_name(name)
        patch = await read(parse, VMConfigPatch, await json_body(request))
        if patch.vsock_services:  # host resources: may this client name them? (resolves paths)
            await read(services.check, patch.vsock_services, on_unix_socket(request.scope))
        changed = partial(engine.patch_config, name, patch, restart=restart)
        return JSONResponse(await gate.run(changed))

    @app.get("/v1/vms/{name}/console")
    async def console(
        name: str,
        follow: bool = Query(False, description="keep streaming while the VM runs"),
        offset: int = Query(0, ge=0, le=MAX_OFFSET, description="start at this byte"),
    ) -> Response:
        path, _ = await read(engine.console, check_name(name))
        if not follow:
            return PlainTextResponse(await read(_read_from, path, offset))
        return StreamingResponse(_follow(read, engine, name, path, offset), media_type="text/plain")

    add_network_routes(app, engine, read, gate, bodies)
    add_policy_routes(app, engine, read, gate, bodies)
    add_forward_routes(app, engine, read, bodies)
    register_vsock_routes(app, engine, read)
    add_host_routes(app, engine, read)
    add_event_routes(app, engine.events)
    add_metrics(app, engine, read)
    app.mount(MOUNT, view)  # the web view (roost.api.ui), for browsers
    bodies.install(app)
    return app


def _read_from(path: Path, offset: int) -> bytes:
    """The file from `offset` on; nothing past its end (a filesystem refuses to seek beyond
    its largest file size). Under the jailer the console log is in a chroot its VMM's uid
    owns: a symlink or a FIFO put there reads as nothing (not a host file, not a hang)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    except OSError as error:
        if error.errno == errno.ELOOP:
            return b""
        raise
    with open(fd, "rb") as reader:
        status = os.fstat(reader.fileno())
        if not stat.S_ISREG(status.st_mode) or offset >= status.st_size:
            return b""
        reader.seek(offset)
        return reader.read()


async def _follow(
    read: Callable[..., Any], engine: Engine, name: str, path: Path, offset: int
) -> AsyncIterator[bytes]:
    """The console from `offset` on, as it grows, until the VM stops and all is sent."""
    while True:
        chunk = await read(_read_from, path, offset)
        if chunk:
            offset += len(chunk)
            yield chunk
            continue
        try:
            _, live = await read(engine.console, name)
        except RoostError:
            return
        if not live:
            return
        await asyncio.sleep(FOLLOW_INTERVAL)


def _line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data) + "\n").encode()


def _install_with_progress(
    gate: OperationGate, install: Callable[..., dict[str, Any]]
) -> AsyncIterator[bytes]:
    """Progress events as JSON lines while the install runs, then the plugin or the error
    object, whatever went wrong (the status line went out with the first event). The install
    is submitted at once, so that `busy` is an answer of its own, not a stream."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    throttle = _Throttle(PROGRESS_INTERVAL)

    def progress(event: dict[str, Any]) -> None:
        if throttle.passes(event):
            loop.call_soon_threadsafe(events.put_nowait, event)

    task = gate.submit(_logging_bugs, install, progress=progress)
    # a client that leaves stops the stream, not the install: its outcome is then nobody's
    task.add_done_callback(_settled)
    return _lines(task, events)


async def _lines(
    task: asyncio.Future[dict[str, Any]], events: asyncio.Queue[dict[str, Any]]
) -> AsyncIterator[bytes]:
    while not task.done() or not events.empty():
        getter = asyncio.ensure_future(events.get())
        finished, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in finished:
            yield _line(getter.result())
        else:
            getter.cancel()
    yield _line(_outcome(task))


def _logging_bugs(install: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """The install; a bug in it is logged here, once, with its traceback, whether or not
    its client is still there to be told."""
    try:
        return install(**kwargs)
    except RoostError:
        raise
    except Exception:
        log.exception("internal error while installing a plugin")
        raise


def _settled(task: asyncio.Future[Any]) -> None:
    """Mark an outcome as seen: an install whose client left logs no "exception was never
    retrieved"."""
    if not task.cancelled():
        task.exception()


def _outcome(task: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
    """The last line of the stream: the plugin, or the error object with its own code."""
    try:
        return task.result()
    except RoostError as error:
        return error.to_json()
    except Exception as error:
        return RoostError(f"internal error (a bug in roost): {error!r}").to_json()


class _Throttle:
    """Lets through every event but progress, and progress at most once per `interval`
    (and its last one, whatever the interval)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = 0.0

    def passes(self, event: dict[str, Any]) -> bool:
        now = time.monotonic()
        done = event.get("done") == event.get("total")
        if event["event"] == "progress" and not done and now - self.last < self.interval:
            return False
        self.last = now
        return True
