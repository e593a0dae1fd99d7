"""Clients that hang up before they are answered: the routes that wait on something slow
before answering (a peer's WebSocket upgrade, a dial to a guest's vsock port) give the wait up
then, since nobody would be there for what it brings."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class ClientLeft(Exception):  # noqa: N818 - an outcome, not an error
    """The client hung up before it was answered."""


async def unless_client_leaves(hang_up: Awaitable[object], work: Awaitable[T]) -> T:
    """`work`, given up (ClientLeft) when `hang_up` comes first: the client's next message,
    which before an answer can only be a hang-up."""
    working = asyncio.ensure_future(work)
    hanging_up = asyncio.ensure_future(hang_up)
    try:
        await asyncio.wait({working, hanging_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hanging_up.cancel()
        working.cancel()  # nothing, when it is done
    await asyncio.wait({working})
    if working.cancelled():
        raise ClientLeft
    return working.result()
