"""One operation at a time per VM, and none on a VM the daemon has not recovered yet."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from roost.errors import ConflictError, HostError, UnavailableError

RECOVERING_RETRY_AFTER = 1.0


class VMLocks:
    """Per-VM exclusivity: a second operation on a busy VM gets `vm_busy` (an exit handler
    waits its turn instead). While the daemon recovers after a restart, operations on VMs not
    recovered yet, and creates, get `recovering` (503, retried by the CLI)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._doing: dict[str, str] = {}
        self._unrecovered: set[str] = set()
        self._failed: dict[str, str] = {}  # VMs recovery could not recover, and why
        self._recovering = False

    @contextmanager
    def hold(
        self,
        name: str,
        what: str,
        *,
        wait: bool = False,
        new: bool = False,
        recovery: bool = False,
    ) -> Iterator[None]:
        """Hold `name` for `what`; `new` for a create (refused while recovery runs: it would
        race the removal of what belongs to no VM); `recovery` for recovery's own work."""
        with self._guard:
            if name in self._failed and not recovery:
                raise HostError(
                    f"the daemon could not recover VM {name!r} when it started "
                    f"({self._failed[name]}); it is left as it was: fix the cause and restart "
                    "the daemon"
                )
            if self._recovering and not recovery and (new or name in self._unrecovered):
                raise UnavailableError(
                    f"the daemon is recovering after a restart and has not reached VM {name!r} "
                    "yet; try again in a moment",
                    code="recovering",
                    retry_after=RECOVERING_RETRY_AFTER,
                )
            lock = self._locks.setdefault(name, threading.Lock())
        if not lock.acquire(blocking=wait):
            doing = self._doing.get(name, "another operation")
            raise ConflictError(
                f"VM {name!r} is busy ({doing}); try again when it has finished",
                code="vm_busy",
            )
        self._doing[name] = what
        try:
            yield
        finally:
            self._doing.pop(name, None)
            lock.release()

    # ---- recovery -----------------------------------------------------------------------

    def begin_recovery(self, names: Iterable[str]) -> None:
        with self._guard:
            self._unrecovered = set(names)
            self._recovering = True

    def recovered(self, name: str) -> None:
        with self._guard:
            self._unrecovered.discard(name)

    def failed(self, name: str, reason: str) -> None:
        with self._guard:
            self._unrecovered.discard(name)
            self._failed[name] = reason

    def end_recovery(self) -> None:
        with self._guard:
            self._unrecovered.clear()
            self._recovering = False

    @property
    def recovering(self) -> bool:
        return self._recovering

    @property
    def unrecovered(self) -> int:
        return len(self._unrecovered)
