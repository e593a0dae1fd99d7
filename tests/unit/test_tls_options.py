"""What reaching the API from elsewhere takes, checked without a daemon: the token from a file
or the environment, the daemon's certificate and the names in it, the CA a client trusts,
what `roost serve` refuses before it touches anything, the Host names a TCP listener answers
to, and what the CLI says when TLS fails."""

from __future__ import annotations

import asyncio
import http.server
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from roost.api.access import certificate_names, client_context, read_token
from roost.api.endpoints import Endpoint
from roost.api.guard import Guard
from roost.cli.client import Client
from roost.errors import InvalidError, RoostError
from tests.certs import CA, Server

TCP = "tcp://127.0.0.1:8000"
TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(ca: CA) -> Server:
    return ca.issue("daemon", "DNS:roost.test", "DNS:*.roost.test", "IP:127.0.0.1", "IP:::1")


def refusal(call: Callable[[], object]) -> tuple[str, str]:
    """The `loc` and message of the `InvalidError` that calling `call` raises."""
    with pytest.raises(InvalidError) as caught:
        call()
    return caught.value.details[0].loc, caught.value.message


# ---- the token --------------------------------------------------------------------------


def test_a_token_file_wins_over_the_environment_without_its_trailing_whitespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text("from-the-file \n\n")
    monkeypatch.setenv("ROOST_TOKEN", "from-the-environment")
    assert read_token(path) == "from-the-file"
    assert read_token(None) == "from-the-environment"
    monkeypatch.setenv("ROOST_TOKEN", "")
    assert read_token(None) is None


def test_an_empty_unreadable_or_spaced_token_is_refused_naming_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    assert refusal(lambda: read_token(empty)) == (
        "token-file",
        f"token-file: {empty} is empty; write the token into it (one word)",
    )
    loc, message = refusal(lambda: read_token(tmp_path / "none"))
    assert (loc, message.endswith("No such file or directory")) == ("token-file", True)
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    assert refusal(lambda: read_token(spaced))[0] == "token-file"
    monkeypatch.setenv("ROOST_TOKEN", "two words")
    assert refusal(lambda: read_token(None))[0] == "ROOST_TOKEN"


# ---- the daemon's certificate -----------------------------------------------------------


def test_the_names_of_a_certificate_are_its_dns_names_and_addresses(server: Server) -> None:
    names = certificate_names(server.cert, server.key)
    assert names == ("roost.test", "*.roost.test", "127.0.0.1", "0:0:0:0:0:0:0:1")


def test_a_certificate_without_alternative_names_has_none(ca: CA) -> None:
    bare = ca.issue("bare")
    assert certificate_names(bare.cert, bare.key) == ()


def test_a_certificate_and_key_that_cannot_serve_are_refused_saying_why(
    ca: CA, server: Server, tmp_path: Path
) -> None:
    other = ca.issue("other", "DNS:other.test")
    assert refusal(lambda: certificate_names(server.cert, other.key)) == (
        "tls-key",
        f"tls-key: {other.key} is not the key of {server.cert}",
    )
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", server.key, "-aes256", "-passout", "pass:x", "-out", encrypted],
        check=True,
    )
    loc, message = refusal(lambda: certificate_names(server.cert, encrypted))
    assert (loc, "is encrypted" in message) == ("tls-key", True)
    loc, message = refusal(lambda: certificate_names(tmp_path / "none.pem", server.key))
    assert (loc, "cannot read" in message) == ("tls-cert", True)
    text = tmp_path / "text.pem"
    text.write_text("not a certificate\n")
    loc, message = refusal(lambda: certificate_names(text, server.key))
    assert (loc, "not a PEM certificate and its private key" in message) == ("tls-cert", True)
    # a CA's certificate is not a server's
    loc, message = refusal(lambda: certificate_names(ca.cert, ca.key))
    assert (loc, "cannot serve TLS clients" in message) == ("tls-cert", True)


def test_a_ca_file_that_holds_no_certificate_is_refused(tmp_path: Path, ca: CA) -> None:
    assert isinstance(client_context(ca.cert), ssl.SSLContext)
    text = tmp_path / "ca.pem"
    text.write_text("not a certificate\n")
    assert refusal(lambda: client_context(text)) == (
        "ca",
        f"ca: {text} holds no PEM certificate; --ca takes the CA certificate(s) to trust",
    )
    assert refusal(lambda: client_context(tmp_path / "none"))[0] == "ca"


# ---- what `roost serve` refuses ---------------------------------------------------------


def serve(tmp_path: Path, *args: str | Path, token: str | None = None) -> tuple[int, str]:
    """`roost serve` with `args` in a process of its own: its exit code and stderr; what it
    refuses, it refuses before it makes its state dir."""
    env = {key: value for key, value in os.environ.items() if key != "ROOST_TOKEN"}
    if token is not None:
        env["ROOST_TOKEN"] = token
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "roost.cli.main", "serve", "--state-dir", state]
    argv += ["--run-dir", tmp_path / "run", "--listen", f"unix://{tmp_path}/api.sock"]
    done = subprocess.run(
        [*map(str, argv), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert not state.exists()
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    ("args", "token", "said"),
    [
        (["--listen", "tcp://127.0.0.1:8443"], None, "a TCP listener needs a token"),
        (["--listen", "tcp://10.1.2.3:8443"], TOKEN, "a TCP listener off loopback needs TLS"),
        (["--listen", "tcp://[::]:8443"], TOKEN, "--tls-cert FILE --tls-key FILE"),
        (["--listen", "https://127.0.0.1:8443"], TOKEN, "a listener is tcp://HOST:PORT"),
        (["--tls-cert", "x.pem"], None, "--tls-cert and --tls-key go together"),
        (["--server-name", "roost.test:8443"], None, "is not a host name or an address"),
        (["--server-name", "https://roost.test"], None, "give it without scheme or port"),
        (["--ca", "/nonexistent/ca.pem"], None, "ca: cannot read /nonexistent/ca.pem"),
    ],
)
def test_serve_refuses_with_exit_1_saying_what_to_do(
    tmp_path: Path, args: list[str], token: str | None, said: str
) -> None:
    code, stderr = serve(tmp_path, *args, token=token)
    assert (code, said in stderr) == (1, True), stderr


def test_serve_refuses_a_certificate_that_cannot_serve(tmp_path: Path, ca: CA) -> None:
    code, stderr = serve(tmp_path, "--tls-cert", ca.cert, "--tls-key", ca.key)
    assert code == 1 and "cannot serve TLS clients" in stderr, stderr


# ---- the Host names a TCP listener answers to -------------------------------------------


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await PlainTextResponse("reached")(scope, receive, send)


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:8000", 200),
        ("roost.test", 200),
        ("Roost.Test:8000", 200),
        ("a.roost.test", 200),
        ("roost.test.", 421),
        (".roost.test", 421),
        ("a.b.roost.test", 421),
        ("10.1.2.3", 200),
        ("[::1]:8000", 421),
        ("roost.test:8001", 421),
        ("evil.example", 421),
    ],
)
def test_a_tcp_listener_answers_to_the_names_given_besides_its_own(host: str, status: int) -> None:
    names = ("roost.test", "*.roost.test", "10.1.2.3")
    guard = Guard(
        _ok, endpoints=[Endpoint.parse(TCP)], token=TOKEN, max_body_bytes=4096, names=names
    )

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as api:
            return await api.get("/v1/vms", headers={**AUTH, "host": host})

    response = asyncio.run(ask())
    assert response.status_code == status, response.text
    if status == 421:
        message = response.json()["error"]["message"]
        assert "a name in its TLS certificate or a --server-name" in message


# ---- the CLI's TLS failures -------------------------------------------------------------


@pytest.fixture
def plain_http() -> Iterator[int]:
    """A loopback port that answers plain HTTP."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_https_to_a_daemon_that_speaks_no_tls_says_so(plain_http: int) -> None:
    client = Client(f"https://127.0.0.1:{plain_http}", timeout=10)
    try:
        with pytest.raises(RoostError) as caught:
            client.call("GET", "/v1/vms")
    finally:
        client.close()
    assert (caught.value.code, caught.value.exit_code) == ("unreachable", 5)
    assert "no TLS with the roost daemon" in caught.value.message
    assert "A plain listener is tcp://HOST:PORT" in caught.value.message


def test_an_https_api_is_asked_over_https_and_a_tcp_one_over_http() -> None:
    urls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        urls.append(str(request.url))
        return httpx.Response(200, json=[])

    for api in ("https://roost.test:8443", "tcp://127.0.0.1:8000"):
        Client(api, transport=httpx.MockTransport(handler)).call("GET", "/v1/vms")
    assert urls == ["https://roost.test:8443/v1/vms", "http://127.0.0.1:8000/v1/vms"]
