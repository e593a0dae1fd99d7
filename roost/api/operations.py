"""Where long operations run: VM lifecycle and plugin installs and removals wait on VMMs and
downloads for seconds, so they get threads of their own, a bounded number of them and a
bounded queue, and can never take the threads that reads and `/healthz` answer with."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from roost.errors import UnavailableError

T = TypeVar("T")
BUSY_RETRY_AFTER = 2.0  # seconds a client told `busy` waits before asking again


class OperationGate:
    """Runs operations on `workers` threads with at most `queued` more waiting for one;
    beyond that an operation is refused at once (503 `busy`, with a Retry-After)."""

    def __init__(self, workers: int, queued: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="roost-op")
        self._workers = workers
        self._limit = workers + queued
        self._admitted = 0
        self._lock = threading.Lock()

    def submit(self, work: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """`work(*args, **kwargs)` on an operation thread, as a future of the running loop;
        `UnavailableError` (busy) when as many operations as allowed are running or waiting.
        Cancelling the future before a thread took the operation drops it."""
        with self._lock:
            if self._admitted >= self._limit:
                raise UnavailableError(
                    f"the daemon is busy: {self._workers} operations are running and "
                    f"{self._limit - self._workers} more are waiting (roost serve "
                    "--max-operations); try again shortly",
                    code="busy",
                    retry_after=BUSY_RETRY_AFTER,
                )
            self._admitted += 1
        try:
            future = self._executor.submit(work, *args, **kwargs)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return asyncio.wrap_future(future)

    async def run(self, work: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return await self.submit(work, *args, **kwargs)

    def _release(self, _: Future[Any] | None) -> None:
        with self._lock:
            self._admitted -= 1

    def close(self) -> None:
        """Drop what waits for a thread and wait for what runs: the engine closes after."""
        self._executor.shutdown(wait=True, cancel_futures=True)
