"""A cluster agent whose membership is in doubt takes no changes: every request but a read
(GET, HEAD, OPTIONS) and every WebSocket (a vsock connection to a guest whose VMM the agent
may be ending) is refused 503 `fenced` while `refusal` says why (see
`roost.engine.cluster.Member.refusal`). Reads still work: they change nothing."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from roost.api.guard import DENIAL_RESPONSE
from roost.api.replies import error_response
from roost.errors import RoostError

READS = frozenset({"GET", "HEAD", "OPTIONS"})
TRY_AGAIN_LATER = 1013  # the WebSocket close code, where no denial response can be sent


class Fencing:
    """Pure ASGI: asks `refusal` (cheap, on the event loop) for each request that is not a
    read and each WebSocket upgrade, and answers with its error instead of the route while
    there is one (an upgrade: as its denial response, else closed 1013 `fenced`)."""

    def __init__(self, app: ASGIApp, *, refusal: Callable[[], RoostError | None]) -> None:
        self.app = app
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        changes = kind == "websocket" or (kind == "http" and scope["method"] not in READS)
        error = self.refusal() if changes else None
        if error is None:
            await self.app(scope, receive, send)
        elif kind == "http" or DENIAL_RESPONSE in scope.get("extensions", {}):
            await error_response(error)(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": TRY_AGAIN_LATER, "reason": "fenced"})
