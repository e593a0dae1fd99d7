"""Where the daemon listens and the CLI connects: `unix:///path` or `tcp://host:port`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from roost.errors import InvalidError

DEFAULT_API = "unix:///run/roost/roost.sock"


@dataclass(frozen=True)
class Endpoint:
    url: str
    path: Path | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, url: str, loc: str = "listen") -> Endpoint:
        parsed = urlparse(url)
        if parsed.scheme == "unix" and parsed.path:
            return cls(url, path=Path(parsed.path))
        if parsed.scheme == "tcp" and parsed.hostname and parsed.port:
            return cls(url, host=parsed.hostname, port=parsed.port)
        raise InvalidError.at(
            loc, f"{url!r} is not an endpoint; use unix:///path/to.sock or tcp://HOST:PORT"
        )
