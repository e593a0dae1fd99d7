"""The API leaving the host, with the real daemon: a TCP listener needs the token (from
$ROOST_TOKEN or --token-file, the file winning), one off loopback needs TLS, HTTPS is reached
by the CLI with the CA that signed the daemon's certificate (WebSockets too), and the Host
names accepted are the listener's, the certificate's and --server-name's."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.certs import CA
from tests.harness import CLIResult, Daemon, network_namespace, run

pytestmark = [pytest.mark.root]

TOKEN = "remote-api-token"


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def token_file(directory: Path, token: str, name: str = "token") -> Path:
    path = directory / name
    path.write_text(f"{token}\n")  # as `echo` writes it: the newline is not the token's
    return path


@dataclass
class Remote:
    """A daemon on a Unix socket and an HTTPS loopback listener, and what its clients hold."""

    daemon: Daemon
    port: int
    ca: Path
    token_file: Path

    @property
    def api(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def cli(self, *args: str | Path) -> CLIResult:
        return self.daemon.cli("--api", self.api, "--ca", self.ca, *args)

    def https(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api, verify=ssl.create_default_context(cafile=self.ca), timeout=30
        )


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return CA.make(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def shared_remote(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """One daemon for the module's tests that only send it requests (none changes what it
    holds or how it runs), in a namespace of its own: each would otherwise start its own."""
    directory = tmp_path_factory.mktemp("remote")
    server = ca.issue("daemon", "DNS:roost.test", "DNS:*.roost.test", "IP:127.0.0.1")
    port = free_loopback_port()
    with network_namespace() as netns:
        daemon = Daemon(
            netns,
            "--listen", f"tcp://127.0.0.1:{port}",
            "--tls-cert", str(server.cert),
            "--tls-key", str(server.key),
            "--server-name", "api.example",
            "--token-file", str(token_file(directory, TOKEN, "daemon-token")),
            firecracker=None,
            env={"ROOST_TOKEN": "not-the-daemons-token"},  # its --token-file wins
        )  # fmt: skip
        try:
            daemon.start()
            yield Remote(daemon, port, ca.cert, token_file(directory, TOKEN))
        finally:
            daemon.close()


@pytest.fixture
def remote(shared_remote: Remote, monkeypatch: pytest.MonkeyPatch) -> Remote:
    """The shared daemon, still running and holding no VM; the test's CLI starts without
    $ROOST_TOKEN."""
    monkeypatch.delenv("ROOST_TOKEN", raising=False)
    daemon = shared_remote.daemon
    assert daemon.process is not None and daemon.process.poll() is None, daemon.logs()
    assert daemon.http.get("/v1/vms").json() == []
    return shared_remote


def error_of(result: CLIResult) -> tuple[int, str, str]:
    return result.exit_code, result.json()["error"]["code"], result.json()["error"]["message"]


def test_over_https_the_cli_needs_the_token_and_its_file_wins_over_the_environment(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = remote.cli("--token-file", remote.token_file, "vm", "list", "--json")
    assert (listed.exit_code, listed.json()) == (0, [])
    nobody = remote.cli("vm", "list", "--json")
    assert error_of(nobody)[:2] == (5, "unauthorized")
    monkeypatch.setenv("ROOST_TOKEN", TOKEN)
    assert remote.cli("vm", "list", "--json").exit_code == 0
    wrong = token_file(tmp_path, "not-the-token", "wrong")
    assert error_of(remote.cli("--token-file", wrong, "vm", "list", "--json"))[:2] == (
        5,
        "unauthorized",
    )
    monkeypatch.setenv("ROOST_TOKEN", "not-the-token")
    listed = remote.cli("--token-file", remote.token_file, "vm", "list", "--json")
    assert listed.exit_code == 0
    with remote.https() as https:
        assert https.get("/healthz").status_code == 200
        refused = https.get("/v1/vms")
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "unauthorized")
        daemons_env = https.get(
            "/v1/vms", headers={"authorization": "Bearer not-the-daemons-token"}
        )
        assert daemons_env.status_code == 401
    # the Unix socket: 0600, no token
    assert stat.S_IMODE(remote.daemon.socket.stat().st_mode) == 0o600
    assert remote.daemon.http.get("/v1/vms").json() == []


def test_websockets_go_over_wss_with_the_same_ca_and_token(
    remote: Remote, ca: CA, tmp_path: Path
) -> None:
    missing = remote.cli("--token-file", remote.token_file, "vm", "connect", "nope", "1024")
    assert missing.exit_code == 3, missing.stderr
    assert "nope" in missing.stderr
    nobody = remote.cli("vm", "connect", "nope", "1024")
    assert nobody.exit_code == 5, nobody.stderr
    other = CA.make(tmp_path, "other")
    untrusted = remote.daemon.cli(
        "--api", remote.api, "--ca", other.cert, "--token-file", remote.token_file,
        "vm", "connect", "nope", "1024",
    )  # fmt: skip
    assert untrusted.exit_code == 5
    assert "does not trust" in untrusted.stderr and "--ca" in untrusted.stderr


def test_a_daemon_whose_certificate_is_not_trusted_or_not_for_the_name_is_refused_clearly(
    remote: Remote, tmp_path: Path
) -> None:
    other = CA.make(tmp_path, "other")
    untrusted = remote.daemon.cli(
        "--api", remote.api, "--ca", other.cert, "--token-file", remote.token_file,
        "vm", "list", "--json",
    )  # fmt: skip
    code, kind, message = error_of(untrusted)
    assert (code, kind) == (5, "unreachable")
    assert "presented a certificate this CLI does not trust" in message
    assert "roost --ca FILE" in message
    system = remote.daemon.cli("--api", remote.api, "vm", "list", "--json")  # no --ca
    assert "does not trust" in error_of(system)[2]
    by_localhost = remote.daemon.cli(
        "--api", f"https://localhost:{remote.port}", "--ca", remote.ca, "vm", "list", "--json"
    )
    code, _, message = error_of(by_localhost)
    assert code == 5
    assert "not valid for 'localhost'" in message and "a name or address its certificate" in message
    plain = remote.daemon.cli(
        "--api", f"tcp://127.0.0.1:{remote.port}", "--token-file", remote.token_file,
        "vm", "list", "--json",
    )  # fmt: skip
    code, _, message = error_of(plain)
    assert code == 5 and "https://HOST:PORT" in message


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1", 200),  # its --listen host
        ("localhost", 200),  # a loopback listener's
        ("roost.test", 200),  # in the certificate
        ("ROOST.test:{port}", 200),
        ("a.roost.test", 200),  # under the certificate's wildcard
        ("a.b.roost.test", 421),  # a wildcard stands for one label
        ("api.example", 200),  # --server-name
        ("evil.example", 421),
        ("roost.test:1", 421),  # another port
    ],
)
def test_host_names_from_the_certificate_and_server_name_are_accepted_others_421(
    remote: Remote, host: str, status: int
) -> None:
    headers = {"host": host.format(port=remote.port), "authorization": f"Bearer {TOKEN}"}
    with remote.https() as https:
        for path in ("/v1/vms", "/healthz"):
            response = https.get(path, headers=headers)
            assert response.status_code == status, (path, response.text)
            if status == 421:
                assert response.json()["error"]["code"] == "misdirected"


def refusal(netns: str, *args: str, env: dict[str, str] | None = None) -> str:
    """What `roost serve` with `args` said, once it exited 1."""
    daemon = Daemon(netns, *args, firecracker=None, env=env)
    try:
        process = daemon.launch()
        assert process.wait(60) == 1, daemon.logs()
        assert not daemon.state_dir.exists()  # refused before it touched anything
        return daemon.logs()
    finally:
        daemon.close()


def test_serve_refuses_tcp_without_a_token_and_off_loopback_without_tls(
    netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ROOST_TOKEN", raising=False)
    port = free_loopback_port()
    said = refusal(netns, "--listen", f"tcp://127.0.0.1:{port}")
    assert "needs a token" in said and "--token-file" in said
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    said = refusal(netns, "--listen", f"tcp://127.0.0.1:{port}", "--token-file", str(empty))
    assert f"{empty} is empty" in said
    for listen in ("tcp://10.99.0.1:8443", "tcp://0.0.0.0:8443", "tcp://roost.test:8443"):
        said = refusal(netns, "--listen", listen, env={"ROOST_TOKEN": TOKEN})
        assert "needs TLS" in said and "--tls-cert" in said, listen


def test_off_loopback_the_daemon_serves_https_to_a_client_in_its_namespace(
    netns: str, ca: CA, tmp_path: Path
) -> None:
    """The whole daemon in the namespace (`ip netns exec`), on an address of a bridge
    there; the CLI reaches it from inside the namespace too."""
    run("ip", "link", "set", "lo", "up", netns=netns)
    run("ip", "link", "add", "api0", "type", "bridge", netns=netns)
    run("ip", "addr", "add", "10.99.0.1/24", "dev", "api0", netns=netns)
    run("ip", "link", "set", "api0", "up", netns=netns)
    server = ca.issue("remote", "IP:10.99.0.1")
    tokens = token_file(tmp_path, TOKEN)
    daemon = Daemon(
        netns,
        "--listen", "tcp://10.99.0.1:8443",
        "--tls-cert", str(server.cert),
        "--tls-key", str(server.key),
        "--token-file", str(tokens),
        firecracker=None,
    )  # fmt: skip
    daemon.argv = ["ip", "netns", "exec", netns, *daemon.argv]
    try:
        daemon.start()

        def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "roost.cli.main", "--api", "https://10.99.0.1:8443"]
            env = {key: value for key, value in os.environ.items() if key != "ROOST_TOKEN"}
            return subprocess.run(
                ["ip", "netns", "exec", netns, *argv, *map(str, args)],
                check=False,
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )

        began = time.monotonic()
        listed = cli("--ca", ca.cert, "--token-file", tokens, "vm", "list", "--json")
        assert (listed.returncode, listed.stdout.strip()) == (0, "[]"), listed.stderr
        print(f"vm list over HTTPS from inside the namespace: {time.monotonic() - began:.2f}s")
        assert cli("--ca", ca.cert, "vm", "list").returncode == 5  # no token
        assert "tcp://10.99.0.1:8443 (HTTPS)" in daemon.logs()
        # SIGTERM stops both servers (HTTPS and the Unix socket's), and the daemon with them
        assert daemon.stop() == 0
        assert not daemon.socket.exists()
        assert "Traceback" not in daemon.logs()
    finally:
        daemon.close()
