"""The backend process: `python -I -m roost.vmm.vsock --vhost-user PATH --uds PATH --cid N
[--max-buffered BYTES]`.

It removes stale sockets at both paths, listens on `--uds` (host clients, Firecracker's hybrid
vsock) and then on `--vhost-user`, last: once that socket exists the backend is ready for QEMU.
It serves exactly one QEMU connection on one thread. When QEMU disconnects, or on SIGTERM or
SIGINT, it closes every host connection, removes both sockets and exits 0; bad arguments, or a
socket it cannot listen on, exit 1. It logs to stderr, one line per event worth knowing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import sys
from typing import NoReturn

from roost.vmm.vsock.connections import BUF_ALLOC
from roost.vmm.vsock.device import VsockDevice, step
from roost.vmm.vsock.hybrid import HybridHost, listen
from roost.vmm.vsock.vhost_user import VhostUserServer

log = logging.getLogger("roost.vmm.vsock")

SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the final NUL
DEFAULT_MAX_BUFFERED = 32 * 1024 * 1024
FIRST_GUEST_CID = 3  # 0-2 are reserved; 2 is the host
LAST_GUEST_CID = 2**32 - 2  # 2**32 - 1 is VMADDR_CID_ANY


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m roost.vmm.vsock",
        description="roost's vhost-user-vsock backend: serves QEMU on --vhost-user and host "
        "clients on --uds, as Firecracker's hybrid vsock.",
    )
    parser.add_argument("--vhost-user", required=True, help="the socket QEMU connects to")
    parser.add_argument("--uds", required=True, help="the host side's socket")
    parser.add_argument("--cid", required=True, type=int, help="the guest's context ID")
    parser.add_argument(
        "--max-buffered",
        type=int,
        default=DEFAULT_MAX_BUFFERED,
        help="bytes all connections together may hold in the backend (default 32 MiB)",
    )
    args = parser.parse_args(argv)
    if not FIRST_GUEST_CID <= args.cid <= LAST_GUEST_CID:
        parser.error(f"--cid must be from {FIRST_GUEST_CID} to {LAST_GUEST_CID}")
    if args.max_buffered < BUF_ALLOC:
        parser.error(f"--max-buffered must be at least {BUF_ALLOC} (one connection's credit)")
    for option, path in (("--vhost-user", args.vhost_user), ("--uds", args.uds)):
        if not 0 < len(os.fsencode(path)) <= SUN_PATH_MAX:
            parser.error(f"{option} must be a path of 1 to {SUN_PATH_MAX} bytes")
    return args


class _Listening:
    """A socket path this process made, removed at the end only if it is still ours."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = listen(path)
        self.inode = os.stat(path).st_ino

    def remove(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s vsock: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    stop_read, stop_write = os.pipe()
    os.set_blocking(stop_write, False)
    signal.set_wakeup_fd(stop_write)
    stopping: list[str] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: stopping.append(signal.Signals(number).name))
    selector = selectors.DefaultSelector()
    selector.register(stop_read, selectors.EVENT_READ, lambda _events: os.read(stop_read, 64))
    made: list[_Listening] = []
    server: VhostUserServer | None = None
    device: VsockDevice | None = None
    try:
        try:
            made.append(_Listening(args.uds))
            host = HybridHost(
                made[0].sock, args.uds, args.cid, selector, max_buffered=args.max_buffered
            )
            device = VsockDevice(host, selector)
            made.append(_Listening(args.vhost_user))  # last: its socket file means ready
        except OSError as error:
            log.error("cannot listen: %s", error)
            return 1
        log.info("listening: vhost-user %s, uds %s, cid %d", args.vhost_user, args.uds, args.cid)
        qemu_listener = made[1].sock

        def accept_qemu(_events: int) -> None:
            nonlocal server
            assert device is not None
            try:
                sock, _address = qemu_listener.accept()
            except BlockingIOError:
                return
            selector.unregister(qemu_listener)  # exactly one QEMU, ever
            sock.setblocking(True)
            server = VhostUserServer(sock, device, args.cid)
            selector.register(sock, selectors.EVENT_READ, server.readable)
            log.info("QEMU connected")

        selector.register(qemu_listener, selectors.EVENT_READ, accept_qemu)
        while not stopping and not (server is not None and server.ended):
            step(selector, device, None)
        if server is not None and server.ended and not stopping:
            log.info("%s; exiting", server.ended)
            return 0 if server.ended == "QEMU disconnected" else 1
        log.info("stopping on %s; exiting", stopping[0])
        return 0
    finally:
        if device is not None:
            device.reset()
            device.host.close()
        if server is not None:
            server.close()
        for listening in reversed(made):
            listening.remove()
        selector.close()
        signal.set_wakeup_fd(-1)
        os.close(stop_read)
        os.close(stop_write)


if __name__ == "__main__":
    sys.exit(main())
