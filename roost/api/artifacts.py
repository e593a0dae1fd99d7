"""`GET /v1/artifacts/{sha256}`: a stored artifact's bytes, for the peer agents of a cluster
that lack it (roost.engine.artifact_peers), behind the same checks as every route (the token on
TCP). Read-only: the store's files never change once stored."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, BinaryIO

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from roost.engine.core import Engine
from roost.errors import InvalidError, NotFoundError
from roost.state.artifacts import CHUNK, ArtifactStore

SHA256 = re.compile(r"[0-9a-f]{64}")
OCTETS = "application/octet-stream"
Read = Callable[..., Awaitable[Any]]


def add_artifact_routes(app: FastAPI, engine: Engine, read: Read) -> None:
    @app.get(
        "/v1/artifacts/{sha256}",
        response_class=StreamingResponse,
        responses={200: {"content": {OCTETS: {}}, "description": "the artifact's bytes"}},
    )
    async def get_artifact(sha256: str) -> StreamingResponse:
        reader, size = await read(_open, engine.store, sha256)
        return StreamingResponse(
            _chunks(read, reader),
            media_type=OCTETS,
            headers={"content-length": str(size)},
        )


def _open(store: ArtifactStore, sha256: str) -> tuple[BinaryIO, int]:
    """The stored file, open (so a collection that removes it meanwhile changes nothing for
    this answer), and its size."""
    if not SHA256.fullmatch(sha256):
        raise InvalidError.at(
            "sha256", "must be a sha256 digest: 64 lowercase hexadecimal characters"
        )
    try:
        reader = store.path(sha256).open("rb")
    except FileNotFoundError:
        raise NotFoundError(f"artifact sha256 {sha256} is not in this host's store") from None
    return reader, os.fstat(reader.fileno()).st_size


async def _chunks(read: Read, reader: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await read(reader.read, CHUNK):
            yield chunk
    finally:
        reader.close()
