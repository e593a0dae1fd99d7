"""What a daemon's end does to its VMs: they keep running after SIGTERM/SIGINT (also a Ctrl-C
sent to the daemon's whole process group, as a terminal does), unless `--stop-vms-on-exit`,
which stops each gracefully first."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.harness import Daemon, process_alive, wait_for, write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]


def two_vms(daemon: Daemon, tmp_path: Path) -> list[int]:
    """A running and a paused VM; their VMMs' pids."""
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    running = daemon.ok("vm", "create", "running", "--plugin", "p")
    paused = daemon.ok("vm", "create", "paused", "--plugin", "p")
    daemon.ok("vm", "pause", "paused")
    return [running["vmm"]["pid"], paused["vmm"]["pid"]]


def healthy(daemon: Daemon) -> None:
    wait_for(
        lambda: daemon.http.get("/healthz").json()["status"] == "ok",
        timeout=60,
        what="the daemon to finish recovering",
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_vms_on_exit_stops_every_vm_before_the_daemon_ends(
    netns: str, tmp_path: Path, signum: int
) -> None:
    daemon = Daemon(netns, "--stop-vms-on-exit")
    try:
        daemon.start()
        pids = two_vms(daemon, tmp_path)
        assert daemon.process is not None
        daemon.process.send_signal(signum)
        assert daemon.process.wait(60) == 0
        daemon.process = None
        assert not any(process_alive(pid) for pid in pids)
        assert "stopped VM running (--stop-vms-on-exit)" in daemon.logs()
        daemon.start()
        healthy(daemon)
        statuses = {vm["name"]: vm["status"] for vm in daemon.ok("vm", "list")}
        assert statuses == {"running": "stopped", "paused": "stopped"}
    finally:
        daemon.close()


def test_without_it_a_ctrl_c_to_the_daemons_process_group_leaves_the_vms_running(
    netns: str, tmp_path: Path
) -> None:
    daemon = Daemon(netns)
    try:
        daemon.start()  # in a process group (and session) of its own, as a terminal's job is
        pids = two_vms(daemon, tmp_path)
        assert daemon.process is not None
        group = os.getpgid(daemon.process.pid)
        assert group == daemon.process.pid
        os.killpg(group, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert daemon.process.wait(60) == 0
        daemon.process = None
        assert all(process_alive(pid) for pid in pids)
        assert "VMs keep running" in daemon.logs()
        daemon.start()
        healthy(daemon)
        statuses = {vm["name"]: vm["status"] for vm in daemon.ok("vm", "list")}
        assert statuses == {"running": "running", "paused": "paused"}
    finally:
        daemon.close()
