"""A daemon proves it is alone before it touches anything, never kills what its database does
not know, notices a database that vanishes under it, rolls back creates it died in, and
answers while it recovers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    Daemon,
    leftover_pids,
    links,
    network_namespace,
    process_alive,
    run,
    wait_for,
    write_plugin,
)

pytestmark = [pytest.mark.root, pytest.mark.firecracker]


def refused_start(daemon: Daemon, *extra: str) -> tuple[int, str]:
    """Start the daemon, expecting it to refuse: its exit code and what it said."""
    before = len(daemon.logs())
    process = daemon.launch(*extra)
    code = process.wait(60)
    daemon.process = None
    return code, daemon.logs()[before:]


def healthy(daemon: Daemon) -> dict[str, object]:
    """Wait until the daemon has finished recovering; its health then."""
    return wait_for(
        lambda: (body := daemon.http.get("/healthz").json())["status"] == "ok" and body,
        timeout=60,
        what="the daemon to finish recovering",
    )


@contextlib.contextmanager
def fake_vmm(run_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process that looks like a VMM started in `run_dir` (it names the run dir on its
    command line, and the run dir's PID file names it), ended and reaped afterwards."""
    run_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", f"{run_dir}/api.sock"],
        start_new_session=True,
    )
    try:
        (run_dir / "vmm.pid").write_text(f"{process.pid}\n")
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_vmm_no_record_accounts_for_stops_the_start_until_the_operator_decides(
    daemon: Daemon, tmp_path: Path
) -> None:
    # a run dir and links of no VM, with no VMM: removed at the next start as before
    stray = daemon.run_dir / "vms" / "stray"
    stray.mkdir(parents=True)
    run("ip", "tuntap", "add", "rtap999", "mode", "tap", netns=daemon.netns)
    run("ip", "link", "add", "rbr999", "type", "bridge", netns=daemon.netns)
    assert daemon.stop() == 0
    daemon.start()
    healthy(daemon)
    assert not stray.exists()
    assert not {"rtap999", "rbr999"} & set(links(daemon.netns))
    assert "brdhcp" in links(daemon.netns)  # the operator's bridge is never touched

    ghost = daemon.run_dir / "vms" / "ghost"
    disk = daemon.state_dir / "disks" / "ghost.img"  # the disk an orphaned VMM writes to
    disk.parent.mkdir(exist_ok=True)
    disk.write_bytes(b"precious")
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    with fake_vmm(ghost) as vmm:
        run("ip", "tuntap", "add", "rtap998", "mode", "tap", netns=daemon.netns)
        assert daemon.stop() == 0
        code, said = refused_start(daemon)
        assert code == 4
        assert f"ghost (pid {vmm.pid})" in said and "--reap-orphans" in said
        assert vmm.poll() is None and ghost.exists()

        daemon.start("--keep-orphans")
        healthy(daemon)
        assert vmm.poll() is None and (ghost / "vmm.pid").exists()
        assert disk.read_bytes() == b"precious"
        assert "rtap998" in links(daemon.netns)  # links an orphan may use are left alone
        taken = daemon.cli("vm", "create", "ghost", "--plugin", "p", "--json")
        assert (taken.exit_code, taken.json()["error"]["code"]) == (4, "conflict")
        assert "--keep-orphans" in taken.json()["error"]["message"]

        assert daemon.stop() == 0
        daemon.start("--reap-orphans")
        healthy(daemon)
        assert vmm.wait(10) == -signal.SIGKILL
        assert not ghost.exists()
        assert not disk.exists()
        assert "rtap998" not in links(daemon.netns)


def test_a_second_daemon_sharing_the_run_dir_is_refused_and_touches_nothing(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    vm = daemon.ok("vm", "create", "first", "--plugin", "p")
    daemon.ok("vm", "pause", "first")
    run_dir_before = sorted(p.name for p in (daemon.run_dir / "vms" / "first").iterdir())
    with network_namespace() as other_netns:
        other = Daemon(other_netns)
        other.run_dir = daemon.run_dir
        other.argv[other.argv.index("--run-dir") + 1] = str(daemon.run_dir)
        try:
            code, said = refused_start(other)
            assert code == 4
            assert f"another roost daemon uses run dir {daemon.run_dir}" in said
            assert not other.state_dir.exists()  # a refused daemon leaves nothing
        finally:
            other.close()
    assert process_alive(vm["vmm"]["pid"])
    assert sorted(p.name for p in (daemon.run_dir / "vms" / "first").iterdir()) == run_dir_before
    assert daemon.ok("vm", "show", "first")["status"] == "paused"


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_database_that_vanishes_under_the_daemon_is_noticed_and_nothing_is_killed(
    daemon: Daemon, tmp_path: Path, how: str
) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    vm = daemon.ok("vm", "create", "keep", "--plugin", "p")
    daemon.ok("vm", "pause", "keep")
    database = daemon.state_dir / "roost.db"
    if how == "removed":
        for path in daemon.state_dir.glob("roost.db*"):
            path.unlink()
    else:
        copy = daemon.state_dir / "copy.db"
        shutil.copyfile(database, copy)
        copy.rename(database)

    health = daemon.http.get("/healthz")
    assert (health.status_code, health.json()["status"]) == (503, "database_gone")
    for command in (["vm", "stop", "keep"], ["vm", "create", "new", "--plugin", "p"]):
        refused = daemon.cli(*command, "--json")
        assert (refused.exit_code, refused.json()["error"]["code"]) == (6, "database_gone")
    assert process_alive(vm["vmm"]["pid"])

    assert daemon.stop() == 0
    if how == "removed":  # the next start finds a new, empty database: the VM is an orphan
        code, said = refused_start(daemon)
        assert code == 4 and f"keep (pid {vm['vmm']['pid']})" in said
        assert process_alive(vm["vmm"]["pid"])
        daemon.start("--reap-orphans")
        healthy(daemon)
        wait_for(lambda: not process_alive(vm["vmm"]["pid"]), what="the orphan to be ended")
    else:  # a copy of the same database: the VM is known and adopted
        daemon.start()
        healthy(daemon)
        assert daemon.ok("vm", "show", "keep")["status"] == "paused"


def install_with_disk(daemon: Daemon, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(os.urandom(64 * 1024))
    plugin = write_plugin(
        tmp_path,
        "p",
        rootfs={"path": str(rootfs)},
        network={"mode": "bridged", "subnet": "10.77.0.0/24", "auto_assign": True},
    )
    daemon.ok("plugin", "install", plugin)


@pytest.mark.parametrize("step", ["create:recorded", "create:allocated", "create:booted"])
def test_a_create_cut_short_by_a_daemon_crash_is_rolled_back_at_restart(
    netns: str, tmp_path: Path, step: str
) -> None:
    run("ip", "link", "add", "brdhcp", "type", "bridge", netns=netns)
    daemon = Daemon(netns, "--dhcp-bridge", "brdhcp", env={"ROOST_FAILPOINT": step})
    try:
        daemon.start()
        install_with_disk(daemon, tmp_path)
        daemon.ok("vm", "create", "before", "--plugin", "p", "--no-start")
        cut = daemon.cli("vm", "create", "cut", "--plugin", "p", "--json")
        assert cut.exit_code == 5  # the daemon died under the request
        assert daemon.process is not None
        assert daemon.process.wait(10) == -signal.SIGKILL
        daemon.process = None

        daemon.env.clear()
        daemon.start()
        healthy(daemon)
        assert [vm["name"] for vm in daemon.ok("vm", "list")] == ["before"]
        assert not any(vm["status"] == "error" for vm in daemon.ok("vm", "list"))
        leases = {n["subnet"]: n["leases"] for n in daemon.ok("network", "list")}
        assert leases.get("10.77.0.0/24") == ["10.77.0.2"]  # only `before` holds one
        assert not (daemon.run_dir / "vms" / "cut").exists()
        assert not (daemon.state_dir / "disks" / "cut.img").exists()
        assert not [link for link in links(netns) if link.startswith("rtap")]
        wait_for(lambda: leftover_pids(netns) == [], what="no VMM left")
        # the name is free again, and a create now works
        assert daemon.ok("vm", "create", "cut", "--plugin", "p", "--no-start")["name"] == "cut"
    finally:
        daemon.close()


@pytest.mark.kvm
def test_a_start_cut_short_by_a_daemon_crash_leaves_the_vm_stopped(
    netns: str, tmp_path: Path
) -> None:
    daemon = Daemon(netns, env={"ROOST_FAILPOINT": "start:vmm"})
    try:
        daemon.start()
        daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
        daemon.ok("vm", "create", "s", "--plugin", "p", "--no-start")
        assert daemon.cli("vm", "start", "s").exit_code == 5  # the daemon died under it
        assert daemon.process is not None and daemon.process.wait(10) == -signal.SIGKILL
        daemon.process = None
        started = wait_for(lambda: recorded_vmm(daemon, "s"), what="the VMM the start began")

        daemon.env.clear()
        daemon.start()  # no orphan: the database knew the VM was starting
        healthy(daemon)
        vm = daemon.ok("vm", "show", "s")
        assert vm["status"] == "stopped"
        assert "while the VM was starting" in vm["status_reason"]
        assert not process_alive(started)
        assert daemon.ok("vm", "start", "s")["status"] == "running"
    finally:
        daemon.close()


def recorded_vmm(daemon: Daemon, name: str) -> int | None:
    pid_file = daemon.run_dir / "vms" / name / "vmm.pid"
    return int(pid_file.read_text()) if pid_file.exists() else None


@pytest.mark.kvm
def test_the_daemon_answers_while_it_recovers(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
    names = [f"vm{i:02d}" for i in range(30)]
    pids = []
    for name in names:
        pids.append(daemon.ok("vm", "create", name, "--plugin", "p")["vmm"]["pid"])
        daemon.ok("vm", "pause", name)
    assert daemon.stop() == 0
    for pid in pids:  # the VMMs end while no daemon follows them: each must be settled
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(process_alive(pid) for pid in pids), what="the VMMs to end")

    daemon.launch()
    started = time.monotonic()
    first = wait_for(lambda: _health(daemon), timeout=30, what="a first answer")
    answered_after = time.monotonic() - started
    assert first["status"] == "recovering", first
    last = daemon.http.post(f"/v1/vms/{names[-1]}/start")
    assert last.status_code == 503 and last.json()["error"]["code"] == "recovering"
    assert "retry-after" in last.headers
    assert daemon.http.get("/v1/vms").status_code == 200  # reads are served meanwhile
    healthy(daemon)
    print(f"first answer {answered_after:.2f}s after launch, while recovering")
    assert {vm["status"] for vm in daemon.ok("vm", "list")} == {"crashed"}
    # the CLI retries `recovering` itself; after recovery the VM starts at once
    assert daemon.ok("vm", "start", names[-1])["status"] == "running"


def _health(daemon: Daemon) -> dict[str, object] | None:
    try:
        return dict(daemon.http.get("/healthz").json())
    except httpx.TransportError:
        return None
