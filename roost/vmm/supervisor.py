"""A VMM's parent: starts it, reaps it and writes how it ended into its run dir.

Started ahead of need (`python -I -S supervisor.py`, standard library only) in a session of its
own, it waits for one command on stdin — `{"run_dir", "argv", "output"}` as a JSON line — so a
launch never waits for Python to start; EOF instead of a command means "not needed", and it
exits. The VMM it starts outlives the daemon, and how it ended stays knowable across a daemon
restart.

Files in RUN_DIR: `vmm.pid` (the VMM's PID, once started) and `exit` (its exit status, or minus
the signal that killed it). Both appear atomically (written aside, then renamed).
"""

import json
import os
import sys


def write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.rename(path + ".tmp", path)


def main() -> int:
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    command = json.loads(line)
    run_dir, argv = command["run_dir"], command["argv"]
    output = os.open(command["output"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(argv[0], argv)
        finally:
            os.write(2, f"roost-supervisor: cannot execute {argv[0]}\n".encode())
            os._exit(127)
    write_atomically(os.path.join(run_dir, "vmm.pid"), f"{pid}\n")
    _, status = os.waitpid(pid, 0)
    write_atomically(os.path.join(run_dir, "exit"), f"{os.waitstatus_to_exitcode(status)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
