"""Doing host work inside the daemon's network namespace.

`setns()` moves only the calling thread, and a process inherits the namespaces of the thread
that forks it. So one worker thread enters the namespace once and stays there: every netlink
socket it opens, every tap it creates (an ioctl, not a netlink call) and every process it
spawns lives in that namespace, while the rest of the daemon (API listener, downloads) stays
where it started. Without a namespace the thread simply works in the daemon's own.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from roost.errors import HostError, InvalidError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def namespace_file(netns: str | None) -> Path:
    """The file that is `netns` (the daemon's own namespace when None); it must exist."""
    if netns is None:
        return Path("/proc/self/ns/net")
    path = netns_path(netns)
    if not path.exists():
        raise InvalidError.at(
            "netns",
            f"network namespace {netns!r} does not exist; create it first "
            f"(ip netns add {netns}) — roost never creates or deletes it",
        )
    return path


_LIBC = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    """Move the calling thread into the network namespace `fd` is open on."""
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns({what}): {os.strerror(error)}")


def run_in(path: Path, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` on a thread of its own inside the network namespace file `path` (a
    namespace no worker serves, such as a cni VM's); the thread ends with the call. A
    namespace that cannot be entered is a `HostError`; `work`'s own errors are raised as
    they are."""

    def inside() -> T:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd, str(path))
            finally:
                os.close(fd)
        except OSError as error:
            raise HostError(f"cannot enter network namespace {path}: {error.strerror}") from None
        return work(*args)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="roost-netns-once") as pool:
        return pool.submit(inside).result()


class NetnsWorker:
    """A single thread, inside `netns` (or the daemon's own namespace when None), that runs
    host work in order."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        path = namespace_file(netns)
        self._namespace = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if netns else None
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="roost-netns", initializer=self._start
        )
        self._closers: list[Callable[[], object]] = []

    def _start(self) -> None:
        if self._namespace is not None:
            _setns(self._namespace, str(self.netns))

    @contextmanager
    def inside(self) -> Iterator[None]:
        """The calling thread inside the namespace for the block, and back in its own after
        it: for quick host work (a tap's ioctls, its rules) that handing to the namespace's
        thread would only delay. The block must not start threads or processes."""
        if self._namespace is None:
            yield
            return
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self._namespace, str(self.netns))
            try:
                yield
            finally:
                _setns(own, "the thread's own namespace")
        finally:
            os.close(own)

    def run(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `work` on the namespace's thread and return its result (or raise its error)."""
        return self._pool.submit(work, *args, **kwargs).result()

    def on_close(self, closer: Callable[[], object]) -> None:
        """Run `closer` when the worker closes (for what others keep inside the namespace)."""
        self._closers.append(closer)

    def spawn(self, argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        """Start a process inside the namespace."""

        def start() -> subprocess.Popen[bytes]:
            try:
                return subprocess.Popen(argv, **popen)
            except OSError as error:
                raise HostError(f"cannot start {argv[0]}: {error.strerror}") from None

        return self.run(start)

    def close(self) -> None:
        for closer in reversed(self._closers):
            closer()
        self._pool.shutdown(wait=True)
        if self._namespace is not None:
            os.close(self._namespace)
