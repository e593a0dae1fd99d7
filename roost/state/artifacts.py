"""The content store: artifact files kept once under their sha256, whatever their source."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import ParseResult, unquote, urlparse

import httpx

from roost.errors import HostError, InvalidError

CHUNK = 1 << 20
MAX_ARTIFACT_BYTES = 64 << 30
ELF_MAGIC = b"\x7fELF"
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    size: int


class ArtifactStore:
    """Files under `<root>/sha256/<digest>`, written atomically, never changed once stored
    (VMs get their own copies of disks they write to)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "sha256"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._pins: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()

    @contextmanager
    def pinning(self) -> Iterator[None]:
        """While inside, what this thread fetches is safe from garbage collection (an install
        stores its files before the database refers to them)."""
        pinned: list[str] = []
        self._local.pinned = pinned
        try:
            yield
        finally:
            self._local.pinned = None
            with self._lock:
                self._pins.subtract(pinned)

    def _pin(self, sha256: str) -> None:
        pinned = getattr(self._local, "pinned", None)
        if pinned is not None:
            with self._lock:
                self._pins[sha256] += 1
            pinned.append(sha256)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def fetch(
        self,
        source: str,
        *,
        loc: str,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
    ) -> StoredArtifact:
        """Copy `source` (an absolute path, a file:// or an http(s):// URL) into the store,
        checking `expected_sha256`. `loc` names the manifest field in errors."""
        parsed = urlparse(source)
        if parsed.scheme in ("http", "https"):
            stored = self._download(source, loc, expected_sha256, progress)
        else:
            path = self._local_path(parsed, source, loc)
            stored = self._copy(path, loc, expected_sha256, progress)
        self._pin(stored.sha256)
        return stored

    @staticmethod
    def _local_path(parsed: ParseResult, source: str, loc: str) -> Path:
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise InvalidError.at(
                loc, f"{source} names host {parsed.netloc!r}; file:// URLs are local to the daemon"
            )
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else source)
        if not path.is_absolute():
            raise InvalidError.at(
                loc, f"{source} is a relative path; the daemon needs an absolute path or a URL"
            )
        return path

    def _copy(
        self, path: Path, loc: str, expected: str | None, progress: Progress | None
    ) -> StoredArtifact:
        """A regular file only: never a device (endless) or a FIFO (a reader that hangs)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidError.at(loc, f"{path} does not exist on the daemon's host") from None
        except PermissionError:
            raise InvalidError.at(loc, f"{path} is not readable by the daemon") from None
        with os.fdopen(fd, "rb") as reader:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidError.at(loc, f"{path} is not a regular file")
            if info.st_size > MAX_ARTIFACT_BYTES:
                raise _too_big(loc, path)
            return self._store(reader, info.st_size, loc, expected, progress)

    def _download(
        self, url: str, loc: str, expected: str | None, progress: Progress | None
    ) -> StoredArtifact:
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=30) as response:
                if response.status_code != 200:
                    raise InvalidError.at(loc, f"{url} answered HTTP {response.status_code}")
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > MAX_ARTIFACT_BYTES:
                    raise _too_big(loc, url)
                chunks = _IterReader(response.iter_bytes(CHUNK))
                return self._store(chunks, total, loc, expected, progress)
        except httpx.HTTPError as error:
            raise InvalidError.at(loc, f"cannot download {url}: {error}") from None

    def _store(
        self,
        reader: BinaryIO | _IterReader,
        total: int | None,
        loc: str,
        expected: str | None,
        progress: Progress | None,
    ) -> StoredArtifact:
        digest = hashlib.sha256()
        size = 0
        handle, temp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:
            with os.fdopen(handle, "wb") as writer:
                while chunk := reader.read(CHUNK):
                    writer.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if size > MAX_ARTIFACT_BYTES:
                        raise _too_big(loc, "it")
                    if progress is not None:
                        progress(size, total)
            sha256 = digest.hexdigest()
            if expected is not None and sha256 != expected:
                raise InvalidError.at(
                    f"{loc}.sha256",
                    f"the file's sha256 is {sha256}, not {expected} as declared; "
                    "fix the manifest or the file",
                )
            os.chmod(temp, 0o444)
            os.replace(temp, self.path(sha256))
        except OSError as error:
            raise HostError(f"cannot store artifact {loc}: {error}") from None
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
        return StoredArtifact(sha256, size)

    def is_elf(self, sha256: str) -> bool:
        return is_elf(self.path(sha256))

    def collect_garbage(self, referenced: Iterable[str]) -> list[str]:
        """Remove stored files nothing refers to any more (and no install in progress holds);
        returns their digests."""
        with self._lock:
            keep = set(referenced) | {sha for sha, count in self._pins.items() if count > 0}
        removed = []
        for path in self.root.iterdir():
            if path.name not in keep and not path.name.startswith("."):
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    def remove_incomplete(self) -> None:
        for path in self.root.glob(".incoming-*"):
            path.unlink(missing_ok=True)


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
