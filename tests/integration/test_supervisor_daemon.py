"""A daemon whose VMM supervisor hangs or dies goes on with another, still following the VMMs
the first one started (real daemon, real Firecracker VMs, paused so their guests stay put).
The supervisor is found by the PID the daemon recorded for a VM (`vms.supervisor_pid`). A hang
costs the answer timeout (10 s, roost.vmm.process.ANSWER_TIMEOUT, which no setting changes)."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Daemon,
    leftover_pids,
    links,
    namespace_pids,
    process_alive,
    wait_for,
    write_plugin,
)

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]


def supervisor_of(daemon: Daemon, name: str) -> int:
    """The PID of the supervisor that started the VM's VMM, as the daemon recorded it."""
    database = daemon.state_dir / "roost.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        [pid] = connection.execute(
            "SELECT supervisor_pid FROM vms WHERE name = ?", (name,)
        ).fetchone()
    assert isinstance(pid, int), f"no supervisor recorded for {name}"
    return pid


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def paused_vm(daemon: Daemon, name: str) -> dict[str, Any]:
    daemon.ok("vm", "create", name, "--plugin", "p")
    paused: dict[str, Any] = daemon.ok("vm", "pause", name)
    return paused


def still_followed(daemon: Daemon, vm: dict[str, Any]) -> None:
    """The VM is as it was: paused, the same VMM alive, and the daemon still drives it."""
    shown = daemon.ok("vm", "show", vm["name"])
    assert (shown["status"], shown["vmm"]["pid"]) == ("paused", vm["vmm"]["pid"])
    assert process_alive(vm["vmm"]["pid"])
    assert daemon.firecracker_state(vm) == "Paused"


def gone(pid: int) -> bool:
    """Ended and reaped: not even a zombie left."""
    return not Path(f"/proc/{pid}").exists()


def replaced_after(
    daemon: Daemon, tmp_path: Path, signum: signal.Signals
) -> tuple[dict[str, Any], dict[str, Any]]:
    """VM `first` paused, its supervisor sent `signum`, then VM `second` created: it runs under
    another supervisor, the first is reaped and gone, and `first` is still followed."""
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    first = paused_vm(daemon, "first")
    old = supervisor_of(daemon, "first")
    assert parent_of(first["vmm"]["pid"]) == old
    os.kill(old, signum)

    # a hung supervisor costs the create the answer timeout; then it goes on with another
    second = paused_vm(daemon, "second")
    replacement = supervisor_of(daemon, "second")
    assert replacement != old
    assert parent_of(second["vmm"]["pid"]) == replacement
    assert gone(old)  # SIGKILLed if hung, and reaped, before the create went on
    assert old not in namespace_pids(daemon.netns)
    still_followed(daemon, first)
    return first, second


def test_a_hung_supervisor_is_replaced_and_its_vms_stay_followed(
    daemon: Daemon, tmp_path: Path
) -> None:
    first, _ = replaced_after(daemon, tmp_path, signal.SIGSTOP)

    stopped = daemon.ok("vm", "stop", "first")
    assert stopped["status"] == "stopped"
    assert stopped["exit_code"] is None  # nobody was left to record it
    assert not process_alive(first["vmm"]["pid"])
    assert daemon.cli("vm", "rm", "first").exit_code == 0
    assert daemon.ok("vm", "stop", "second", "--force")["exit_code"] == -signal.SIGKILL
    assert daemon.cli("vm", "rm", "second").exit_code == 0
    assert daemon.ok("vm", "list") == []
    assert leftover_pids(daemon.netns) == []


def test_a_dead_supervisor_is_replaced_and_its_orphaned_vmms_end_with_no_exit_code(
    daemon: Daemon, tmp_path: Path
) -> None:
    first, second = replaced_after(daemon, tmp_path, signal.SIGKILL)

    os.kill(first["vmm"]["pid"], signal.SIGKILL)
    ended = wait_for(
        lambda: (vm := daemon.ok("vm", "show", "first"))["status"] == "crashed" and vm,
        what="the orphaned VMM's end to be noticed",
    )
    assert ended["exit_code"] is None
    assert ended["status_reason"] == "the VMM ended and its exit status is unknown"
    assert ended["vmm"]["pid"] is None
    assert ended["network"]["tap"] not in links(daemon.netns)
    still_followed(daemon, second)

    assert daemon.ok("vm", "stop", "second", "--force")["exit_code"] == -signal.SIGKILL
    for name in ("first", "second"):
        assert daemon.cli("vm", "rm", name).exit_code == 0
    assert daemon.ok("vm", "list") == []
    assert leftover_pids(daemon.netns) == []
