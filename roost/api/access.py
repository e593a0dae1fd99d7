"""What reaching the API over TCP takes, for the daemon and the CLI alike: the bearer token
(from a file or `$ROOST_TOKEN`) and TLS (the daemon's certificate and the names it holds, and
how a client verifies a daemon)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from roost.errors import InvalidError

if TYPE_CHECKING:
    import ssl

# ssl is imported where TLS is made: a CLI command over the Unix socket starts without it

TOKEN_ENV = "ROOST_TOKEN"
HANDSHAKE_ROUNDS = 8  # a TLS 1.2 or 1.3 handshake in memory takes two or three


def check_token(token: str, source: str) -> str:
    """`token` if it can be sent as a bearer token; `source` (an option or variable) is named
    in the refusal."""
    if any(char.isspace() or not char.isprintable() for char in token):
        raise InvalidError.at(
            source,
            "holds a space or a control character; a token is a single word (clients send it "
            "as 'Authorization: Bearer <token>')",
        )
    return token


def read_token(token_file: Path | None) -> str | None:
    """The token a `--token-file` holds, else `$ROOST_TOKEN`, else None. The file's trailing
    whitespace is not part of it (`echo` and editors end a file with a newline)."""
    if token_file is None:
        token = os.environ.get(TOKEN_ENV) or None
        return check_token(token, TOKEN_ENV) if token is not None else None
    try:
        token = token_file.read_text().rstrip()
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise InvalidError.at("token-file", f"cannot read {token_file}: {why}") from None
    if not token:
        raise InvalidError.at(
            "token-file", f"{token_file} is empty; write the token into it (one word)"
        )
    return check_token(token, "token-file")


def client_context(ca: Path | None) -> ssl.SSLContext:
    """How a client verifies an HTTPS daemon: against the CAs in `ca` only, else the system's
    (the daemon's name or address must be in its certificate either way)."""
    import ssl

    if ca is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError:  # an OSError too
        raise InvalidError.at(
            "ca", f"{ca} holds no PEM certificate; --ca takes the CA certificate(s) to trust"
        ) from None
    except OSError as error:
        raise InvalidError.at("ca", f"cannot read {ca}: {error.strerror}") from None


def certificate_names(cert: Path, key: Path) -> tuple[str, ...]:
    """The DNS names and addresses in the server certificate `cert` (its subjectAltName),
    once `cert` and `key` are shown to serve: both readable, the key unencrypted and the
    certificate's, the certificate valid now. Refusals are `InvalidError`s naming the file.

    The standard library decodes a certificate only as a peer's, so the daemon shakes hands
    with itself once, in memory, trusting its own certificate."""
    import ssl

    for path, loc in ((cert, "tls-cert"), (key, "tls-key")):
        try:
            path.open("rb").close()
        except OSError as error:
            raise InvalidError.at(loc, f"cannot read {path}: {error.strerror}") from None

    def no_password() -> str:  # asked only for an encrypted key; nobody types one at start
        raise InvalidError.at(
            "tls-key", f"{key} is encrypted; give roost an unencrypted key (readable by root only)"
        )

    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        server.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise InvalidError.at("tls-key", f"{key} is not the key of {cert}") from None
        raise InvalidError.at(
            "tls-cert", f"{cert} and {key} are not a PEM certificate and its private key"
        ) from None
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=str(cert))
    client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the certificate itself is trusted
    try:
        return _names_presented(server, client)
    except ssl.SSLCertVerificationError as error:
        raise InvalidError.at(
            "tls-cert", f"{cert} cannot serve TLS clients: {error.verify_message}"
        ) from None


def _names_presented(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str, ...]:
    """The DNS names and addresses of the certificate `server` presents, as `client` decodes
    it after a handshake in memory."""
    import ssl

    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server_end = server.wrap_bio(server_in, server_out, server_side=True)
    client_end = client.wrap_bio(client_in, client_out)
    for _ in range(HANDSHAKE_ROUNDS):
        done = True
        for end in (client_end, server_end):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                done = False
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if done:
            alt_names = (client_end.getpeercert() or {}).get("subjectAltName", ())
            assert isinstance(alt_names, tuple)  # pairs like ("DNS", "roost.example")
            return tuple(str(value) for kind, value in alt_names if kind in ("DNS", "IP Address"))
    raise AssertionError("a TLS handshake in memory did not finish")
