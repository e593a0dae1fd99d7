"""A VMM's parent: starts it, reaps it and writes how it ended into its run dir.

Run as `python -I -S supervisor.py RUN_DIR ARGV...` in a session of its own, so the VMM
outlives the daemon while its exit status stays knowable across a daemon restart. Standard
library only, and nothing imported that is not needed: it starts in ~10 ms.

Files in RUN_DIR: `vmm.pid` (the VMM's PID, once started) and `exit` (its exit status, or minus
the signal that killed it). Both appear atomically (written aside, then renamed).
"""

import os
import sys


def write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.rename(path + ".tmp", path)


def main() -> int:
    run_dir, argv = sys.argv[1], sys.argv[2:]
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
