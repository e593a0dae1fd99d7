"""The API of the daemon's relays: forwards it holds for a VM (`/v1/vms/{name}/forwards`), and
who may point a VM's `vsock_services` at what.

Adding or removing a forward is quick (a bind and a row), so it runs on the read threads, not
as an operation; the connections a forward relays are not requests at all (they run on the
relays' own event loop).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field, StrictInt

from roost.api.bodies import BodySchemas
from roost.api.endpoints import Endpoint
from roost.engine.core import Engine
from roost.engine.relays import VsockRelays
from roost.engine.settings import Settings
from roost.errors import ErrorDetail, InvalidError, RoostError
from roost.spec import load_json, parse
from roost.spec.common import Spec, check_name
from roost.spec.vmconfig import MAX_VSOCK_PORT, MIN_VSOCK_PORT, UnixService, service_target

Read = Callable[..., Awaitable[Any]]


class ForwardRequest(Spec):
    """`POST /v1/vms/{name}/forwards`: listen on `listen`, relay to the guest's `guest_port`."""

    listen: Annotated[str, Field(max_length=64, description="ADDR:PORT on a loopback address")]
    guest_port: Annotated[StrictInt, Field(ge=MIN_VSOCK_PORT, le=MAX_VSOCK_PORT)]


def _relays(engine: Engine) -> VsockRelays:
    relays = engine.listeners
    if not isinstance(relays, VsockRelays):
        raise RoostError("this daemon was built without vsock relays, so it holds no forwards")
    return relays


def add_forward_routes(app: FastAPI, engine: Engine, read: Read, bodies: BodySchemas) -> None:
    """`POST`, `GET` and `DELETE` of a VM's forwards (404 for an unknown VM or forward)."""

    @app.post("/v1/vms/{name}/forwards", status_code=201, openapi_extra=bodies.of(ForwardRequest))
    async def add_forward(name: str, request: Request) -> JSONResponse:
        check_name(name)
        asked = await read(parse, ForwardRequest, await read(load_json, await request.body()))
        added = await read(_relays(engine).add_forward, name, asked.listen, asked.guest_port)
        return JSONResponse(added.to_json(), status_code=201)

    @app.get("/v1/vms/{name}/forwards")
    async def list_forwards(name: str) -> JSONResponse:
        found = await read(_relays(engine).list_forwards, check_name(name))
        return JSONResponse([forward.to_json() for forward in found])

    @app.delete("/v1/vms/{name}/forwards/{forward_id}", status_code=204)
    async def remove_forward(name: str, forward_id: int) -> Response:
        await read(_relays(engine).remove_forward, check_name(name), forward_id)
        return Response(status_code=204)


@dataclass(frozen=True)
class ServicePolicy:
    """Which `vsock_services` targets a client may set. A target is a host resource the guest
    then reaches as root's daemon does: Unix-socket clients (root) may name any; TCP clients
    only Unix sockets under a `--service-dir` (never a TCP target: no directory holds one).
    Nobody may name the daemon's own API socket (the guest would drive the daemon)."""

    service_dirs: tuple[Path, ...]
    api_sockets: frozenset[Path]

    @classmethod
    def of(cls, settings: Settings, endpoints: list[Endpoint]) -> ServicePolicy:
        sockets = frozenset(_resolved(e.path) for e in endpoints if e.path is not None)
        return cls(tuple(_resolved(d) for d in settings.service_dirs), sockets)

    def check(self, services: Mapping[int, str] | None, unix_client: bool) -> None:
        """422 `invalid` for the API socket as a target, else 403 `forbidden` for each target
        a TCP client may not set; every offending port named."""
        refused: list[ErrorDetail] = []
        forbidden: list[ErrorDetail] = []
        for port, text in (services or {}).items():
            target = service_target(text)
            loc = f"vsock_services.{port}"
            if isinstance(target, UnixService):
                path = _resolved(Path(target.path))
                if path in self.api_sockets:
                    refused.append(
                        ErrorDetail(
                            loc,
                            f"{text} is this daemon's own API socket: a guest must not drive "
                            "the daemon; name the service's own socket",
                        )
                    )
                    continue
                if unix_client or any(path.is_relative_to(d) for d in self.service_dirs):
                    continue
                dirs = ", ".join(map(str, self.service_dirs)) or "none is set"
                why = f"is not under a --service-dir of the daemon ({dirs})"
            elif unix_client:
                continue
            else:
                why = "is a TCP service, which only the daemon's Unix socket may name"
            forbidden.append(
                ErrorDetail(
                    loc,
                    f"{text} {why}: vsock services are host resources; set them over the "
                    "daemon's Unix socket (as root)",
                )
            )
        if refused:
            raise InvalidError.of(refused)
        if forbidden:
            first = forbidden[0]
            more = f" (and {len(forbidden) - 1} more)" if len(forbidden) > 1 else ""
            raise RoostError(f"{first.loc}: {first.msg}{more}", forbidden, code="forbidden")


def _resolved(path: Path) -> Path:
    """`path` with its symlinks and `..` resolved, as far as it exists (a service's socket
    may not yet)."""
    return Path(os.path.realpath(path))
