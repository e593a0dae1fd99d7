"""Throwaway TLS material for tests, made with the `openssl` command: a CA and server
certificates it signs for the names a test chooses."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Server:
    cert: Path
    key: Path


@dataclass(frozen=True)
class CA:
    """A CA in `directory` (`name.pem`, `name.key`) that issues server certificates there."""

    directory: Path
    name: str = "ca"

    @property
    def cert(self) -> Path:
        return self.directory / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.directory / f"{self.name}.key"

    @classmethod
    def make(cls, directory: Path, name: str = "ca") -> CA:
        ca = cls(directory, name)
        openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", ca.key, "-out", ca.cert, "-days", "2", "-subj", f"/CN=roost test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign",
            cwd=directory,
        )  # fmt: skip
        return ca

    def issue(self, name: str, *alt_names: str) -> Server:
        """A server certificate and key (`name.pem`, `name.key`) for `alt_names` (`DNS:x`,
        `IP:a.b.c.d`), valid for two days."""
        server = Server(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        extensions = self.directory / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE", "extendedKeyUsage=serverAuth"]
        if alt_names:
            lines.append(f"subjectAltName={','.join(alt_names)}")
        extensions.write_text("\n".join(lines) + "\n")
        openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", server.key, "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=self.directory,
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", self.cert, "-CAkey", self.key,
            "-CAcreateserial", "-out", server.cert, "-days", "2", "-extfile", extensions,
            cwd=self.directory,
        )  # fmt: skip
        return server
