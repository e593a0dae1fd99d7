"""How an error goes out: its object, its status, and the headers its code calls for."""

from __future__ import annotations

import math

from starlette.responses import JSONResponse
from starlette.types import Scope

from roost.errors import RoostError

# set on a request a peer agent forwarded for a TCP client (roost.api.peers): it counts as TCP
TCP_CLIENT = "roost.tcp_client"


def error_response(error: RoostError) -> JSONResponse:
    """`{"error": {...}}` with the code's status; `Retry-After` (whole seconds) when the
    client may try again, `WWW-Authenticate` when it must bring a token."""
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if error.code == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.to_json(), status_code=error.http_status, headers=headers)


def on_unix_socket(scope: Scope) -> bool:
    """Whether a request came in on a Unix socket (whose clients are root), not over TCP:
    uvicorn gives `server` as (host, port) for a TCP listener and (path, None) for a Unix
    socket. Anything else counts as TCP, as does a request a peer agent forwarded from a TCP
    client."""
    server = scope.get("server")
    return server is not None and server[1] is None and not scope.get(TCP_CLIENT)
