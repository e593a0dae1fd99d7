"""A host's store filled from a real peer agent: `roost serve` (SQLite) with a plugin installed
serves its artifacts by sha256 (`GET /v1/artifacts/{sha256}`), over its Unix socket and over
HTTPS with the token, and another host's store fetches them from it."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost.engine.artifact_peers import PeerArtifacts
from roost.errors import HostError
from roost.state.artifacts import ArtifactStore
from tests.certs import CA
from tests.harness import INITRAMFS, KERNEL, Daemon, network_namespace, write_plugin
from tests.integration.test_remote_api import TOKEN, free_loopback_port, token_file

pytestmark = [pytest.mark.root]


@dataclass
class PeerAgent:
    daemon: Daemon
    https: str  # its HTTPS listener's URL
    ca: Path
    artifacts: dict[str, dict[str, Any]]  # the installed plugin's: role -> {sha256, size}


@pytest.fixture
def peer(
    netns: str, tmp_path: Path, tmp_short: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PeerAgent]:
    """A daemon on a Unix socket and an HTTPS loopback listener (token required), with the
    plugin `demo` (the test kernel and initramfs) installed."""
    monkeypatch.delenv("ROOST_TOKEN", raising=False)
    ca = CA.make(tmp_path)
    server = ca.issue("daemon", "IP:127.0.0.1")
    port = free_loopback_port()
    daemon = Daemon(
        netns,
        "--listen", f"tcp://127.0.0.1:{port}",
        "--tls-cert", str(server.cert),
        "--tls-key", str(server.key),
        "--token-file", str(token_file(tmp_path, TOKEN)),
        firecracker=None,
    )  # fmt: skip
    try:
        daemon.start()
        daemon.ok("plugin", "install", write_plugin(tmp_short, "demo"))
        artifacts = daemon.http.get("/v1/plugins/demo").json()["artifacts"]
        yield PeerAgent(daemon, f"https://127.0.0.1:{port}", ca.cert, artifacts)
    finally:
        daemon.close()


def test_an_agent_serves_a_stored_artifact_by_its_sha256(peer: PeerAgent) -> None:
    kernel = peer.artifacts["kernel"]
    answer = peer.daemon.http.get(f"/v1/artifacts/{kernel['sha256']}")
    assert answer.status_code == 200
    assert answer.headers["content-length"] == str(kernel["size"])
    assert answer.content == KERNEL.read_bytes()


def test_an_unknown_digest_is_not_found_and_a_malformed_one_invalid(peer: PeerAgent) -> None:
    unknown = hashlib.sha256(b"nobody stored this").hexdigest()
    answer = peer.daemon.http.get(f"/v1/artifacts/{unknown}")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
    assert unknown in answer.json()["error"]["message"]
    for malformed in ("abc", unknown.upper(), f"..{unknown[2:]}"):
        answer = peer.daemon.http.get(f"/v1/artifacts/{malformed}")
        assert answer.status_code == 422, malformed
        assert answer.json()["error"]["details"][0]["loc"] == "sha256"


def test_over_tcp_the_artifact_route_needs_the_token(peer: PeerAgent) -> None:
    kernel = peer.artifacts["kernel"]
    verify = ssl.create_default_context(cafile=peer.ca)
    with httpx.Client(base_url=peer.https, verify=verify, timeout=30) as client:
        assert client.get(f"/v1/artifacts/{kernel['sha256']}").status_code == 401


def test_a_host_fetches_the_plugin_s_artifacts_from_a_peer_over_its_unix_socket(
    peer: PeerAgent, tmp_path: Path
) -> None:
    store = ArtifactStore(tmp_path / "here")
    PeerArtifacts(store, lambda: [peer.daemon.api])(peer.artifacts)
    assert store.path(peer.artifacts["kernel"]["sha256"]).read_bytes() == KERNEL.read_bytes()
    initramfs = store.path(peer.artifacts["initramfs"]["sha256"])
    assert initramfs.read_bytes() == INITRAMFS.read_bytes()


def test_a_host_fetches_from_a_peer_over_https_with_the_token_and_the_ca(
    peer: PeerAgent, tmp_path: Path
) -> None:
    store = ArtifactStore(tmp_path / "here")
    kernel = peer.artifacts["kernel"]
    sha256, size = kernel["sha256"], kernel["size"]
    tokenless = PeerArtifacts(store, list, ca=peer.ca)
    with pytest.raises(HostError, match=f"peer {peer.https} answered HTTP 401"):
        tokenless.fetch(sha256, size, [peer.https])
    PeerArtifacts(store, list, token=TOKEN, ca=peer.ca).fetch(sha256, size, [peer.https])
    assert store.path(sha256).read_bytes() == KERNEL.read_bytes()


def test_a_peer_lacking_it_makes_the_next_one_asked_and_none_having_it_names_them_all(
    peer: PeerAgent, tmp_path: Path
) -> None:
    """A second agent (its own namespace: one daemon per namespace) with an empty store."""
    with network_namespace() as other:
        empty = Daemon(other, firecracker=None)
        try:
            empty.start()
            store = ArtifactStore(tmp_path / "here")
            kernel = peer.artifacts["kernel"]
            fetcher = PeerArtifacts(store, list)
            unknown = hashlib.sha256(b"none").hexdigest()
            with pytest.raises(HostError) as failed:
                fetcher.fetch(unknown, 4, [empty.api, peer.daemon.api])
            assert failed.value.http_status == 502
            assert f"artifact sha256 {unknown}" in failed.value.message
            assert f"peer {empty.api} does not have it" in failed.value.message
            assert f"peer {peer.daemon.api} does not have it" in failed.value.message
            fetcher.fetch(kernel["sha256"], kernel["size"], [empty.api, peer.daemon.api])
            assert store.path(kernel["sha256"]).read_bytes() == KERNEL.read_bytes()
        finally:
            empty.close()
