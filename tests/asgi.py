"""Raw ASGI requests, for tests that drive the app message by message."""

from __future__ import annotations

from typing import Any

UNIX_SERVER = ("/run/roost/roost.sock", None)  # how uvicorn names a Unix socket listener


def json_post_scope(path: str, content_length: int) -> dict[str, Any]:
    """The scope of a JSON POST to `path` on the Unix socket, announcing `content_length`."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(content_length).encode()),
        ],
        "server": UNIX_SERVER,
        "client": None,
    }
