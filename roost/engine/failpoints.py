"""Failpoints: `ROOST_FAILPOINT=<step id>` makes the daemon SIGKILL itself right after that
step is done and recorded, so tests can prove what a restart makes of an operation cut short
there. Read once, at start; without either variable a failpoint is two comparisons with None.
`ROOST_FAILPOINT_FILE=<path>` instead arms the step the file names, read at every step (none
while the file is empty or absent): a test can then arm one daemon again and again, instead of
starting one for each failpoint.

`STEPS` is every step id (the README's table), in the order an operation records them: what is
done at that point, and what recovery then does. Every step an operation records
(`Steps.done`) is one of them. A launch commits its allocation before it makes any tap (no host
work holds the database's write lock), so `allocated` comes before `tap` and `rules`.
"""

from __future__ import annotations

import os
import signal

_STOPPED = "the VM is recorded `stopped` (its VMM ended if it still runs), its tap released"


def _launch(operation: str) -> dict[str, tuple[str, str]]:
    """The steps a launch records, shared by create, start and restart."""
    undone = (
        "the create is rolled back: VMM ended, record, leases, tap, run dir and disk removed"
        if operation == "create"
        else _STOPPED
    )
    return {
        f"{operation}:vmm": ("the run dir is prepared and the VMM process started", undone),
        f"{operation}:allocated": (
            "the record and leases (with the tap's name) are committed, no tap made yet",
            undone,
        ),
        f"{operation}:tap": ("the tap is made on its bridge", undone),
        f"{operation}:rules": ("the tap's anti-spoofing rules are added", undone),
        f"{operation}:listening": ("the daemon listens for the VM's vsock services", undone),
        f"{operation}:booted": (
            "the guest is booted and the VM recorded `running`",
            undone if operation == "create" else "the running VMM is adopted",
        ),
    }


def _stop(operation: str, after: str) -> dict[str, tuple[str, str]]:
    """The steps a stop records, shared by stop, restart and remove."""
    return {
        f"{operation}:stopping": ("the VM is recorded `stopping`", _STOPPED),
        f"{operation}:vmm-ended": ("its VMM has ended (not yet recorded)", _STOPPED),
        f"{operation}:released": ("its tap, rules and sockets are released", _STOPPED),
        f"{operation}:stopped": ("the VM is recorded `stopped`", after),
    }


_STRAYS = "what is left of the VM is removed as belonging to no VM"
STEPS: dict[str, tuple[str, str]] = {
    "create:recorded": ("the create is recorded as in progress", "the create is rolled back"),
    **_launch("create"),
    "pause:paused": ("the VMM is paused and the VM recorded `paused`", "the paused VMM is adopted"),
    "resume:resumed": ("the VMM runs again, recorded `running`", "the running VMM is adopted"),
    **_stop("stop", "nothing: the stop was done"),
    "start:starting": ("the VM is recorded `starting`", _STOPPED),
    **_launch("start"),
    **_stop("restart", "nothing: the VM stays stopped"),
    "restart:starting": ("the VM is recorded `starting` again", _STOPPED),
    **_launch("restart"),
    **_stop("remove", "nothing: the VM stays, stopped"),
    "remove:forgotten": ("the record and leases are removed (committed)", _STRAYS),
    "remove:run-dir": ("the run dir is removed", _STRAYS),
    "remove:disk": ("the disk copy is removed", "nothing: the remove was done"),
}

ARMED = os.environ.get("ROOST_FAILPOINT") or None
ARMING_FILE = os.environ.get("ROOST_FAILPOINT_FILE") or None


def failpoint(step: str) -> None:
    """Die here if `step` is the armed failpoint."""
    assert step in STEPS, f"step {step!r} has no id in STEPS"
    if step == ARMED or (ARMING_FILE is not None and step == _armed_by_file(ARMING_FILE)):
        os.kill(os.getpid(), signal.SIGKILL)


def _armed_by_file(path: str) -> str | None:
    """The step the arming file names now, if any."""
    try:
        with open(path) as file:
            return file.read().strip() or None
    except FileNotFoundError:
        return None
