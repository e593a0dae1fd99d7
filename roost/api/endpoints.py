"""Where the daemon listens and the CLI connects: `unix:///path`, `tcp://host:port`, or (for
the CLI, reaching a daemon serving TLS) `https://host:port`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from roost.errors import InvalidError

DEFAULT_API = "unix:///run/roost/roost.sock"
FORMS = "use unix:///path/to.sock, tcp://HOST:PORT or https://HOST:PORT"


@dataclass(frozen=True)
class Endpoint:
    url: str
    path: Path | None = None
    host: str | None = None
    port: int | None = None
    tls: bool = False  # https://: the TCP connection speaks TLS

    @classmethod
    def parse(cls, url: str, loc: str = "listen") -> Endpoint:
        """An endpoint URL, or `InvalidError` at `loc` saying what is wrong with it."""

        def refuse(why: str) -> InvalidError:
            return InvalidError.at(loc, f"{url!r} {why}; {FORMS}")

        try:
            parsed = urlsplit(url)
        except ValueError as error:
            raise refuse(f"is not a URL ({error})") from None
        if parsed.query or parsed.fragment:
            raise refuse("has a query or fragment")
        if parsed.scheme == "unix":
            if parsed.netloc:
                raise refuse(
                    f"names host {parsed.netloc!r}; a Unix socket is a path on this host, "
                    "written with three slashes"
                )
            if not parsed.path.startswith("/") or parsed.path.endswith("/"):
                raise refuse("needs the absolute path of a socket")
            if "\x00" in parsed.path:
                raise refuse("has a NUL character in its path")
            return cls(url, path=Path(parsed.path))
        if parsed.scheme in ("tcp", "https"):
            if parsed.path not in ("", "/") or parsed.username or parsed.password:
                raise refuse("has more than a host and a port")
            try:
                port = parsed.port
            except ValueError:
                raise refuse("has a port that is not a number from 1 to 65535") from None
            if not parsed.hostname or port is None or port == 0:
                raise refuse("needs a host and a port from 1 to 65535")
            return cls(url, host=parsed.hostname, port=port, tls=parsed.scheme == "https")
        raise refuse("is not an endpoint")

    @property
    def base_url(self) -> str:
        """The base URL an HTTP client of this endpoint sends its requests to (a Unix socket's
        host name is only a placeholder; an IPv6 host is bracketed)."""
        if self.path is not None:
            return "http://roost"
        host = self.host or ""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def is_tcp(self) -> bool:
        return self.host is not None

    @property
    def is_loopback(self) -> bool:
        """Whether a TCP endpoint's host is a loopback address (or `localhost`)."""
        if self.host is None:
            return False
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"
