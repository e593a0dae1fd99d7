"""Failpoints: `ROOST_FAILPOINT=<step id>` makes the daemon SIGKILL itself right after that
step, so tests can prove what a restart makes of an operation cut short there. Read once, at
start; without the variable a failpoint is one comparison with None.

Step ids (also in the README): `create:recorded` (the create is recorded as in progress),
`create:allocated` (its record, leases, tap and rules are committed), `create:booted` (the
guest was booted; the create has not answered yet), `start:vmm` (a start's VMM process has been
asked for; nothing else of the start is done).
"""

from __future__ import annotations

import os
import signal

ARMED = os.environ.get("ROOST_FAILPOINT") or None


def failpoint(step: str) -> None:
    if step == ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
