"""Recording what an operation did, so a failure can undo it in reverse order."""

from __future__ import annotations

import logging
from collections.abc import Callable

from roost.engine.failpoints import failpoint

log = logging.getLogger("roost.engine")


class Steps:
    """The steps of one operation on one VM, each with the action that undoes it."""

    def __init__(self, operation: str, vm: str) -> None:
        self.operation = operation
        self.vm = vm
        self._undo: list[tuple[str, Callable[[], object]]] = []

    def done(self, step: str, what: str, undo: Callable[[], object] | None = None) -> None:
        """Record step `step` (its id is `<operation>:<step>`, one of `failpoints.STEPS`) and
        how to undo it; the step's failpoint follows."""
        log.debug("%s %s: %s", self.operation, self.vm, what)
        if undo is not None:
            self._undo.append((what, undo))
        failpoint(f"{self.operation}:{step}")

    def undoable(self, what: str, undo: Callable[[], object]) -> None:
        """Record how to undo part of a step still under way: it has no failpoint of its own
        (the step's `done` has it)."""
        log.debug("%s %s: %s", self.operation, self.vm, what)
        self._undo.append((what, undo))

    def mark(self) -> int:
        """A point to roll back to: `rollback(mark)` undoes only what was done after it."""
        return len(self._undo)

    def rollback(self, to: int = 0) -> None:
        """Undo every step recorded after `to` (all of them by default), newest first; an undo
        that fails is logged, not raised, so the others still run."""
        while len(self._undo) > to:
            what, undo = self._undo.pop()
            try:
                undo()
                log.info("%s %s: undid %s", self.operation, self.vm, what)
            except Exception:
                log.exception("%s %s: could not undo %s", self.operation, self.vm, what)
