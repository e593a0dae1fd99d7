"""A host fetching an artifact it lacks from its peers' agents: real content stores, peers
that are small HTTP servers on Unix sockets (one serving a real store, others lying or
lacking it), and the engine asking before a boot."""

from __future__ import annotations

import hashlib
import http.server
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from roost.engine.artifact_peers import PeerArtifacts, peers_in
from roost.errors import HostError
from roost.spec import VMConfig
from roost.state.artifacts import ArtifactStore
from roost.state.db import Database, sqlite_url
from roost.state.hosts import HostRegistration, Hosts
from roost.state.models import Host
from tests.engine_fakes import World
from tests.harness import wait_for

CONTENT = b"a kernel a peer has " * 1000
SHA256 = hashlib.sha256(CONTENT).hexdigest()


class Peer:
    """An agent's artifact route on a Unix socket, serving `store`'s files; a `lying` one
    sends other bytes of the same length. `asked` lists the digests requested; a peer `held`
    answers only once `release` is set."""

    def __init__(self, socket: Path, store: ArtifactStore, *, lying: bool = False) -> None:
        self.socket = socket
        self.store = store
        self.lying = lying
        self.asked: list[str] = []
        self.release = threading.Event()
        self.release.set()

    @property
    def api(self) -> str:
        return f"unix://{self.socket}"


@contextmanager
def serving(peer: Peer) -> Iterator[Peer]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            sha256 = self.path.removeprefix("/v1/artifacts/")
            peer.asked.append(sha256)
            peer.release.wait(10)
            if not peer.store.has(sha256):
                self.send_error(404)
                return
            body = peer.store.path(sha256).read_bytes()
            if peer.lying:
                body = b"x" * len(body)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # a Unix socket's client has no address
            return None

    server = socketserver.ThreadingUnixStreamServer(str(peer.socket), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def store_holding(root: Path, content: bytes) -> ArtifactStore:
    store = ArtifactStore(root)
    digest = hashlib.sha256(content).hexdigest()
    store.path(digest).write_bytes(content)
    return store


@pytest.fixture
def having(tmp_short: Path) -> Iterator[Peer]:
    """A peer whose store has CONTENT."""
    store = store_holding(tmp_short / "having", CONTENT)
    with serving(Peer(tmp_short / "having.sock", store)) as peer:
        yield peer


@pytest.fixture
def lacking(tmp_short: Path) -> Iterator[Peer]:
    with serving(Peer(tmp_short / "lacking.sock", ArtifactStore(tmp_short / "lacking"))) as peer:
        yield peer


@pytest.fixture
def lying(tmp_short: Path) -> Iterator[Peer]:
    """A peer that has CONTENT and sends other bytes for it."""
    store = store_holding(tmp_short / "lying", CONTENT)
    with serving(Peer(tmp_short / "lying.sock", store, lying=True)) as peer:
        yield peer


def stored(store: ArtifactStore) -> list[str]:
    """Every file in the store, temporary ones too."""
    return sorted(path.name for path in store.root.iterdir())


def test_a_missing_artifact_is_fetched_from_a_peer_into_the_store(
    tmp_path: Path, having: Peer
) -> None:
    store = ArtifactStore(tmp_path)
    fetched = PeerArtifacts(store, list).fetch(SHA256, len(CONTENT), [having.api])
    assert (fetched.sha256, fetched.size) == (SHA256, len(CONTENT))
    assert store.path(SHA256).read_bytes() == CONTENT
    assert stored(store) == [SHA256]


def test_a_peer_that_sends_other_bytes_is_refused_and_leaves_nothing(
    tmp_path: Path, lying: Peer
) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(HostError) as refused:
        PeerArtifacts(store, list).fetch(SHA256, len(CONTENT), [lying.api])
    assert SHA256 in refused.value.message
    assert f"peer {lying.api} sent bytes whose sha256 is" in refused.value.message
    assert stored(store) == []


def test_a_peer_that_sends_more_or_fewer_bytes_than_recorded_is_refused(
    tmp_path: Path, having: Peer
) -> None:
    store = ArtifactStore(tmp_path)
    for recorded in (len(CONTENT) - 1, len(CONTENT) + 1):
        with pytest.raises(HostError) as refused:
            PeerArtifacts(store, list).fetch(SHA256, recorded, [having.api])
        assert f"artifact {SHA256}" in refused.value.message
        assert stored(store) == []


def test_a_peer_without_it_or_a_liar_makes_the_next_peer_asked(
    tmp_path: Path, lacking: Peer, lying: Peer, having: Peer
) -> None:
    store = ArtifactStore(tmp_path)
    PeerArtifacts(store, list).fetch(SHA256, len(CONTENT), [lacking.api, lying.api, having.api])
    assert store.path(SHA256).read_bytes() == CONTENT
    assert (lacking.asked, lying.asked, having.asked) == ([SHA256], [SHA256], [SHA256])


def test_when_no_peer_has_it_the_error_names_the_digest_and_every_peer_tried(
    tmp_path: Path, lacking: Peer
) -> None:
    store = ArtifactStore(tmp_path)
    gone = f"unix://{tmp_path}/nobody.sock"
    with pytest.raises(HostError) as failed:
        PeerArtifacts(store, list).fetch(SHA256, len(CONTENT), [lacking.api, gone])
    error = failed.value
    assert error.http_status == 502
    assert error.code == "host_error"
    assert f"artifact sha256 {SHA256} is not in this host's store" in error.message
    assert f"peer {lacking.api} does not have it" in error.message
    assert f"peer {gone} cannot be reached" in error.message
    assert stored(store) == []


def test_with_no_peer_known_the_error_says_so(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="no peer agent is known"):
        PeerArtifacts(ArtifactStore(tmp_path), list).fetch(SHA256, len(CONTENT), [])


class CountingStore(ArtifactStore):
    """A store that counts how often it was asked whether it has a file."""

    checks = 0

    def has(self, sha256: str) -> bool:
        self.checks += 1
        return super().has(sha256)


def test_two_boots_needing_one_artifact_at_once_fetch_it_once(tmp_path: Path, having: Peer) -> None:
    store = CountingStore(tmp_path)
    peers = PeerArtifacts(store, lambda: [having.api])
    having.release.clear()  # the first fetch waits at the peer until the second one lacks it too
    artifacts = {"kernel": {"sha256": SHA256, "size": len(CONTENT)}}
    errors: list[BaseException] = []

    def boot() -> None:
        try:
            peers(artifacts)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=boot) for _ in range(2)]
    for thread in threads:
        thread.start()
    # the first: lacks it, lacks it still once it fetches alone; the second: lacks it
    wait_for(lambda: having.asked and store.checks == 3, what="both boots to lack it")
    having.release.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert having.asked == [SHA256]
    assert store.path(SHA256).read_bytes() == CONTENT


def test_artifacts_the_store_has_are_not_asked_for(tmp_path: Path, having: Peer) -> None:
    store = store_holding(tmp_path, CONTENT)
    PeerArtifacts(store, lambda: [having.api])({"kernel": {"sha256": SHA256, "size": 1}})
    assert having.asked == []


def test_a_boot_fetches_what_its_host_lacks_from_a_peer_first(
    world: World, tmp_short: Path
) -> None:
    """The plugin's files are moved from this host's store to a peer's: the create's boot
    fetches them back, by digest, before its VMM starts."""
    peer_store = ArtifactStore(tmp_short / "peer")
    for path in world.store.root.iterdir():
        path.rename(peer_store.path(path.name))
    with serving(Peer(tmp_short / "peer.sock", peer_store)) as peer:
        world.engine.missing_artifacts = PeerArtifacts(world.store, lambda: [peer.api])
        vm = world.engine.create_vm("fetched", VMConfig(plugin="p"))
    assert vm["status"] == "running"
    assert sorted(peer.asked) == sorted(stored(peer_store))
    assert stored(world.store) == stored(peer_store)


def test_a_boot_whose_artifacts_no_peer_has_fails_and_leaves_nothing(world: World) -> None:
    for path in world.store.root.iterdir():
        path.unlink()
    world.engine.missing_artifacts = PeerArtifacts(world.store, list)
    with pytest.raises(HostError, match="no peer agent is known"):
        world.engine.create_vm("unfetched", VMConfig(plugin="p"))
    world.assert_nothing_left("unfetched")


def test_the_peers_of_a_host_are_the_others_active_then_cordoned_then_offline(
    tmp_path: Path,
) -> None:
    db = Database(sqlite_url(tmp_path))
    db.migrate()
    try:
        hosts = Hosts(db)
        for number, name in enumerate(("self", "d-offline", "c-cordoned", "b", "a"), start=1):
            hosts.register(
                HostRegistration(
                    name=name,
                    vtep_address=f"192.0.2.{number}",
                    api=f"unix:///run/{name}.sock",
                    labels={},
                    capacity_vcpus=4,
                    capacity_memory_mib=1024,
                    facts={},
                )
            )
        hosts.set_cordoned("c-cordoned", True)
        long_ago = datetime(2000, 1, 1, tzinfo=UTC)
        db.transact(
            lambda session: session.execute(
                update(Host).where(Host.name == "d-offline").values(heartbeat_at=long_ago)
            )
        )
        assert peers_in(hosts, "self", offline_after=20)() == [
            "unix:///run/a.sock",
            "unix:///run/b.sock",
            "unix:///run/c-cordoned.sock",
            "unix:///run/d-offline.sock",
        ]
    finally:
        db.dispose()
