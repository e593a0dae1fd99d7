"""A cluster agent whose membership is in doubt takes no changes: every request but a read
(GET, HEAD, OPTIONS) is answered 503 `fenced` while `refusal` says why (see
`roost.engine.cluster.Member.refusal`). Reads still work: they change nothing."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from roost.api.replies import error_response
from roost.errors import RoostError

READS = frozenset({"GET", "HEAD", "OPTIONS"})


class Fencing:
    """Pure ASGI: asks `refusal` (cheap, on the event loop) for each request that is not a
    read, and answers with its error instead of the route while there is one."""

    def __init__(self, app: ASGIApp, *, refusal: Callable[[], RoostError | None]) -> None:
        self.app = app
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in READS:
            error = self.refusal()
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
