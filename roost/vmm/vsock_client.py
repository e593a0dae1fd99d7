"""Host-side access to a guest's vsock ports: `dial` one, then `splice` the connection with
another stream (a WebSocket, a TCP client, a guest-initiated connection's service).

Both run on the event loop, so a relay costs two tasks and no thread: fifty of them leave the
rest of the daemon as responsive as none.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Protocol

from roost.errors import VMMFailedError
from roost.vmm.base import HybridVsock, KernelVsock, VsockTarget

CHUNK = 64 * 1024  # bytes read at a time from either side of a relay
RETRY_PAUSE = 0.05  # seconds between two tries of a dial, so a VMM that refuses is not spun on


class Source(Protocol):
    """What a relay reads from (`asyncio.StreamReader` is one): `b""` is the end of input."""

    async def read(self, n: int = -1) -> bytes: ...


class Sink(Protocol):
    """What a relay writes to (`asyncio.StreamWriter` is one)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class _NotConnectedError(Exception):
    """One try of a dial that did not end in a connection, and why."""


async def dial(
    target: VsockTarget,
    port: int,
    *,
    timeout: float = 10.0,
    attempt: float = 1.0,
    what: str | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the guest's vsock `port`, tried again until `timeout` seconds have
    passed. Each try waits at most `attempt` seconds: a hybrid-vsock VMM whose guest does not
    listen may close the connection, but may as well leave it hanging with no answer at all.
    `what` names the port in the error (`vsock port 1024 of VM 'v1'`); `VMMFailedError` when
    no try connected. What the guest sent right after `OK` stays in the returned reader."""
    what = what or _describe(target, port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tries = 0
    while True:
        tries += 1
        try:
            async with asyncio.timeout_at(min(loop.time() + attempt, deadline)):
                return await _connect(target, port)
        except TimeoutError:
            reason = "the VMM gave no answer"
        except _NotConnectedError as refusal:
            reason = str(refusal)
        except OSError as error:
            reason = error.strerror or repr(error)
        if loop.time() + RETRY_PAUSE >= deadline:
            raise VMMFailedError(
                f"cannot connect to {what} within {timeout:g}s ({tries} tries, the last: "
                f"{reason}); a service in the guest must listen on that port, and the guest "
                "must be running (a paused one answers nothing)"
            )
        await asyncio.sleep(RETRY_PAUSE)


def _describe(target: VsockTarget, port: int) -> str:
    if isinstance(target, HybridVsock):
        return f"vsock port {port} through {target.uds_path}"
    return f"vsock port {port} of CID {target.cid}"


async def _connect(
    target: VsockTarget, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(target, KernelVsock):
        return await _connect_kernel(target, port)
    reader, writer = await asyncio.open_unix_connection(target.uds_path)
    try:
        writer.write(f"CONNECT {port}\n".encode())
        await writer.drain()
        answer = await reader.readline()
    except BaseException:
        writer.close()
        raise
    if answer.startswith(b"OK ") and answer.endswith(b"\n"):
        return reader, writer
    writer.close()
    if not answer:
        raise _NotConnectedError("the VMM closed the connection")
    raise _NotConnectedError(f"the VMM answered {answer[:80]!r} instead of OK")


async def _connect_kernel(
    target: KernelVsock, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """AF_VSOCK straight to the guest's CID, through the host kernel's vhost-vsock."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (target.cid, port))
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def splice(
    client: tuple[Source, Sink], guest: tuple[Source, Sink], *, linger: float = 1.0
) -> None:
    """Relay bytes both ways between `client` and `guest` (each a reader and a writer), with
    back-pressure, then close both.

    The guest's side is never half-closed: Firecracker turns a host-side shutdown into a full
    one, which would lose the guest's reply. So when the client's input ends, what the guest
    sends keeps going to the client until the guest closes or nothing has come for `linger`
    seconds. When the guest closes, the client gets an end of file (where its writer can
    send one) after the rest of the guest's bytes. A side that fails ends the relay."""
    await _Splice(client, guest, linger).run()


class _Splice:
    def __init__(
        self, client: tuple[Source, Sink], guest: tuple[Source, Sink], linger: float
    ) -> None:
        self.client_reader, self.client_writer = client
        self.guest_reader, self.guest_writer = guest
        self.linger = linger
        self.loop = asyncio.get_running_loop()
        self.client_ended = False
        self.guest_read: asyncio.Timeout | None = None  # the wait for the guest, while it lasts

    async def run(self) -> None:
        to_client = asyncio.create_task(self._guest_to_client())
        to_guest = asyncio.create_task(self._client_to_guest())
        try:
            done, _ = await asyncio.wait({to_client, to_guest}, return_when=asyncio.FIRST_COMPLETED)
            if to_client in done:
                to_client.result()
            elif to_guest.result():  # the client's input ended: the guest's side goes on alone
                await to_client
        finally:
            for task in (to_client, to_guest):
                task.cancel()
            await asyncio.gather(to_client, to_guest, return_exceptions=True)
            await _close(self.client_writer)
            await _close(self.guest_writer)

    async def _client_to_guest(self) -> bool:
        """True when the client's input ended, False when a side failed."""
        try:
            while chunk := await self.client_reader.read(CHUNK):
                self.guest_writer.write(chunk)
                await self.guest_writer.drain()
        except OSError:
            return False
        self.client_ended = True
        if self.guest_read is not None:
            self.guest_read.reschedule(self.loop.time() + self.linger)
        return True

    async def _guest_to_client(self) -> None:
        try:
            while True:
                deadline = self.loop.time() + self.linger if self.client_ended else None
                async with asyncio.timeout_at(deadline) as self.guest_read:
                    chunk = await self.guest_reader.read(CHUNK)
                self.guest_read = None
                if not chunk:
                    if self.client_writer.can_write_eof():
                        self.client_writer.write_eof()
                    return
                self.client_writer.write(chunk)
                await self.client_writer.drain()
        except OSError:  # a side failed, or the guest was silent for `linger` (TimeoutError)
            return


async def _close(writer: Sink) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
