"""The parent of every VMM a daemon starts: it spawns them, reaps them and writes how
each ended into its run dir.

One per daemon and network namespace, started once (`python -I -S supervisor.py`, standard
library only) in a session of its own, so a VM launch costs a spawn, not a Python start, and the
VMMs outlive the daemon while how they end stays knowable across a daemon restart.

Protocol: the daemon writes one JSON line per VMM on stdin, `{"run_dir", "argv", "output",
"pid_file", "exit_file", "netns"}` (`netns` optional: the path of a network namespace to start
the program in, e.g. a cni VM's `/run/netns/roost-vm-<name>`); the supervisor answers on stdout
with one line, `{"pid": N}` or `{"error": "..."}`. When stdin closes (the daemon is gone) it
starts nothing more and exits once its last VMM has ended.

Files in each run dir, named by the command (`vmm.pid` and `exit` for a VMM, others for the
processes that serve it): the PID, and the exit status (or minus the signal that killed it),
both written aside and renamed so they appear whole.
"""

import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import stat
import sys
from collections.abc import Callable
from typing import Any

CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)


def write_atomically(run_dir_fd: int, name: str, text: str) -> None:
    """Write through the run dir's descriptor, so a renamed run dir still gets its files."""
    temp = name + ".tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=run_dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.rename(temp, name, src_dir_fd=run_dir_fd, dst_dir_fd=run_dir_fd)


def open_output(path: str) -> int:
    """The file a program's output is appended to (created if need be), opened here, never
    blocking and never through a symlink, and refused unless it is a regular file: under the
    jailer it is the console log, in a chroot its VMM's uid may write, so it may be a FIFO by
    now, and a FIFO nobody reads would hold this process (and every start after) for ever."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    not_regular = OSError(
        f"{path} is not a regular file (a FIFO, socket, device, directory or symlink): a "
        "program's output is only ever appended to a regular file; remove it and try again"
    )
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as error:
        # ELOOP: a symlink; ENXIO: a FIFO nobody reads, or a socket; EISDIR: a directory
        if error.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise not_regular from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise not_regular
    os.set_blocking(fd, True)  # the program writes to it as to any file
    return fd


def _setns(fd: int) -> int:
    """Move this (single-threaded) process into the network namespace `fd` is open on; 0, or
    the errno."""
    return 0 if _LIBC.setns(fd, CLONE_NEWNET) == 0 else ctypes.get_errno()


def spawned_in(netns: str | None, spawn: Callable[[], int]) -> int:
    """`spawn()`'s child, made inside the network namespace file `netns` (if not None): this
    process enters it for the spawn and comes back, since a child is made in the namespace of
    the thread that spawns it. So the child is the program itself, with the pid recorded
    (posix_spawn cannot setns in the child, and a wrapper such as nsenter would be one more
    exec on every start). Failing to come back kills the child and ends the supervisor: every
    later start would land in the wrong namespace, and the daemon replaces one that exits."""
    if netns is None:
        return spawn()
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise OSError(error.errno, f"network namespace {netns}: {error.strerror}") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if failed := _setns(target):
            raise OSError(failed, f"cannot enter network namespace {netns}: {os.strerror(failed)}")
        pid = None
        try:
            pid = spawn()
            return pid
        finally:
            if failed := _setns(own):
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                raise SystemExit(f"cannot leave network namespace {netns}: {os.strerror(failed)}")
    finally:
        os.close(own)
        os.close(target)


def launch(command: dict[str, Any], children: dict[int, tuple[int, str]]) -> dict[str, int]:
    """Start the command's program in a session of its own (and in its network namespace, if
    it names one), stdin from /dev/null and its output appended to the command's file.
    posix_spawn (vfork and exec): no copy of this process's memory to fault in, and a program
    that cannot run is an error here, not an exit status later."""
    run_dir_fd = os.open(command["run_dir"], os.O_RDONLY | os.O_DIRECTORY)
    argv = command["argv"]
    try:
        output = open_output(command["output"])
        try:
            pid = spawned_in(
                command.get("netns"),
                lambda: os.posix_spawn(
                    argv[0],
                    argv,
                    os.environ,
                    file_actions=[
                        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                        (os.POSIX_SPAWN_DUP2, output, 1),
                        (os.POSIX_SPAWN_DUP2, 1, 2),
                    ],
                    setsid=True,
                ),
            )
        finally:
            os.close(output)
    except BaseException:
        os.close(run_dir_fd)
        raise
    children[pid] = (run_dir_fd, command["exit_file"])
    write_atomically(run_dir_fd, command["pid_file"], f"{pid}\n")
    return {"pid": pid}


def reap(children: dict[int, tuple[int, str]]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        child = children.pop(pid, None)
        if child is not None:
            run_dir_fd, exit_file = child
            # a run dir removed meanwhile has nobody left to read its exit status
            with contextlib.suppress(OSError):
                code = os.waitstatus_to_exitcode(status)
                write_atomically(run_dir_fd, exit_file, f"{code}\n")
            os.close(run_dir_fd)


def main() -> int:
    children: dict[int, tuple[int, str]] = {}
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    commands = sys.stdin.fileno()
    pending = b""  # read, not yet a whole line: several commands may arrive at once
    listening = True
    while listening or children:
        readable, _, _ = select.select([commands, wake_read] if listening else [wake_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 4096)
        reap(children)
        if listening and commands in readable:
            chunk = os.read(commands, 65536)
            if not chunk:
                listening = False
                continue
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                answer: dict[str, Any]
                try:
                    answer = launch(json.loads(line), children)
                except (OSError, ValueError, KeyError) as error:
                    answer = {"error": str(error)}
                sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
