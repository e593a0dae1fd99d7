"""roost ui's forwarder (roost.cli.ui.DaemonForwarder) on its own: what the browser gets when
the daemon does not answer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from roost.api.sessions import CSP
from roost.cli.ui import DaemonForwarder


def test_a_daemon_out_of_reach_is_answered_with_the_view_s_security_headers(
    tmp_path: Path,
) -> None:
    forwarder = DaemonForwarder(f"unix://{tmp_path / 'absent.sock'}", None, None)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/v1/vms",
        "raw_path": b"/api/v1/vms",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8090")],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def forward() -> None:
        try:
            await forwarder(scope, receive, send)  # type: ignore[arg-type]
        finally:
            await forwarder.aclose()

    asyncio.run(forward())
    start = sent[0]
    headers = {name.decode(): value.decode() for name, value in start["headers"]}
    assert start["status"] >= 500
    assert headers["content-security-policy"] == CSP
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"
