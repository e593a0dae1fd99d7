"""The VMM supervisor and the daemon's handle on it, with real processes (`sleep`, `true`):
commands sent ahead of their answers, answers collected in any order, exit statuses recorded."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.errors import VMMFailedError
from roost.host.netns import NetnsWorker
from roost.vmm import process as process_module
from roost.vmm.process import VMM_FILES, Supervisor, VMMProcess, recorded_pid
from tests.harness import wait_for

SLEEP = shutil.which("sleep")
TRUE = shutil.which("true")
pytestmark = pytest.mark.skipif(SLEEP is None or TRUE is None, reason="needs sleep and true")


@pytest.fixture
def worker() -> Iterator[NetnsWorker]:
    """The test's own namespace worker; closing it lets its supervisor go."""
    worker = NetnsWorker(None)
    yield worker
    worker.close()


def run_dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir()
    return path


def test_commands_sent_together_are_each_answered(worker: NetnsWorker, tmp_path: Path) -> None:
    assert SLEEP is not None and TRUE is not None
    supervisor = Supervisor.of(worker)
    dirs = [run_dir(tmp_path, f"vm{n}") for n in range(3)]
    argvs = [[SLEEP, "30"], [TRUE], [SLEEP, "30"]]
    tickets = [
        supervisor.send(argv, path, path / "console.log", VMM_FILES)
        for argv, path in zip(argvs, dirs, strict=True)
    ]
    # collected out of order: each answer still goes to the command that asked for it
    pids = {n: supervisor.answer(tickets[n]) for n in (2, 0, 1)}
    processes = [VMMProcess(path, pids[n], supervisor.pid) for n, path in enumerate(dirs)]
    try:
        assert len(set(pids.values())) == 3
        for process in processes:
            assert recorded_pid(process.run_dir) == process.pid
        assert processes[1].wait(10)
        assert processes[1].exit_code() == 0
        assert not processes[0].exited() and not processes[2].exited()
    finally:
        for process in processes:
            process.kill()
    assert [process.exit_code() for process in (processes[0], processes[2])] == [-9, -9]


def test_a_command_that_fails_is_an_error_for_that_command_only(
    worker: NetnsWorker, tmp_path: Path
) -> None:
    assert TRUE is not None
    supervisor = Supervisor.of(worker)
    good, other = run_dir(tmp_path, "good"), run_dir(tmp_path, "other")
    gone = tmp_path / "removed-run-dir"
    no_run_dir = supervisor.send([TRUE], gone, gone / "console.log", VMM_FILES)
    no_program = supervisor.send(
        [str(tmp_path / "no-vmm")], other, other / "console.log", VMM_FILES
    )
    fine = supervisor.send([TRUE], good, good / "console.log", VMM_FILES)
    with pytest.raises(VMMFailedError, match=f"cannot start {TRUE}"):
        supervisor.answer(no_run_dir)
    with pytest.raises(VMMFailedError, match=r"cannot start .*no-vmm: .*No such file"):
        supervisor.answer(no_program)
    assert recorded_pid(other) is None
    process = VMMProcess(good, supervisor.answer(fine), supervisor.pid)
    assert process.wait(10)
    assert process.exit_code() == 0


def sleeper(supervisor: Supervisor, path: Path) -> VMMProcess:
    assert SLEEP is not None
    ticket = supervisor.send([SLEEP, "30"], path, path / "console.log", VMM_FILES)
    return VMMProcess(path, supervisor.answer(ticket), supervisor.pid)


@pytest.mark.parametrize("how", ["hangs", "dies"])
def test_a_supervisor_that_hangs_or_dies_is_replaced_and_its_vmms_keep_running(
    worker: NetnsWorker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setattr(process_module, "ANSWER_TIMEOUT", 1.0)
    supervisor = Supervisor.of(worker)
    first = sleeper(supervisor, run_dir(tmp_path, "first"))
    old = supervisor.pid
    later: list[VMMProcess] = []
    try:
        if how == "hangs":
            os.kill(old, signal.SIGSTOP)
            asked = run_dir(tmp_path, "asked")
            ticket = supervisor.send([str(SLEEP), "30"], asked, asked / "console.log", VMM_FILES)
            with pytest.raises(VMMFailedError, match="did not answer within 1 s"):
                supervisor.answer(ticket)
            assert recorded_pid(asked) is None
        else:
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: not _running(old), what="the supervisor to end")
        later.append(sleeper(supervisor, run_dir(tmp_path, "later")))
        assert supervisor.pid != old
        assert not Path(f"/proc/{old}").exists()  # ended and reaped
        assert not first.exited()  # the VMM outlives its supervisor, and is still followed
    finally:
        for process in [first, *later]:
            process.kill()
    assert first.exit_code() is None  # nobody was left to record it
    assert later[0].exit_code() == -signal.SIGKILL


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_vmm_started_by_a_supervisor_that_then_hangs_is_ended_not_leaked(
    worker: NetnsWorker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor starts the VMM and records its PID, then hangs before it answers: the
    start fails, and the VMM it started (whose PID nobody was told) is ended with it."""
    fake = tmp_path / "hanging_supervisor.py"
    fake.write_text(
        "import json, os, sys, time\n"
        "command = json.loads(sys.stdin.readline())\n"
        "argv = command['argv']\n"
        "pid = os.posix_spawn(argv[0], argv, os.environ, setsid=True)\n"
        "with open(os.path.join(command['run_dir'], command['pid_file']), 'w') as f:\n"
        "    f.write(f'{pid}\\n')\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(process_module, "SUPERVISOR", fake)
    monkeypatch.setattr(process_module, "ANSWER_TIMEOUT", 1.0)
    path = run_dir(tmp_path, "vm")
    argv = [sys.executable, "-c", "import time; time.sleep(30)", f"{path}/"]
    starting = VMMProcess.begin(argv, path, worker, output=path / "console.log")
    old = starting._supervisor.pid
    channel = starting._ticket[0]
    with pytest.raises(VMMFailedError, match="did not answer within 1 s"):
        starting.result()
    pid = recorded_pid(path)
    assert pid is not None
    try:
        wait_for(lambda: not _running(pid), what="the unanswered VMM to end")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not Path(f"/proc/{old}").exists()  # the supervisor was ended and reaped
    assert channel.process.stdout is not None and channel.process.stdout.closed


@pytest.mark.parametrize("how", ["hangs", "dies"])
def test_a_start_the_supervisor_gave_no_answer_to_is_asked_of_its_replacement(
    worker: NetnsWorker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The supervisor hangs, or dies, with a start pending: the start still succeeds, started by
    the supervisor that replaces it."""
    monkeypatch.setattr(process_module, "ANSWER_TIMEOUT", 1.0)
    assert SLEEP is not None
    # reads the command, then never answers, or exits without answering
    then = "import time; time.sleep(60)" if how == "hangs" else "pass"
    failing = tmp_path / "failing_supervisor.py"
    failing.write_text(f"import sys\nsys.stdin.readline()\n{then}\n")
    monkeypatch.setattr(process_module, "SUPERVISOR", failing)
    path = run_dir(tmp_path, "asked")
    starting = VMMProcess.begin([SLEEP, "30"], path, worker, output=path / "console.log")
    old = starting._supervisor.pid
    monkeypatch.undo()  # its replacement is a real supervisor
    monkeypatch.setattr(process_module, "ANSWER_TIMEOUT", 1.0)
    started = starting.result()
    try:
        assert started.supervisor_pid == starting._supervisor.pid != old
        assert recorded_pid(path) == started.pid
        assert not started.exited()
        assert not Path(f"/proc/{old}").exists()  # ended and reaped
    finally:
        started.kill()
    assert started.exit_code() == -signal.SIGKILL
