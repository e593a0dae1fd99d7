"""Builds roost's demo plugin from Debian packages, without installing any of them.

The guest is a Debian cloud kernel plus a busybox initramfs whose /init configures the network
the way each roost mode asks (static `ip=`, `ip=dhcp`, none, or every NIC by its MAC from
`roost.nic=` and `roost.default=`), serves HTTP, echoes on vsock and serves bench/vsock.py's
protocol on vsock and TCP (a small static C helper compiled here with the host's gcc, as
busybox has no vsock applets), so every mode can be shown working end to end.
Outputs are reproducible (same inputs, same sha256) and a rerun with unchanged inputs only
checks hashes.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import IO, Any

Progress = Callable[[str, int | None, int | None], None]

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BOOT_ARGS = "console=ttyS0 reboot=k panic=1"
# Loaded by /init in this order (their dependencies first); built-in or absent ones are
# skipped. button + evdev let busybox acpid see the ACPI power button (QEMU system_powerdown).
# udhcpc's packet socket needs no module: Debian builds af_packet in (CONFIG_PACKET=y).
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_mmio",
    "failover",
    "net_failover",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "button",
    "evdev",
)
# Package data under roost/image/guest/ -> path inside the initramfs.
GUEST_FILES = {
    "init": "init",
    "udhcpc.script": "etc/udhcpc.script",
    "power-button": "etc/acpi/PWRF/00000080",
}
# Directories of the initramfs (busybox --install -s fills bin, sbin, usr/bin, usr/sbin).
INITRAMFS_DIRS = (
    "bin",
    "dev",
    "etc",
    "etc/acpi",
    "etc/acpi/PWRF",
    "etc/roost",
    "lib",
    "lib/modules",
    "proc",
    "run",
    "sbin",
    "sys",
    "tmp",
    "usr",
    "usr/bin",
    "usr/sbin",
    "www",
)
# The vsock helper: its source (package data), where it goes and how it is compiled. No
# build-id and no build-folder paths, so the binary depends on source and toolchain alone.
HELPER_SOURCE = "vsock-helper.c"
HELPER_PATH = "bin/vsock-helper"
HELPER_CFLAGS = ("-static", "-O2", "-s", "-Wall", "-Wextra", "-Wl,--build-id=none")
TOOLCHAIN_HINT = "install gcc and libc6-dev (apt-get install gcc libc6-dev)"
STAMP_NAME = ".roost-demo-stamp.json"

LZ4_LEGACY_MAGIC = struct.pack("<I", 0x184C2102)
ELF_MAGIC = b"\x7fELF"
_OTHER_COMPRESSIONS = {
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\x89LZO": "lzo",
    b"\x5d\x00\x00": "lzma",
}


class ImageBuildError(RuntimeError):
    """The demo image could not be built; the message says what failed and what to do."""


@dataclass(frozen=True)
class DebPackage:
    """One `apt-get download --print-uris` line: what apt would fetch for a package."""

    package: str
    url: str
    filename: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CpioEntry:
    """One initramfs member; `data` is the content of a file or the target of a symlink."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def build_demo(out_dir: Path, *, progress: Progress | None = None) -> Path:
    """Build (or reuse) the demo plugin in `out_dir` and return its `plugin.json`.

    Downloads go to `out_dir/cache/`; every output is written to a temporary name and
    renamed, so an interrupted build never leaves a truncated file under its final name.
    """
    report: Progress = progress or (lambda _step, _done, _total: None)
    out_dir = out_dir.resolve()
    cache = out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir / ".roost-demo.lock"):
        _remove_leftovers(out_dir)
        report("Resolving the kernel package", None, None)
        kernel_package = resolve_kernel_package()
        kernel_deb, busybox_deb = _print_uris([kernel_package, BUSYBOX_PACKAGE])
        inputs = _inputs(kernel_deb, busybox_deb)
        manifest_path = out_dir / "plugin.json"
        if _up_to_date(out_dir, inputs):
            report("Reusing the existing build", 1, 1)
            return manifest_path
        (out_dir / STAMP_NAME).unlink(missing_ok=True)
        kernel_file = _download(kernel_deb, cache, report)
        busybox_file = _download(busybox_deb, cache, report)
        with tempfile.TemporaryDirectory(prefix=".extract-", dir=cache) as tmp:
            root = Path(tmp)
            _extract_deb(kernel_file, root, ("boot/", "lib/modules/"), report)
            _extract_deb(busybox_file, root, ("bin/busybox",), report)
            vmlinuz = _only(root.glob("boot/vmlinuz-*"), "boot/vmlinuz-*", kernel_file)
            module_dir = _only(root.glob("lib/modules/*"), "lib/modules/<release>", kernel_file)
            vmlinux_sha = decompress_kernel(vmlinuz, out_dir / "vmlinux", report)
            helper = compile_helper(root, report)
            entries = _initramfs_entries(root / "bin/busybox", module_dir, helper, report)
            initramfs_sha = _write_initramfs(entries, out_dir / "initramfs.cpio.gz", report)
        report("Writing plugin.json", None, None)
        version = upstream_version(_deb_field(kernel_file, "Version"))
        manifest = demo_manifest(version, module_dir.name, vmlinux_sha, initramfs_sha)
        _write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
        stamp = {"inputs": inputs, "outputs": _output_hashes(out_dir)}
        _write_bytes(out_dir / STAMP_NAME, json.dumps(stamp, indent=2).encode())
        report("Demo image ready", 1, 1)
        return manifest_path


def demo_manifest(
    version: str, release: str, vmlinux_sha256: str, initramfs_sha256: str
) -> dict[str, Any]:
    """The demo plugin's manifest; artifact paths are relative to the manifest's folder."""
    return {
        "schema_version": "1",
        "name": "roost-demo",
        "version": f"{version}-1",
        "description": (
            f"roost demo guest: Debian kernel {release} and a busybox initramfs that sets up "
            "the network from ip= (static, dhcp or none) or every NIC from roost.nic= (static "
            "IPv4/IPv6 or dhcp, matched by MAC), answers HTTP on port 80 with "
            "its hostname and address, echoes on vsock port 1024 and serves a benchmark "
            "protocol on vsock and TCP port 1025"
        ),
        "kernel": {"path": "vmlinux", "sha256": vmlinux_sha256},
        "initramfs": {"path": "initramfs.cpio.gz", "sha256": initramfs_sha256},
        "boot_args": BOOT_ARGS,
        "resources": {"vcpus": 1, "memory_mib": 256},
        "network": {"mode": "bridged"},
        "labels": {"roost.dev/demo": "true"},
    }


def upstream_version(debian_version: str) -> str:
    """`6.1.192-2` -> `6.1.192`: the kernel's own version, without epoch or Debian revision."""
    version = debian_version.split(":", 1)[-1]
    return version.rsplit("-", 1)[0] if "-" in version else version


# --- apt -------------------------------------------------------------------------------------


def parse_depends(output: str, prefix: str = "linux-image-") -> str | None:
    """The first concrete `Depends:` target of `apt-cache depends` output starting `prefix`."""
    for line in output.splitlines():
        match = re.match(r"\s*\|?Depends:\s*(\S+)", line)
        if match and match.group(1).startswith(prefix):
            return match.group(1)
    return None


def parse_print_uris(output: str) -> list[DebPackage]:
    """Parse `apt-get download --print-uris` lines: `'URL' FILE SIZE SHA256:HEX`."""
    found = []
    for line in output.splitlines():
        match = re.fullmatch(r"'([^']+)' (\S+) (\d+) SHA256:([0-9a-f]{64})", line.strip())
        if match:
            url, filename, size, sha = match.groups()
            package = filename.split("_", 1)[0]
            found.append(DebPackage(package, url, filename, int(size), sha))
    return found


def resolve_kernel_package() -> str:
    """The concrete kernel package behind the meta-package (e.g. linux-image-6.1.0-NN-…)."""

    def lookup() -> str | None:
        result = _run_raw(["apt-cache", "depends", KERNEL_META_PACKAGE])
        return parse_depends(result.stdout) if result.returncode == 0 else None

    package = lookup()
    if package is None:
        _apt_update(f"{KERNEL_META_PACKAGE} is not in apt's package lists")
        package = lookup()
    if package is None:
        raise ImageBuildError(
            f"apt cannot resolve {KERNEL_META_PACKAGE} to a kernel package, even after "
            "apt-get update: the demo image needs a Debian (bookworm or later) amd64 host "
            "with the main archive in its apt sources"
        )
    return package


def _print_uris(packages: list[str]) -> list[DebPackage]:
    """What apt would download for `packages`, in order (updating the lists once if needed)."""

    def lookup() -> list[DebPackage] | None:
        result = _run_raw(["apt-get", "download", "--print-uris", *packages])
        found = {deb.package: deb for deb in parse_print_uris(result.stdout)}
        if result.returncode != 0 or set(found) != set(packages):
            return None
        return [found[package] for package in packages]

    debs = lookup()
    if debs is None:
        _apt_update(f"apt cannot locate {' and '.join(packages)}")
        debs = lookup()
    if debs is None:
        raise ImageBuildError(
            f"apt cannot locate {' and '.join(packages)} even after apt-get update; "
            "check the host's apt sources (Debian main, amd64)"
        )
    return debs


def _apt_update(reason: str) -> None:
    if os.geteuid() != 0:
        raise ImageBuildError(f"{reason}; run `apt-get update` as root, then build again")
    _run(["apt-get", "update", "-qq"], hint="check the network and the apt sources")


def _download(deb: DebPackage, cache: Path, report: Progress) -> Path:
    """`cache/<deb file>`, downloaded with `apt-get download` unless already there and intact."""
    target = cache / deb.filename
    step = f"Downloading {deb.package}"
    if target.is_file() and _sha256_file(target) == deb.sha256:
        report(step, deb.size, deb.size)
        return target
    command = ["apt-get", "download", deb.package]
    if os.geteuid() == 0:  # keeps apt from warning that _apt cannot write to our folder
        command[1:1] = ["-o", "APT::Sandbox::User=root"]
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        partial = Path(tmp) / deb.filename
        with _child(command, cwd=tmp) as process:
            while True:
                try:
                    stdout, stderr = process.communicate(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    report(step, partial.stat().st_size if partial.exists() else 0, deb.size)
        if process.returncode != 0 or not partial.is_file():
            raise ImageBuildError(
                f"`{' '.join(command)}` failed (exit {process.returncode}): "
                f"{_tail(stderr or stdout)}; check the network, or run `apt-get update` "
                "if the mirror no longer has this version"
            )
        if _sha256_file(partial) != deb.sha256:
            raise ImageBuildError(f"{deb.filename} does not match apt's sha256; build again")
        partial.replace(target)
    report(step, deb.size, deb.size)
    return target


def _deb_field(deb: Path, field: str) -> str:
    hint = f"{deb.name} may be damaged: delete it and build again"
    return _run(["dpkg-deb", "-f", str(deb), field], hint=hint).decode().strip()


def _extract_deb(deb: Path, dest: Path, wanted: tuple[str, ...], report: Progress) -> None:
    """Like `dpkg-deb --fsys-tarfile DEB | tar -x` of the regular files under `wanted`."""
    step = f"Extracting {deb.name.split('_', 1)[0]}"
    total = int(_deb_field(deb, "Installed-Size") or 0) * 1024 or None
    done = 0
    with _child(["dpkg-deb", "--fsys-tarfile", str(deb)]) as process:
        assert process.stdout is not None
        try:
            with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
                for member in archive:
                    name = PurePosixPath(member.name.removeprefix("./"))
                    if not member.isfile() or not str(name).startswith(wanted):
                        continue
                    if name.is_absolute() or ".." in name.parts:
                        raise ImageBuildError(f"{deb.name} has an unsafe path {member.name!r}")
                    source = archive.extractfile(member)
                    assert source is not None
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with source, target.open("wb") as out:
                        shutil.copyfileobj(source, out)
                    done += member.size
                    report(step, min(done, total) if total else done, total)
        except tarfile.TarError as error:
            raise ImageBuildError(
                f"{deb} cannot be unpacked ({error}); delete it and build again"
            ) from error
        _, stderr = process.communicate()
    if process.returncode != 0:
        raise ImageBuildError(f"dpkg-deb cannot read {deb}: {_tail(stderr)}; delete it and retry")
    report(step, total, total)


def _only(paths: Iterable[Path], pattern: str, source: Path) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise ImageBuildError(f"expected exactly one {pattern} in {source.name}, found {found}")
    return found[0]


# --- kernel ----------------------------------------------------------------------------------


def locate_lz4_payload(bzimage: bytes) -> tuple[bytes, int]:
    """The LZ4 legacy frame inside a bzImage and the size it decompresses to.

    The x86 boot header (protocol >= 2.08) gives the payload's offset and length; the
    payload ends with its uncompressed size (4 bytes, little-endian), which lz4 must not see.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ImageBuildError("the kernel image is not an x86 bzImage (no HdrS boot header)")
    (protocol,) = struct.unpack_from("<H", bzimage, 0x206)
    if protocol < 0x208:
        raise ImageBuildError(f"boot protocol {protocol:#x} is too old to locate the payload")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if len(payload) != length or length < 8:
        raise ImageBuildError("the bzImage payload lies outside the file: truncated image?")
    if not payload.startswith(LZ4_LEGACY_MAGIC):
        kind = next((n for m, n in _OTHER_COMPRESSIONS.items() if payload.startswith(m)), None)
        raise ImageBuildError(
            f"the bzImage payload is {kind or 'in an unknown format'}"
            f" (starts {payload[:6].hex()}), not LZ4; this builder only handles Debian's "
            "LZ4-compressed kernels"
        )
    (size,) = struct.unpack_from("<I", payload, length - 4)
    return payload[:-4], size


def decompress_kernel(vmlinuz: Path, dest: Path, report: Progress) -> str:
    """Write the bzImage's ELF payload to `dest` with `lz4 -dc`; return its sha256."""
    step = "Decompressing the kernel to vmlinux"
    frame, size = locate_lz4_payload(vmlinuz.read_bytes())
    payload = dest.with_name(f".{dest.name}.lz4")
    payload.write_bytes(frame)
    try:
        lz4 = ["lz4", "-dc", str(payload)]
        with _atomic(dest) as out, _child(lz4, hint="apt-get install lz4") as process:
            assert process.stdout is not None
            digest, done, head = hashlib.sha256(), 0, b""
            while chunk := process.stdout.read(1 << 20):
                head = head or chunk[:4]
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                report(step, min(done, size), size)
            _, stderr = process.communicate()
            if process.returncode != 0:
                raise ImageBuildError(f"lz4 could not decompress the kernel: {_tail(stderr)}")
            if head != ELF_MAGIC or done != size:
                raise ImageBuildError(
                    f"the decompressed kernel is not the expected ELF image (starts {head.hex()}"
                    f", {done} bytes, header says {size}); the package may be damaged: delete "
                    "the cache folder and build again"
                )
    finally:
        payload.unlink(missing_ok=True)
    return digest.hexdigest()


# --- modules ---------------------------------------------------------------------------------


def module_depends(ko: bytes) -> list[str]:
    """The `depends=` list of a kernel module, read from its ELF `.modinfo` section.

    The package ships no modules.dep (depmod runs at install), so this is how the builder
    learns what must be loaded first.
    """
    if ko[:4] != ELF_MAGIC or ko[4] != 2:
        raise ImageBuildError("not a 64-bit ELF kernel module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + index * shentsize
        )
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        end = ko.index(b"\0", names_offset + name)
        if ko[names_offset + name : end] == b".modinfo":
            for field in ko[offset : offset + size].split(b"\0"):
                if field.startswith(b"depends="):
                    value = field.removeprefix(b"depends=").decode()
                    return [d.replace("-", "_") for d in value.split(",") if d]
            return []
    return []


def resolve_modules(
    wanted: Iterable[str],
    available: set[str],
    builtin: set[str],
    depends: Callable[[str], list[str]],
) -> tuple[list[str], list[str]]:
    """Load order for `wanted` (dependencies first) and the wanted modules that are skipped.

    A wanted module that is built in or absent is skipped (kernels differ); a dependency of
    an included module that is neither available nor built in is an error.
    """
    order: list[str] = []
    skipped: list[str] = []

    def visit(name: str, needed_by: str | None) -> None:
        if name in order or name in builtin:
            return
        if name not in available:
            if needed_by is not None:
                raise ImageBuildError(f"module {needed_by} needs {name}, which the kernel lacks")
            skipped.append(name)
            return
        for dependency in depends(name):
            visit(dependency, name)
        order.append(name)

    for name in wanted:
        visit(name, None)
    return order, skipped


def _module_files(module_dir: Path) -> dict[str, Path]:
    """Module name (underscores) -> file, for every .ko[.xz|.gz|.zst] under `module_dir`."""
    found = {}
    for path in module_dir.rglob("*.ko*"):
        stem = path.name.split(".ko", 1)[0]
        found[stem.replace("-", "_")] = path
    return found


def _builtin_modules(module_dir: Path) -> set[str]:
    """Modules compiled into the kernel: wanted ones of these need no .ko file."""
    listing = module_dir / "modules.builtin"
    lines = listing.read_text().split() if listing.exists() else []
    return {PurePosixPath(line).name.split(".ko", 1)[0].replace("-", "_") for line in lines}


def read_module(path: Path) -> bytes:
    """A module's ELF bytes; busybox insmod cannot load compressed modules, so decompress."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return _run(["zstd", "-dc", str(path)], hint="apt-get install zstd")
    return data


# --- initramfs -------------------------------------------------------------------------------


def _guest_file(name: str) -> bytes:
    return (resources.files("roost.image") / "guest" / name).read_bytes()


def toolchain() -> dict[str, str]:
    """What the helper's binary depends on besides its source: gcc, the linker it runs and
    the static C library, so a toolchain upgrade rebuilds the image."""
    gcc = _run(["gcc", "--version"], hint=TOOLCHAIN_HINT).decode().splitlines()[0]
    ld = _run(["gcc", "-print-prog-name=ld"], hint=TOOLCHAIN_HINT).decode().strip()
    linker = _run([ld, "--version"], hint=TOOLCHAIN_HINT).decode().splitlines()[0]
    libc = Path(_run(["gcc", "-print-file-name=libc.a"], hint=TOOLCHAIN_HINT).decode().strip())
    if not libc.is_absolute() or not libc.is_file():
        raise ImageBuildError(f"gcc finds no static C library (libc.a): {TOOLCHAIN_HINT}")
    return {"gcc": gcc, "ld": linker, "libc.a": _sha256_file(libc)}


def compile_helper(work: Path, report: Progress) -> bytes:
    """The vsock helper binary, compiled in `work` (whose path does not reach the binary)."""
    report("Compiling the vsock helper", None, None)
    (work / HELPER_SOURCE).write_bytes(_guest_file(HELPER_SOURCE))
    command = ["gcc", *HELPER_CFLAGS, f"-ffile-prefix-map={work}=.", "-o", "vsock-helper"]
    _run([*command, HELPER_SOURCE], hint=TOOLCHAIN_HINT, cwd=work)
    return (work / "vsock-helper").read_bytes()


def _initramfs_entries(
    busybox: Path, module_dir: Path, helper: bytes, report: Progress
) -> list[CpioEntry]:
    report("Selecting kernel modules", None, None)
    files = _module_files(module_dir)
    cache: dict[str, bytes] = {}

    def data(name: str) -> bytes:
        if name not in cache:
            cache[name] = read_module(files[name])
        return cache[name]

    order, skipped = resolve_modules(
        GUEST_MODULES, set(files), _builtin_modules(module_dir), lambda n: module_depends(data(n))
    )
    absent = f" ({', '.join(skipped)} absent from this kernel)" if skipped else ""
    report(f"Selected {len(order)} kernel modules{absent}", len(order), len(order))
    return [
        *(CpioEntry(d, 0o040755) for d in INITRAMFS_DIRS),
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("bin/busybox", 0o100755, busybox.read_bytes()),
        CpioEntry("bin/sh", 0o120777, b"busybox"),
        CpioEntry(HELPER_PATH, 0o100755, helper),
        CpioEntry("etc/roost/modules", 0o100644, "".join(f"{m}\n" for m in order).encode()),
        *(CpioEntry(f"lib/modules/{m}.ko", 0o100644, data(m)) for m in order),
        *(CpioEntry(path, 0o100755, _guest_file(src)) for src, path in GUEST_FILES.items()),
    ]


def cpio_records(entries: Iterable[CpioEntry]) -> Iterator[bytes]:
    """A newc cpio archive, record by record: fixed inodes, owners and mtimes, parents first."""

    def pad(length: int) -> bytes:
        return b"\0" * (-length % 4)

    def record(ino: int, entry: CpioEntry, nlink: int) -> bytes:
        name = entry.path.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev)
        header = b"070701" + b"".join(b"%08X" % f for f in (*fields, len(name), 0))
        head = header + name
        return head + pad(len(head)) + entry.data + pad(len(entry.data))

    ordered = sorted(entries, key=lambda e: PurePosixPath(e.path).parts)
    for ino, entry in enumerate(ordered, start=1):
        yield record(ino, entry, 2 if entry.mode & 0o170000 == 0o040000 else 1)
    yield record(0, CpioEntry("TRAILER!!!", 0), 1)


def _write_initramfs(entries: list[CpioEntry], dest: Path, report: Progress) -> str:
    report("Packing the initramfs", None, None)
    with _atomic(dest) as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for record in cpio_records(entries):
            gz.write(record)
    return _sha256_file(dest)


# --- stamp, files and processes ---------------------------------------------------------------


def _inputs(kernel: DebPackage, busybox: DebPackage) -> dict[str, Any]:
    """Everything the outputs depend on: a change here means rebuild."""
    digest = hashlib.sha256(Path(__file__).read_bytes())  # this builder's own code counts too
    for source in sorted(GUEST_FILES):
        digest.update(source.encode() + b"\0" + _guest_file(source))
    return {
        "kernel": {"file": kernel.filename, "sha256": kernel.sha256},
        "busybox": {"file": busybox.filename, "sha256": busybox.sha256},
        "builder": digest.hexdigest(),
        "vsock_helper": {
            "source_sha256": hashlib.sha256(_guest_file(HELPER_SOURCE)).hexdigest(),
            **toolchain(),
        },
    }


_OUTPUTS = ("vmlinux", "initramfs.cpio.gz", "plugin.json")


def _output_hashes(out_dir: Path) -> dict[str, str]:
    return {name: _sha256_file(out_dir / name) for name in _OUTPUTS}


def _up_to_date(out_dir: Path, inputs: dict[str, Any]) -> bool:
    try:
        stamp = json.loads((out_dir / STAMP_NAME).read_text())
        return bool(stamp["inputs"] == inputs and stamp["outputs"] == _output_hashes(out_dir))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _atomic(dest: Path) -> Iterator[IO[bytes]]:
    """A file that appears under `dest` only once fully written."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as out:
            yield out
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _write_bytes(dest: Path, data: bytes) -> None:
    with _atomic(dest) as out:
        out.write(data)


def _remove_leftovers(out_dir: Path) -> None:
    """Temporaries of a build that was killed (SIGKILL skips every cleanup), e.g. ~100 MB of
    extracted modules; safe because the caller holds the build lock."""
    for pattern in (".*.tmp", ".*.lz4", "cache/.download-*", "cache/.extract-*"):
        for path in out_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builds into one folder (two test workers may build at once)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _child(
    command: list[str], *, cwd: str | None = None, hint: str = "is this a Debian host?"
) -> Iterator[subprocess.Popen[bytes]]:
    """A child with piped output that is killed if the caller fails (Ctrl-C included), so
    no apt-get or lz4 outlives an interrupted build, and that is always reaped."""
    try:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise ImageBuildError(f"{command[0]} not found: {hint}") from None
    with process:
        try:
            yield process
        except BaseException:
            process.kill()
            raise


def _run_raw(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageBuildError(
            f"{command[0]} not found: the demo image is built with Debian's apt"
        ) from None


def _run(command: list[str], *, hint: str, cwd: Path | None = None) -> bytes:
    """stdout of `command`, or an ImageBuildError quoting its stderr and `hint`."""
    try:
        result = subprocess.run(command, capture_output=True, check=False, cwd=cwd)
    except FileNotFoundError:
        raise ImageBuildError(f"{command[0]} not found: {hint}") from None
    if result.returncode != 0:
        raise ImageBuildError(
            f"`{' '.join(command)}` failed (exit {result.returncode}): {_tail(result.stderr)}; "
            + hint
        )
    return result.stdout


def _tail(output: bytes | str, limit: int = 400) -> str:
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    return text.strip()[-limit:] or "no output"
