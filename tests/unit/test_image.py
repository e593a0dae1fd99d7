"""The demo image builder's pure parts, on synthetic data: no downloads, and no root but for
the guest helper's bench service, run on TCP in a throwaway network namespace."""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import hashlib
import json
import lzma
import os
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import pytest

from roost.host.netns import NetnsWorker
from roost.image import demo
from roost.image.demo import CpioEntry, ImageBuildError
from tests.harness import namespace_pids, run, wait_for

LZ4_MAGIC = struct.pack("<I", 0x184C2102)


def fake_bzimage(payload: bytes, *, setup_sects: int = 3, protocol: int = 0x20F) -> bytes:
    """A bzImage with just the boot-header fields the locator reads, payload after setup."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    offset = 100  # payload_offset counts from the start of the protected-mode code
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\x90" * offset + payload + b"tail"


def test_locate_lz4_payload_strips_the_size_trailer() -> None:
    frame = LZ4_MAGIC + b"compressed-blocks"
    found, size = demo.locate_lz4_payload(fake_bzimage(frame + struct.pack("<I", 123456)))
    assert (found, size) == (frame, 123456)


def test_locate_lz4_payload_treats_zero_setup_sects_as_four() -> None:
    image = bytearray(fake_bzimage(LZ4_MAGIC + b"x" * 8, setup_sects=4))
    image[0x1F1] = 0
    assert demo.locate_lz4_payload(bytes(image))[0] == LZ4_MAGIC + b"x" * 4


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\x7fELF" + b"\0" * 1000, "not an x86 bzImage"),
        (fake_bzimage(LZ4_MAGIC + b"x" * 8, protocol=0x206), "too old"),
        (fake_bzimage(b"\x1f\x8b\x08\x00" + b"x" * 8), "payload is gzip"),
        (fake_bzimage(b"\x28\xb5\x2f\xfd" + b"x" * 8), "payload is zstd"),
        (fake_bzimage(b"????" + b"x" * 8), "unknown format"),
        (fake_bzimage(LZ4_MAGIC + b"x" * 8)[:-20], "truncated"),
    ],
)
def test_locate_lz4_payload_errors_say_what_is_wrong(image: bytes, message: str) -> None:
    with pytest.raises(ImageBuildError, match=message):
        demo.locate_lz4_payload(image)


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 command (apt lz4)")
@pytest.mark.parametrize("elf", [True, False])
def test_decompress_kernel_checks_for_an_elf_image(tmp_path: Path, elf: bool) -> None:
    kernel = (b"\x7fELF" if elf else b"MZ\0\0") + bytes(range(256)) * 4000
    frame = subprocess.run(["lz4", "-l", "-c"], input=kernel, capture_output=True, check=True)
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(fake_bzimage(frame.stdout + struct.pack("<I", len(kernel))))
    progress: list[tuple[str, int | None, int | None]] = []
    dest = tmp_path / "vmlinux"
    if elf:
        digest = demo.decompress_kernel(vmlinuz, dest, lambda *a: progress.append(a))
        assert dest.read_bytes() == kernel
        assert digest == hashlib.sha256(kernel).hexdigest()
        assert progress[-1][1:] == (len(kernel), len(kernel))
    else:
        with pytest.raises(ImageBuildError, match="not the expected ELF"):
            demo.decompress_kernel(vmlinuz, dest, lambda *a: None)
        assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["vmlinuz", *(["vmlinux"] * elf)])


def read_newc(archive: bytes) -> list[tuple[str, int, int, bytes, tuple[int, int]]]:
    """(name, mode, mtime, data, rdev) per member, trailer included, checking the alignment."""
    members, pos = [], 0
    while True:
        assert archive[pos : pos + 6] == b"070701" and pos % 4 == 0
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start : data_start + filesize]
        members.append((name, fields[1], fields[5], data, (fields[9], fields[10])))
        pos = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return members


def test_cpio_is_newc_sorted_parents_first_and_deterministic() -> None:
    entries = [
        CpioEntry("usr/bin", 0o040755),
        CpioEntry("init", 0o100755, b"#!/bin/sh\n"),
        CpioEntry("bin/sh", 0o120777, b"busybox"),
        CpioEntry("bin", 0o040755),
        CpioEntry("usr", 0o040755),
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("dev", 0o040755),
    ]
    archive = b"".join(demo.cpio_records(entries))
    assert archive == b"".join(demo.cpio_records(reversed(entries)))
    members = read_newc(archive)
    names = [m[0] for m in members]
    assert names == ["bin", "bin/sh", "dev", "dev/console", "init", "usr", "usr/bin", "TRAILER!!!"]
    by_name = {m[0]: m for m in members}
    assert by_name["bin/sh"][1:4] == (0o120777, 0, b"busybox")
    assert by_name["dev/console"][4] == (5, 1)
    assert by_name["init"][3] == b"#!/bin/sh\n"
    assert {m[2] for m in members} == {0}


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio command")
def test_cpio_is_readable_by_gnu_cpio() -> None:
    entries = [CpioEntry("etc", 0o040755), CpioEntry("etc/x", 0o100644, b"abc")]
    archive = b"".join(demo.cpio_records(entries))
    listing = subprocess.run(["cpio", "-it"], input=archive, capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["etc", "etc/x"]


def fake_module(depends: str | None) -> bytes:
    """A minimal ELF64 with a .shstrtab and a .modinfo section, as in a .ko file."""
    modinfo = b"license=GPL\0" + (f"depends={depends}\0".encode() if depends is not None else b"")
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    body = shstrtab + modinfo
    shoff = 64 + len(body) + (-(64 + len(body)) % 8)
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)

    def section(name: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 3, 0, 0, offset, size, 0, 0, 1, 0)

    sections = (
        section(0, 0, 0)
        + section(1, 64, len(shstrtab))
        + section(11, 64 + len(shstrtab), len(modinfo))
    )
    return bytes(header) + body + b"\0" * (shoff - 64 - len(body)) + sections


@pytest.mark.parametrize(
    ("depends", "expected"),
    [
        ("virtio,virtio_ring", ["virtio", "virtio_ring"]),
        ("", []),
        (None, []),
        ("nf-conntrack", ["nf_conntrack"]),
    ],
)
def test_module_depends_reads_modinfo(depends: str | None, expected: list[str]) -> None:
    assert demo.module_depends(fake_module(depends)) == expected


DEPENDS = {
    "virtio_ring": [],
    "virtio": [],
    "virtio_pci": ["virtio_pci_modern_dev", "virtio", "virtio_ring"],
    "virtio_pci_modern_dev": [],
    "virtio_net": ["net_failover", "virtio", "virtio_ring"],
    "net_failover": ["failover"],
    "failover": [],
}


@pytest.mark.parametrize(
    ("wanted", "available", "builtin", "order", "skipped"),
    [
        (
            ["virtio_pci", "virtio_net"],
            set(DEPENDS),
            set(),
            [
                *("virtio_pci_modern_dev", "virtio", "virtio_ring", "virtio_pci"),
                *("failover", "net_failover", "virtio_net"),
            ],
            [],
        ),
        (
            ["virtio_ring", "virtio", "virtio_net", "vsock"],
            set(DEPENDS),
            {"virtio_ring", "virtio"},
            ["failover", "net_failover", "virtio_net"],
            ["vsock"],
        ),
    ],
)
def test_resolve_modules_loads_dependencies_first(
    wanted: list[str], available: set[str], builtin: set[str], order: list[str], skipped: list[str]
) -> None:
    assert demo.resolve_modules(wanted, available, builtin, DEPENDS.__getitem__) == (
        order,
        skipped,
    )


def test_resolve_modules_refuses_a_missing_dependency() -> None:
    with pytest.raises(ImageBuildError, match="virtio_net needs net_failover"):
        demo.resolve_modules(["virtio_net"], {"virtio_net"}, set(), DEPENDS.__getitem__)


@pytest.mark.parametrize(
    ("name", "pack"),
    [("m.ko", bytes), ("m.ko.xz", lzma.compress), ("m.ko.gz", gzip.compress)],
)
def test_read_module_decompresses(
    tmp_path: Path, name: str, pack: Callable[[bytes], bytes]
) -> None:
    (tmp_path / name).write_bytes(pack(b"\x7fELF-module"))
    assert demo.read_module(tmp_path / name) == b"\x7fELF-module"


APT_CACHE_DEPENDS = """linux-image-cloud-amd64
  Depends: linux-image-6.1.0-56-cloud-amd64
  Recommends: <linux-image-6.1.0-56-cloud-amd64-unsigned>
"""


def test_parse_depends_finds_the_concrete_kernel() -> None:
    assert demo.parse_depends(APT_CACHE_DEPENDS) == "linux-image-6.1.0-56-cloud-amd64"
    assert demo.parse_depends(" |Depends: linux-image-6.12.1-cloud-amd64\n") == (
        "linux-image-6.12.1-cloud-amd64"
    )
    assert demo.parse_depends("linux-image-cloud-amd64\n  Depends: initramfs-tools\n") is None
    assert demo.parse_depends("") is None


def test_parse_print_uris() -> None:
    sha = "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744"
    output = (
        "'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4_amd64.deb' "
        f"busybox-static_1%3a1.35.0-4_amd64.deb 928188 SHA256:{sha}\n"
        "W: some warning\n"
    )
    (deb,) = demo.parse_print_uris(output)
    assert deb.package == "busybox-static"
    assert deb.filename == "busybox-static_1%3a1.35.0-4_amd64.deb"
    assert (deb.size, deb.sha256) == (928188, sha)


@pytest.mark.parametrize(
    ("debian", "upstream"),
    [("6.1.192-2", "6.1.192"), ("1:6.12.9-1+deb13u1", "6.12.9"), ("6.1", "6.1")],
)
def test_upstream_version(debian: str, upstream: str) -> None:
    assert demo.upstream_version(debian) == upstream


def test_demo_manifest_is_a_valid_roost_manifest() -> None:
    manifest = demo.demo_manifest("6.1.192", "6.1.0-56-cloud-amd64", "a" * 64, "b" * 64)
    assert manifest["version"] == "6.1.192-1"
    assert manifest["kernel"] == {"path": "vmlinux", "sha256": "a" * 64}
    assert manifest["initramfs"] == {"path": "initramfs.cpio.gz", "sha256": "b" * 64}
    assert manifest["boot_args"] == "console=ttyS0 reboot=k panic=1"
    assert manifest["network"] == {"mode": "bridged"}
    spec = pytest.importorskip("roost.spec.manifest")
    parsed = spec.Manifest.model_validate(manifest)
    assert parsed.name == "roost-demo"


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "vmlinux"
    with pytest.raises(RuntimeError), demo._atomic(dest) as out:
        out.write(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_guest_files_ship_as_executable_package_data() -> None:
    guest = resources.files("roost.image") / "guest"
    for source in demo.GUEST_FILES:
        path = Path(str(guest / source))
        assert path.stat().st_mode & 0o111, f"{source} must be executable"
        text = path.read_text()
        assert text.startswith("#!/bin/sh\n")
        checked = subprocess.run(
            ["sh", "-n", str(path)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stderr


DEB = demo.DebPackage("busybox-static", "http://x/b.deb", "b.deb", 1, "c" * 64)
TOOLCHAIN = {"gcc": "gcc (Debian 12.2.0-14) 12.2.0", "ld": "GNU ld 2.40", "libc.a": "d" * 64}


def test_helper_source_and_toolchain_are_build_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changed helper source or compiler rebuilds an existing image instead of reusing it."""
    toolchain = dict(TOOLCHAIN)
    sources = {demo.HELPER_SOURCE: b"int main(void) { return 0; }\n"}
    original = demo._guest_file
    monkeypatch.setattr(demo, "toolchain", lambda: dict(toolchain))
    monkeypatch.setattr(demo, "_guest_file", lambda name: sources.get(name) or original(name))
    for name in demo._OUTPUTS:
        (tmp_path / name).write_bytes(name.encode())
    inputs = demo._inputs(DEB, DEB)
    assert inputs["vsock_helper"] == {
        "source_sha256": hashlib.sha256(sources[demo.HELPER_SOURCE]).hexdigest(),
        **TOOLCHAIN,
    }
    stamp = {"inputs": inputs, "outputs": demo._output_hashes(tmp_path)}
    (tmp_path / demo.STAMP_NAME).write_text(json.dumps(stamp))
    assert demo._up_to_date(tmp_path, demo._inputs(DEB, DEB))
    sources[demo.HELPER_SOURCE] += b"/* changed */\n"
    assert not demo._up_to_date(tmp_path, demo._inputs(DEB, DEB))
    sources[demo.HELPER_SOURCE] = b"int main(void) { return 0; }\n"
    toolchain["gcc"] = "gcc (Debian 12.2.0-14+deb12u1) 12.2.0"
    assert not demo._up_to_date(tmp_path, demo._inputs(DEB, DEB))


def test_initramfs_entries_include_the_helper(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF-busybox")
    modules = tmp_path / "lib/modules/6.1.0-test"
    modules.mkdir(parents=True)  # no modules: every wanted one is skipped
    entries = demo._initramfs_entries(busybox, modules, b"\x7fELF-helper", lambda *a: None)
    by_path = {entry.path: entry for entry in entries}
    assert by_path["bin/vsock-helper"] == CpioEntry("bin/vsock-helper", 0o100755, b"\x7fELF-helper")
    init = by_path["init"].data
    ready = init.index(b'say "roost-ready:')
    assert -1 < init.find(b"vsock-helper echo 1024\n") < ready
    assert -1 < init.find(b"vsock-helper bench 1025\n") < ready  # vsock and TCP, no `&`


def test_a_missing_gcc_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageBuildError, match=r"gcc not found: .*apt-get install gcc libc6-dev"):
        demo.toolchain()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc and libc6-dev")
def test_helper_compiles_cleanly_and_reproducibly(tmp_path: Path) -> None:
    """Same source and toolchain, different build folders: the same bytes."""
    builds = []
    for folder in ("one", "two/deeper"):
        work = tmp_path / folder
        work.mkdir(parents=True)
        builds.append(demo.compile_helper(work, lambda *a: None))
    assert builds[0] == builds[1]
    assert builds[0].startswith(b"\x7fELF")
    assert str(tmp_path).encode() not in builds[0]
    source = tmp_path / "one" / demo.HELPER_SOURCE
    strict = ["gcc", "-fsyntax-only", "-Wall", "-Wextra", "-Wpedantic", "-Werror", str(source)]
    checked = subprocess.run(strict, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    assert demo.toolchain().keys() == TOOLCHAIN.keys()


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc and libc6-dev")
    work = tmp_path_factory.mktemp("helper")
    binary = work / "vsock-helper"
    binary.write_bytes(demo.compile_helper(work, lambda *a: None))
    binary.chmod(0o755)
    return binary


@pytest.mark.parametrize(
    ("args", "stdout"),
    [
        ((), ""),
        (("echo",), ""),
        (("echo", "x1"), "roost-vsock: echo failed (bad port x1)\n"),
        (("hello", "-1", "guest"), "roost-vsock: hello -1 failed (bad port)\n"),
        (("hello", "4294967295", "guest"), "roost-vsock: hello 4294967295 failed (bad port)\n"),
        (("bench",), ""),
        (("bench", "1025", "tcp", "vsock"), ""),
        (("bench", "0"), "roost-bench: failed (bad port 0)\n"),
        (("bench", "65536"), "roost-bench: failed (bad port 65536)\n"),  # TCP's too
        (("bench", "+1025"), "roost-bench: failed (bad port +1025)\n"),
        (("bench", "1025", "udp"), "roost-bench: failed (bad transport udp)\n"),
    ],
)
def test_helper_refuses_bad_arguments(helper: Path, args: tuple[str, ...], stdout: str) -> None:
    """Only argument errors run here: a real echo, hello or bench would use this host's own
    vsock (the bench's TCP side runs in a namespace of its own below)."""
    result = subprocess.run([helper, *args], capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout) == (2, stdout)
    assert ("usage:" in result.stderr) == (stdout == "")


PR_SET_CHILD_SUBREAPER = 36
BENCH_PORT = 1025
BAD_REQUEST = b'error expected "sink <N>" or "source <N>", N <= 1073741824\n'


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """This process as the reaper of its orphaned descendants for the block: the helper's
    server leaves its parent at once, and the test ends it by PID and reaps it itself."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _children(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return []


@pytest.fixture
def bench_connect(
    helper: Path, netns: str, tmp_path: Path
) -> Iterator[Callable[[], socket.socket]]:
    """The helper's bench service on TCP only (this host's vsock is not ours to listen on), in
    a namespace of its own; connections to it come from a thread inside that namespace."""
    with adopting_orphans():
        worker = NetnsWorker(netns)
        try:
            run("ip", "link", "set", "lo", "up", netns=netns)
            said = tmp_path / "stdout"
            with said.open("wb") as stdout:  # a pipe would stay open in the server: no EOF
                command = ["ip", "netns", "exec", netns, str(helper), "bench", str(BENCH_PORT)]
                subprocess.run([*command, "tcp"], stdout=stdout, check=True, timeout=10)
            assert said.read_text() == f"roost-bench: tcp listening on {BENCH_PORT}\n"
            [server] = namespace_pids(netns)

            def connect() -> socket.socket:
                address = ("127.0.0.1", BENCH_PORT)
                return worker.run(lambda: socket.create_connection(address, timeout=10))

            yield connect
            # every connection is closed: its process ends (and the server reaps it)
            wait_for(lambda: not _children(server), timeout=10, what="bench connections to end")
        finally:
            worker.close()
            _end_all(namespace_pids(netns))  # the server, and any connection left behind


def _end_all(pids: list[int]) -> None:
    """SIGKILL and reap `pids`: our children (or orphans this process adopted)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and (byte := sock.recv(1)):
        data += byte
    return data


def _still_open(sock: socket.socket) -> bool:
    """Whether the peer neither sends more nor closes for a moment (the guest waits for us)."""
    sock.settimeout(0.3)
    try:
        return sock.recv(1) == b"x"  # never: b"" is a close, anything else is too much
    except TimeoutError:
        return True


@pytest.mark.root
def test_helper_bench_sinks_and_sources_exactly_n_bytes(
    bench_connect: Callable[[], socket.socket],
) -> None:
    count = 3 * 262144 + 17  # several of the helper's chunks, and a part of one
    with bench_connect() as sink:
        sink.sendall(b"sink %d\n0123456789" % count)  # data in the request's own segment
        sink.sendall(b"x" * (count - 10))
        assert _line(sink) == b"done %d\n" % count
        assert _still_open(sink)
    with bench_connect() as source:
        source.sendall(b"source %d\n" % count)
        data = _read_exactly(source, count)
        assert data == (bytes(range(256)) * (count // 256 + 1))[:count]
        assert _still_open(source)
    with bench_connect() as nothing:
        nothing.sendall(b"sink 0\n")
        assert _line(nothing) == b"done 0\n"


@pytest.mark.root
@pytest.mark.parametrize(
    ("request_", "answer"),
    [
        (b"sink\n", BAD_REQUEST),
        (b"sink -1\n", BAD_REQUEST),
        (b"sink 1 \n", BAD_REQUEST),
        (b"sink 0x10\n", BAD_REQUEST),
        (b"SINK 1\n", BAD_REQUEST),
        (b"sink 1073741825\n", BAD_REQUEST),  # over 1 GiB
        (b"source 99999999999999999999\n", BAD_REQUEST),
        (b"sink 5\0\n", b"error a NUL byte in the request line\n"),
        (b"sink 2\nabc", b"error more bytes than the request said\n"),
        (b"s" * 40, b"error request line too long\n"),  # no newline in the line's 32 bytes
    ],
)
def test_helper_bench_answers_a_bad_request_and_waits_for_the_close(
    bench_connect: Callable[[], socket.socket], request_: bytes, answer: bytes
) -> None:
    with bench_connect() as sock:
        sock.sendall(request_)
        assert _line(sock) == answer
        assert _still_open(sock)


@pytest.mark.root
def test_helper_bench_survives_clients_that_leave_early(
    bench_connect: Callable[[], socket.socket],
) -> None:
    with bench_connect() as sink:
        sink.sendall(b"sink 1000000\nabc")
    with bench_connect() as source:
        source.sendall(b"source 100000000\n")
        assert len(source.recv(10)) > 0
    with bench_connect():
        pass
    with bench_connect() as again:  # the server still serves
        again.sendall(b"sink 1\nz")
        assert _line(again) == b"done 1\n"
