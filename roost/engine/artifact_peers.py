"""Artifacts a host lacks, fetched from its peers: in a cluster the plugins are shared but each
agent keeps its own content store, so a VM placed on a host that never installed its plugin
finds its kernel, initramfs or rootfs missing there. Before it boots, each missing file is asked
of the other agents (`GET /v1/artifacts/{sha256}` on their advertised APIs), in the order given,
and stored as an install stores its own: verified while written, renamed into place only whole.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from roost.errors import HostError, NoSpaceError, RoostError
from roost.state.artifacts import CHUNK, ArtifactStore, StoredArtifact
from roost.state.hosts import Hosts, HostState

log = logging.getLogger("roost.engine")
# the peers' advertised API URLs (unix:///path, tcp://HOST:PORT, https://HOST:PORT), to be
# tried in order; asked anew for every fetch, as hosts come and go
Peers = Callable[[], Sequence[str]]
TIMEOUT = 30.0  # seconds without progress before a peer is given up on
# who is asked first: hosts whose heartbeat is fresh (cordoned ones serve their stores too),
# then offline ones, which may answer all the same
ASKED_FIRST = {HostState.ACTIVE: 0, HostState.CORDONED: 1, HostState.OFFLINE: 2}


def peers_in(hosts: Hosts, host_name: str, offline_after: float) -> Peers:
    """The advertised APIs of every host but `host_name` (this one), read anew at each call:
    active ones first, then cordoned, then offline, by name within each."""

    def peers() -> list[str]:
        others = [host for host in hosts.list(offline_after) if host.name != host_name]
        return [host.api for host in sorted(others, key=lambda host: ASKED_FIRST[host.state])]

    return peers


class PeerArtifacts:
    """Fills this host's `store` from its peers (`peers`), calling them with `token` (sent
    where their API is TCP) and verifying HTTPS ones against `ca` (else the system's CAs)."""

    def __init__(
        self,
        store: ArtifactStore,
        peers: Peers,
        *,
        token: str | None = None,
        ca: Path | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.store = store
        self.peers = peers
        self.token = token
        self.ca = ca
        self.timeout = timeout
        self._fetching: dict[str, threading.Lock] = {}
        self._fetching_lock = threading.Lock()

    def __call__(self, artifacts: Mapping[str, Mapping[str, Any]]) -> None:
        """Make sure every one of a booting VM's `artifacts` (role -> {sha256, size}) is in
        the store. Each is pinned only while it is fetched: from then on the VM's committed
        config version refers to it, which keeps it from garbage collection."""
        for item in artifacts.values():
            sha256, size = item["sha256"], item["size"]
            if not self.store.has(sha256):
                self.fetch(sha256, size, self.peers())

    def fetch(self, sha256: str, size: int, peers: Sequence[str]) -> StoredArtifact:
        """Fetch artifact `sha256` of `size` bytes from the first of `peers` that has it; a
        peer that lacks it, cannot be reached or sends other bytes makes the next one asked.
        Fetches of one digest at once fetch it once. `HostError` (502) naming the digest and
        each peer's answer when none gave it."""
        with self._only_fetch_of(sha256):
            if self.store.has(sha256):  # a fetch that held the lock before this one got it
                return StoredArtifact(sha256, size)
            answers = []
            for peer in peers:
                try:
                    fetched = self._fetch_from(peer, sha256, size)
                except NoSpaceError:
                    raise
                except RoostError as error:
                    answers.append(error.message)
                    continue
                log.info("fetched artifact %s (%d bytes) from peer %s", sha256, size, peer)
                return fetched
            tried = "; ".join(answers) if answers else "no peer agent is known"
            raise HostError(
                f"artifact sha256 {sha256} is not in this host's store and no peer gave it "
                f"({tried}); install the plugin again with the same files through this "
                "host's API (roost plugin install --force FILE), or bring back a host that has it"
            )

    @contextmanager
    def _only_fetch_of(self, sha256: str) -> Iterator[None]:
        with self._fetching_lock:
            lock = self._fetching.setdefault(sha256, threading.Lock())
        with lock:
            yield

    def _fetch_from(self, peer: str, sha256: str, size: int) -> StoredArtifact:
        try:
            with (
                self._client(peer) as client,
                client.stream("GET", f"/v1/artifacts/{sha256}") as response,
            ):
                if response.status_code == 404:
                    raise HostError(f"peer {peer} does not have it")
                if response.status_code != 200:
                    raise HostError(f"peer {peer} answered HTTP {response.status_code}")
                with self.store.pinning() as pins:
                    return self.store.receive(
                        response.iter_bytes(CHUNK), sha256, size, pins=pins, origin=peer
                    )
        except (httpx.HTTPError, httpx.InvalidURL, ssl.SSLError, OSError) as error:
            raise HostError(f"peer {peer} cannot be reached ({error})") from None

    def _client(self, peer: str) -> httpx.Client:
        """A client of the agent whose advertised API is `peer`, as the CLI reaches a daemon:
        the token only over TCP (the Unix socket's clients are root anyway)."""
        parts = urlsplit(peer)
        if parts.scheme == "unix":
            transport = httpx.HTTPTransport(uds=parts.path)
            return httpx.Client(transport=transport, base_url="http://roost", timeout=self.timeout)
        if parts.scheme not in ("tcp", "https"):
            raise HostError(f"peer {peer} is not an API URL (unix://, tcp:// or https://)")
        scheme = "https" if parts.scheme == "https" else "http"
        headers = {"authorization": f"Bearer {self.token}"} if self.token else None
        verify: ssl.SSLContext | bool = False
        if scheme == "https":
            cafile = None if self.ca is None else str(self.ca)
            verify = ssl.create_default_context(cafile=cafile)
        return httpx.Client(
            base_url=f"{scheme}://{parts.netloc}",
            timeout=self.timeout,
            verify=verify,
            headers=headers,
        )
