"""The content store: artifact files kept once under their sha256, whatever their source.

Two things make it safe to run for clients the daemon does not trust with its filesystem:

- **Nothing an install stores is collected before the database refers to it.** One lock
  (`ArtifactStore._lock`) orders every change to what the store keeps. An install pins a
  digest under that lock *before* its file is renamed into the store, and releases its pins
  under it only after the transaction that records the plugin has committed. Garbage
  collection holds the lock from reading the database's references to its last unlink. So
  every file a collection sees is either pinned, or was unpinned before the collection began
  (its references were committed before the collection read them), or lands after it ends.
  Installs take the lock only for a rename and a counter change; their copies and downloads
  run outside it.
- **A local path is judged by the file actually opened, not by its name.** The path is opened
  with `O_PATH` (which follows symlinks but reads nothing and has no side effect on a device or
  a FIFO); the kernel's own name for that file (`/proc/self/fd/N`) and its type decide; only a
  regular file that passes is reopened for reading through that same descriptor. Swapping a
  symlink or a directory between the check and the read changes nothing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import httpx

from roost.errors import HostError, InvalidError, NoSpaceError, RoostError
from roost.spec.manifest import Artifact

CHUNK = 1 << 20
MAX_ARTIFACT_BYTES = 64 << 30
ELF_MAGIC = b"\x7fELF"
# Never read from these, whoever asks: their files are the kernel's and the devices' views
# (secrets, endless or side-effecting reads), not artifacts.
PSEUDO_FILESYSTEMS = (b"/proc", b"/sys", b"/dev")
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    size: int


@dataclass(frozen=True)
class _Source:
    """Where an artifact comes from in the manifest: `loc` names the field errors point at."""

    role: str
    member: str  # "path" or "url"
    sha256: str | None

    @property
    def loc(self) -> str:
        return f"{self.role}.{self.member}"

    limit = MAX_ARTIFACT_BYTES

    def too_big(self) -> RoostError:
        return _too_big(self.loc, "it")

    def refusal(self, sha256: str, size: int) -> RoostError | None:
        if self.sha256 is not None and sha256 != self.sha256:
            return InvalidError.at(
                f"{self.role}.sha256",
                f"the file's sha256 is {sha256}, not {self.sha256} as declared; "
                "fix the manifest or the file",
            )
        return None


@dataclass(frozen=True)
class _Peer:
    """A peer agent sending the stored artifact `sha256` of `size` bytes: anything else it
    sends is refused, naming it (`origin`)."""

    sha256: str
    size: int
    origin: str

    @property
    def role(self) -> str:
        return f"artifact {self.sha256}"

    @property
    def limit(self) -> int:
        return self.size

    def too_big(self) -> RoostError:
        return HostError(
            f"peer {self.origin} sent more than the {self.size} bytes of artifact {self.sha256}"
        )

    def refusal(self, sha256: str, size: int) -> RoostError | None:
        if size != self.size:
            return HostError(
                f"peer {self.origin} sent {size} bytes of artifact {self.sha256}, not {self.size}"
            )
        if sha256 != self.sha256:
            return HostError(
                f"peer {self.origin} sent bytes whose sha256 is {sha256} for artifact "
                f"{self.sha256}; refused"
            )
        return None


@dataclass
class Pins:
    """The digests one install holds against garbage collection until the database refers to
    them (taken by `ArtifactStore.fetch`, released when `ArtifactStore.pinning` ends)."""

    digests: list[str] = field(default_factory=list)


class ArtifactStore:
    """Files under `<root>/sha256/<digest>`, written atomically, never changed once stored
    (VMs get their own copies of disks they write to)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "sha256"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._pins: Counter[str] = Counter()
        self._lock = threading.Lock()  # see the module's docstring

    @contextmanager
    def pinning(self) -> Iterator[Pins]:
        """Pins for the fetches of one install; leave only once their references are
        committed (or the install has failed)."""
        pins = Pins()
        try:
            yield pins
        finally:
            with self._lock:
                self._pins -= Counter(pins.digests)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def fetch(
        self,
        role: str,
        artifact: Artifact,
        *,
        pins: Pins,
        allowed_dirs: Sequence[Path] | None,
        progress: Progress | None = None,
    ) -> StoredArtifact:
        """Copy the artifact (an absolute path, a file:// or an http(s):// URL) into the store,
        checking its sha256, and pin it in `pins`. Local files must lie inside `allowed_dirs`
        once symlinks are resolved (`None`: anywhere, for clients that are root anyway).
        Errors name the manifest's field (`kernel.path`, `initramfs.url`, ...)."""
        if artifact.path is not None:
            source = _Source(role, "path", artifact.sha256)
            reader = _open_local(artifact.path, source.loc, allowed_dirs)
            return self._copy(reader, source, pins, progress)
        assert artifact.url is not None
        source = _Source(role, "url", artifact.sha256)
        parsed = urlparse(artifact.url)
        if parsed.scheme in ("http", "https"):
            return self._download(artifact.url, source, pins, progress)
        loc = source.loc
        if parsed.netloc not in ("", "localhost"):
            raise InvalidError.at(
                loc, f"names host {parsed.netloc!r}; file:// URLs are local to the daemon"
            )
        try:
            path = unquote(parsed.path, errors="strict")
        except UnicodeDecodeError:
            raise InvalidError.at(loc, "is not valid UTF-8 once %-escapes are decoded") from None
        reader = _open_local(path, loc, allowed_dirs)
        return self._copy(reader, source, pins, progress)

    def _copy(
        self, reader: BinaryIO, source: _Source, pins: Pins, progress: Progress | None
    ) -> StoredArtifact:
        with reader:
            size = os.fstat(reader.fileno()).st_size
            if size > MAX_ARTIFACT_BYTES:
                raise _too_big(source.loc, "the file")
            return self._store(reader, size, source, pins, progress)

    def _download(
        self, url: str, source: _Source, pins: Pins, progress: Progress | None
    ) -> StoredArtifact:
        loc = source.loc
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=30) as response:
                if response.status_code != 200:
                    raise InvalidError.at(loc, f"{url} answered HTTP {response.status_code}")
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > MAX_ARTIFACT_BYTES:
                    raise _too_big(loc, url)
                chunks = _IterReader(response.iter_bytes(CHUNK))
                return self._store(chunks, total, source, pins, progress)
        # InvalidURL (a bad port or IPv6 literal) is not an HTTPError; UnicodeError is a host
        # name IDNA cannot encode.
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as error:
            raise InvalidError.at(loc, f"cannot download {url}: {error}") from None

    def _store(
        self,
        reader: BinaryIO | _IterReader,
        total: int | None,
        source: _Source | _Peer,
        pins: Pins,
        progress: Progress | None,
    ) -> StoredArtifact:
        digest = hashlib.sha256()
        size = 0
        temp: str | None = None
        try:
            handle, temp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
            with os.fdopen(handle, "wb") as writer:
                while chunk := reader.read(CHUNK):
                    writer.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if size > source.limit:
                        raise source.too_big()
                    if progress is not None:
                        progress(size, total)
            sha256 = digest.hexdigest()
            refusal = source.refusal(sha256, size)
            if refusal is not None:
                raise refusal
            os.chmod(temp, 0o444)
            with self._lock:  # pinned before it lands: no collection can miss it
                self._pins[sha256] += 1
                pins.digests.append(sha256)
                os.replace(temp, self.path(sha256))
        except OSError as error:
            if error.errno in FULL_ERRNOS:
                raise NoSpaceError(
                    f"cannot store {source.role}: the artifact store's filesystem "
                    f"({self.root}) is full ({error.strerror}); free space there, or remove "
                    "plugins no VM uses (roost plugin rm NAME), then install again"
                ) from None
            raise HostError(f"cannot store artifact {source.role}: {error}") from None
        finally:
            if temp is not None and os.path.exists(temp):
                os.unlink(temp)
        return StoredArtifact(sha256, size)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def receive(
        self, chunks: Iterable[bytes], sha256: str, size: int, *, pins: Pins, origin: str
    ) -> StoredArtifact:
        """Store what a peer agent (`origin`) sends as the artifact `sha256` of `size` bytes,
        as installs store theirs (hashed while written, renamed into place only if it is
        exactly that artifact, pinned in `pins`); `HostError` naming the peer otherwise, with
        nothing kept. Two receptions of one digest at once both land the same bytes."""
        return self._store(_IterReader(chunks), size, _Peer(sha256, size, origin), pins, None)

    def is_elf(self, sha256: str) -> bool:
        return is_elf(self.path(sha256))

    def collect_garbage(self, referenced: Callable[[set[str]], Iterable[str]]) -> list[str]:
        """Remove stored files that neither an install in progress holds nor the database
        refers to (`referenced(digests)`: those of `digests` it does, read under the store's
        lock: it is asked about the stored files only, however many VMs refer to them);
        returns their digests."""
        removed = []
        with self._lock:
            stored = {
                path.name
                for path in self.root.iterdir()
                if not path.name.startswith(".") and path.name not in self._pins
            }
            unreferenced = stored - set(referenced(stored)) if stored else set()
            for digest in unreferenced:
                self.path(digest).unlink(missing_ok=True)
                removed.append(digest)
        return removed

    def remove_incomplete(self) -> None:
        for path in self.root.glob(".incoming-*"):
            path.unlink(missing_ok=True)


def _open_local(text: str, loc: str, allowed_dirs: Sequence[Path] | None) -> BinaryIO:
    """The regular file `text` names, open for reading, if the policy allows it (see the
    module's docstring); `InvalidError` at `loc` saying why not and what to do otherwise."""
    if "\0" in text:
        raise InvalidError.at(loc, "contains a NUL character; give the file's absolute path")
    if not text.startswith("/"):
        raise InvalidError.at(
            loc,
            f"{text} is a relative path; the daemon needs an absolute path or a URL "
            "(roost plugin install makes a manifest's relative paths absolute)",
        )
    encoded = text.encode()  # UTF-8 already: the spec and unquote refuse what is not
    allowed = None if allowed_dirs is None else [os.fsencode(d) for d in allowed_dirs]
    if allowed is not None and not _inside_any(os.path.normpath(encoded), allowed):
        raise InvalidError.at(loc, _outside_message(text, None, allowed_dirs or ()))
    try:
        handle = os.open(encoded, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidError.at(loc, f"{text} does not exist on the daemon's host") from None
    except PermissionError:
        raise InvalidError.at(loc, f"{text} is not readable by the daemon") from None
    except OSError as error:
        raise InvalidError.at(loc, f"{text} cannot be opened: {error.strerror}") from None
    try:
        opened = f"/proc/self/fd/{handle}"
        real = os.readlink(os.fsencode(opened))
        for pseudo in PSEUDO_FILESYSTEMS:
            if _inside_any(real, [pseudo]):
                raise InvalidError.at(
                    loc,
                    f"{_shown(text, real)} is inside {pseudo.decode()}; artifacts are never read "
                    "from /proc, /sys or /dev: copy the file elsewhere",
                )
        if allowed is not None and not _inside_any(real, allowed):
            raise InvalidError.at(loc, _outside_message(text, real, allowed_dirs or ()))
        mode = os.fstat(handle).st_mode
        if stat.S_ISDIR(mode):
            raise InvalidError.at(loc, f"{_shown(text, real)} is a directory; name a file in it")
        if not stat.S_ISREG(mode):
            raise InvalidError.at(
                loc,
                f"{_shown(text, real)} is a {_kind(mode)}, not a regular file; artifacts must be "
                "regular files",
            )
        try:
            return os.fdopen(os.open(opened, os.O_RDONLY | os.O_CLOEXEC), "rb")
        except PermissionError:
            raise InvalidError.at(loc, f"{text} is not readable by the daemon") from None
    finally:
        os.close(handle)


def _inside_any(path: bytes, dirs: Iterable[bytes]) -> bool:
    return any(path == d or path.startswith(d.rstrip(b"/") + b"/") for d in dirs)


def _shown(text: str, real: bytes) -> str:
    """The path as the client wrote it, and where it led when that differs."""
    resolved = real.decode(errors="backslashreplace")
    return text if resolved == text else f"{text} (which is {resolved})"


def _outside_message(text: str, real: bytes | None, allowed_dirs: Sequence[Path]) -> str:
    where = text if real is None else _shown(text, real)
    if not allowed_dirs:
        return (
            f"{where}: this daemon takes no local paths from clients over TCP; start the daemon "
            "with --artifact-dir DIR and put the file there, or serve it over http(s)"
        )
    dirs = ", ".join(str(d) for d in allowed_dirs)
    return (
        f"{where} is outside the directories this daemon takes artifacts from ({dirs}); move "
        "the file into one of them, or start the daemon with --artifact-dir DIR"
    )


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def is_elf(path: Path) -> bool:
    """Whether `path` is an ELF file (what Firecracker boots: an uncompressed vmlinux)."""
    try:
        with path.open("rb") as reader:
            return reader.read(4) == ELF_MAGIC
    except OSError:
        return False


def _too_big(loc: str, what: object) -> InvalidError:
    limit = MAX_ARTIFACT_BYTES >> 30
    return InvalidError.at(loc, f"{what} is larger than {limit} GiB, the most roost stores")


class _IterReader:
    """A `read()` over an iterator of byte chunks (httpx streams)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)

    def read(self, _size: int) -> bytes:
        return next(self._chunks, b"")
