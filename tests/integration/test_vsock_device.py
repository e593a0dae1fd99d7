"""roost's vhost-user-vsock backend under real QEMU (TCG) with the demo guest, on both machine
types, without the engine: 1 MiB echoed through the guest's vsock port 1024 arrives intact,
and the guest's hello reaches a host listener on `<uds>_<port>`.

QEMU and the backend are children of the test, ended by PID and reaped; a TCG boot that hangs
(now and then) gets one retry.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from roost.vmm.qemu import host_tsc_khz
from tests.harness import INITRAMFS, KERNEL, missing

HELPER = b"bin/vsock-helper"


def _demo_lacks_helper() -> str | None:
    if missing([KERNEL, INITRAMFS]):
        return f"needs the demo guest ({', '.join(missing([KERNEL, INITRAMFS]))}); run make setup"
    with gzip.open(INITRAMFS) as archive:
        if HELPER not in archive.read():
            return "the demo guest has no vsock helper yet; rebuild it (roost image build-demo)"
    return None


pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="needs qemu-system-x86_64 (apt-get install --no-install-recommends qemu-system-x86)",
    ),
]
MEMORY_MIB = 256
CID = 5
HELLO_PORT = 5000
BOOT_WAIT = 60.0
ECHO_BYTES = 1024 * 1024
LISTENING = b"roost-vsock: echo listening on 1024"


class Guest:
    """The backend and QEMU for one demo guest, in a short directory of their own."""

    def __init__(self, root: Path, machine: str) -> None:
        self.root = root
        self.machine = machine
        self.vhost_user = root / "vu.sock"
        self.uds = root / "v.sock"
        self.console = root / "console.log"
        self.backend: subprocess.Popen[bytes] | None = None
        self.qemu: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-I", "-m", "roost.vmm.vsock", "--vhost-user", str(self.vhost_user)]
        argv += ["--uds", str(self.uds), "--cid", str(CID)]
        with (self.root / "backend.log").open("ab") as log:
            self.backend = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 10
        while not self.vhost_user.exists():
            assert self.backend.poll() is None and time.monotonic() < deadline, self.log()
            time.sleep(0.01)
        virtio = "device" if self.machine == "microvm" else "pci"
        append = f"console=ttyS0 reboot=k panic=1 roost.name=vsock-{self.machine}"
        append += f" roost.vsock_hello={HELLO_PORT}"
        if self.machine == "microvm":
            append += f" tsc_early_khz={host_tsc_khz()}"
        qemu = ["qemu-system-x86_64", "-M", f"{self.machine},memory-backend=mem", "-accel", "tcg"]
        qemu += ["-cpu", "max", "-m", str(MEMORY_MIB), "-smp", "1", "-nodefaults"]
        qemu += ["-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"]
        qemu += ["-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot"]
        qemu += ["-kernel", str(KERNEL), "-initrd", str(INITRAMFS), "-append", append]
        qemu += ["-chardev", f"socket,id=vu,path={self.vhost_user}"]
        qemu += ["-device", f"vhost-user-vsock-{virtio},chardev=vu"]
        with self.console.open("wb") as console:
            self.qemu = subprocess.Popen(
                qemu, stdin=subprocess.DEVNULL, stdout=console, stderr=console
            )

    def booted(self) -> bool:
        deadline = time.monotonic() + BOOT_WAIT
        while LISTENING not in self.console.read_bytes():
            if time.monotonic() > deadline or (self.qemu and self.qemu.poll() is not None):
                return False
            time.sleep(0.1)
        return True

    def stop_qemu(self) -> None:
        if self.qemu is not None:
            if self.qemu.poll() is None:
                self.qemu.kill()
            self.qemu.wait()

    def backend_exit(self) -> int:
        assert self.backend is not None
        return self.backend.wait(10)

    def log(self) -> str:
        return (self.root / "backend.log").read_text()

    def close(self) -> None:
        self.stop_qemu()
        if self.backend is not None:
            if self.backend.poll() is None:
                self.backend.kill()
            self.backend.wait()


def echo(uds: Path, data: bytes) -> bytes:
    """Send `data` to the guest's echo port through the hybrid socket and read it back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(20)
        client.connect(str(uds))
        client.sendall(b"CONNECT 1024\n")
        line = b""
        while not line.endswith(b"\n"):
            byte = client.recv(1)
            assert byte, f"the connection ended after {line!r}"
            line += byte
        assert line.startswith(b"OK "), line
        client.setblocking(False)
        sent, received = 0, bytearray()
        deadline = time.monotonic() + 30
        while len(received) < len(data):
            assert time.monotonic() < deadline, f"echoed {len(received)} of {len(data)} bytes"
            writing = [client] if sent < len(data) else []
            readable, writable, _ = select.select([client], writing, [], 1)
            if writable:
                sent += client.send(data[sent : sent + 65536])
            if readable:
                chunk = client.recv(65536)
                assert chunk, f"EOF after {len(received)} bytes"
                received += chunk
        return bytes(received)


@pytest.mark.parametrize("machine", ["q35", "microvm"])
def test_the_demo_guest_echoes_1_mib_intact_and_says_hello_to_the_host(
    machine: str, tmp_short: Path
) -> None:
    reason = _demo_lacks_helper()
    if reason:
        pytest.skip(reason)
    hello = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hello.bind(str(tmp_short / f"v.sock_{HELLO_PORT}"))
    hello.listen(4)
    hello.settimeout(BOOT_WAIT)
    guest = Guest(tmp_short, machine)
    try:
        for attempt in (1, 2):
            guest.start()
            if guest.booted():
                break
            guest.close()
            assert attempt == 1, guest.console.read_text(errors="replace")[-3000:]
        greeting, _ = hello.accept()
        with greeting:
            greeting.settimeout(10)
            said = b""
            while chunk := greeting.recv(100):
                said += chunk
        assert said == f"vsock-{machine}\n".encode()
        data = os.urandom(ECHO_BYTES)
        assert hashlib.sha256(echo(guest.uds, data)).digest() == hashlib.sha256(data).digest()
        guest.stop_qemu()
        assert guest.backend_exit() == 0, guest.log()
        assert not guest.vhost_user.exists()
        assert not guest.uds.exists()
    finally:
        guest.close()
        hello.close()
        with contextlib.suppress(FileNotFoundError):
            (tmp_short / f"v.sock_{HELLO_PORT}").unlink()
