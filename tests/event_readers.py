"""Reading an event bus in tests: its subscriptions are asyncio, the tests are not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from roost.engine.events import Event, Subscription

T = TypeVar("T")


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


async def take(reader: Subscription, count: int, timeout: float = 30) -> list[Event]:
    """The next `count` events (overflows included) of `reader`; `timeout` bounds a hang, it
    measures nothing."""
    taken: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(taken) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(taken)} of {count} events came"
        events = await reader.next(left)
        assert events is not None, "the bus closed"
        taken += events
    return taken
