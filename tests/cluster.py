"""Cluster tests on one machine: hosts are network namespaces joined by a veth "fabric" bridge,
each running its own `roost serve --netns` agent, all on one PostgreSQL database of the
session's server (a fresh database per cluster).

    fabric namespace:  bridge `fabric` (MTU 1500) <- h1, h2, ... (veth ends)
    host namespace n:  `fabric0` (the other end), 10.251.0.<n>/24: the agent's VTEP address

Everything made here is removed by the harness, also when a test fails: the agents are ended
by their PIDs and reaped, their directories removed, the namespaces deleted with whatever still
runs in them (by PID), the database dropped.

Fixtures (registered in tests/conftest.py): `fabric` (namespaces only), `make_cluster` (a
factory) and `cluster` (three agents started; `@pytest.mark.parametrize("cluster", [2],
indirect=True)` for another count).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import pytest

from tests.harness import FIRECRACKER, Daemon, namespace_pids, run, wait_for
from tests.postgres import PostgresServer

FABRIC_BRIDGE = "fabric"
FABRIC_MTU = 1500
FABRIC_PREFIX = "10.251.0"  # host n's VTEP is 10.251.0.<n>/24
HOST_LINK = "fabric0"  # a host namespace's end of its veth pair
MAX_HOSTS = 250
# short enough for tests to see a host go offline and its VMs lost, long enough that a loaded
# machine (two cores, several test workers) does not miss a heartbeat by that much
TEST_OFFLINE_AFTER = 4.0
TEST_LOST_AFTER = 12.0


def vtep_address(index: int) -> str:
    """Host `index`'s (from 1) VTEP address on the fabric."""
    return f"{FABRIC_PREFIX}.{index}"


class Fabric:
    """A namespace holding bridge `fabric`, and `hosts` host namespaces each joined to it by a
    veth pair: `fabric0` in the host, with the host's VTEP address."""

    def __init__(self, hosts: int) -> None:
        assert 1 <= hosts <= MAX_HOSTS, hosts
        tag = f"roost-t-{secrets.token_hex(3)}"
        self.namespace = f"{tag}-fabric"
        self.hosts = [f"{tag}-h{index}" for index in range(1, hosts + 1)]
        self._made: list[str] = []

    def create(self) -> Fabric:
        try:
            self._add_namespace(self.namespace)
            self._fabric("link", "add", FABRIC_BRIDGE, "mtu", str(FABRIC_MTU), "type", "bridge")
            self._fabric("link", "set", FABRIC_BRIDGE, "up")
            for index, host in enumerate(self.hosts, start=1):
                self._add_namespace(host)
                port = f"h{index}"
                self._fabric(
                    *("link", "add", port, "mtu", str(FABRIC_MTU), "type", "veth"),
                    *("peer", "name", HOST_LINK, "netns", host),
                )
                self._fabric("link", "set", port, "master", FABRIC_BRIDGE, "up")
                run("ip", "-n", host, "addr", "add", f"{vtep_address(index)}/24", "dev", HOST_LINK)
                run("ip", "-n", host, "link", "set", HOST_LINK, "up")
                run("ip", "-n", host, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._made.append(name)

    def _fabric(self, *argv: str) -> None:
        run("ip", "-n", self.namespace, *argv)

    def host(self, index: int) -> str:
        """Host `index`'s (from 1) namespace."""
        return self.hosts[index - 1]

    def ping(self, source: int, target: int) -> bool:
        """Whether host `source` reaches host `target`'s VTEP address across the fabric."""
        done = run(
            *("ping", "-c", "3", "-i", "0.2", "-W", "2", "-n", "-q", vtep_address(target)),
            check=False,
            netns=self.host(source),
        )
        return done.returncode == 0

    def pids(self) -> list[int]:
        """Every process in the fabric's namespaces."""
        return [pid for name in self._made for pid in namespace_pids(name)]

    def close(self) -> None:
        """Delete the namespaces made (hosts first), killing what still runs in them by PID."""
        while self._made:
            name = self._made.pop()
            for pid in namespace_pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            run("ip", "netns", "del", name, check=False)

    def __enter__(self) -> Fabric:
        return self.create()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


class Agent(Daemon):
    """`roost serve` as host `name` of a cluster: in its host namespace, with its own dirs and
    Unix socket (which it also advertises to its peers), on the cluster's database.

    `http`, `cli` and `ok` (from Daemon) talk to this agent's API."""

    def __init__(
        self,
        name: str,
        netns: str,
        vtep: str,
        database_url: str,
        *args: str,
        offline_after: float = TEST_OFFLINE_AFTER,
        lost_after: float = TEST_LOST_AFTER,
        firecracker: Path | None = FIRECRACKER,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(netns, *args, firecracker=firecracker, env=env)
        self.name = name
        self.vtep = vtep
        self.database_url = database_url
        self.argv += [
            *("--database-url", database_url),
            *("--host-name", name),
            *("--vtep-address", vtep),
            *("--advertise-api", self.api),
            *("--offline-after", f"{offline_after:g}"),
            *("--lost-after", f"{lost_after:g}"),
        ]
        self.frozen = False

    @property
    def pid(self) -> int:
        assert self.process is not None, f"agent {self.name} is not running"
        return self.process.pid

    def freeze(self) -> None:
        """SIGSTOP the agent (its heartbeats stop; its VMs run on)."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT a frozen agent."""
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def stop(self) -> int | None:
        """As Daemon.stop, thawing a frozen agent first (a stopped process ends only then)."""
        if self.frozen and self.process is not None:
            self.thaw()
        return super().stop()

    def close(self) -> None:
        """As Daemon.close, thawing a frozen agent first (it would not answer the removals)."""
        if self.frozen and self.process is not None:
            self.thaw()
        super().close()

    def remove_vms(self, vms: list[dict[str, Any]]) -> None:
        """Only this host's VMs (every agent lists the whole cluster's): each agent removes
        its own."""
        super().remove_vms([vm for vm in vms if vm.get("host", self.name) == self.name])


class Cluster:
    """Agents `host1`..`hostN` on a fabric and one database; `cluster[1]` is host1."""

    def __init__(self, fabric: Fabric, database_url: str, agents: list[Agent]) -> None:
        self.fabric = fabric
        self.database_url = database_url
        self.agents = agents

    def __getitem__(self, index: int) -> Agent:
        return self.agents[index - 1]

    def __iter__(self) -> Iterator[Agent]:
        return iter(self.agents)

    def __len__(self) -> int:
        return len(self.agents)

    def agent(self, name: str) -> Agent:
        return next(agent for agent in self.agents if agent.name == name)

    def start(self, timeout: float = 60) -> Cluster:
        """Start every agent that is not running, all at once (they migrate and register side
        by side), and wait until each answers and has recovered (`/healthz` says `ok`)."""
        starting = [agent for agent in self.agents if agent.process is None]
        for agent in starting:
            agent.launch()
        for agent in starting:
            agent.wait_answering(timeout)
            wait_for(
                lambda agent=agent: agent.http.get("/healthz").json()["status"] == "ok",
                timeout=timeout,
                what=f"{agent.name} to recover",
            )
        return self

    def close(self) -> None:
        """Each agent removes its VMs and is stopped; then the namespaces go."""
        try:
            for agent in self.agents:
                agent.close()
        finally:
            self.fabric.close()


def drop_database(server: PostgresServer, url: str) -> None:
    """Drop the database of `url` (any session still on it is ended)."""
    name = url.split("@/", 1)[1].split("?", 1)[0]
    with psycopg.connect(server.conninfo("postgres"), autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


MakeCluster = Callable[..., Cluster]


@pytest.fixture
def make_cluster(postgres: PostgresServer) -> Iterator[MakeCluster]:
    """make_cluster(hosts=3, *args, start=True, migrated=True, offline_after=4, lost_after=12)
    -> Cluster: `hosts` agents on a fabric of their own and a fresh database (`migrated`: a
    copy at the schema's head; else empty, so the agents migrate it side by side), each
    serving with `args`. With `start=False` a test can extend an agent's `argv` first, then
    call `cluster.start()`. Everything is removed after the test."""
    made: list[tuple[Cluster | None, Fabric, str]] = []

    def make(
        hosts: int = 3,
        *args: str,
        start: bool = True,
        migrated: bool = True,
        offline_after: float = TEST_OFFLINE_AFTER,
        lost_after: float = TEST_LOST_AFTER,
    ) -> Cluster:
        fabric = Fabric(hosts)
        database_url = postgres.database(migrated=migrated)
        made.append((None, fabric, database_url))
        fabric.create()
        agents = [
            Agent(
                f"host{index}",
                fabric.host(index),
                vtep_address(index),
                database_url,
                *args,
                offline_after=offline_after,
                lost_after=lost_after,
            )
            for index in range(1, hosts + 1)
        ]
        cluster = Cluster(fabric, database_url, agents)
        made[-1] = (cluster, fabric, database_url)
        if start:
            cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster, fabric, database_url in reversed(made):
            try:
                if cluster is not None:
                    cluster.close()
                fabric.close()
            finally:
                drop_database(postgres, database_url)


@pytest.fixture
def cluster(make_cluster: MakeCluster, request: pytest.FixtureRequest) -> Cluster:
    """Three agents started (or `request.param` of them, with indirect parametrization)."""
    return make_cluster(getattr(request, "param", 3))


@pytest.fixture
def fabric(request: pytest.FixtureRequest) -> Iterator[Fabric]:
    """Three host namespaces on a fabric (or `request.param` of them), without agents."""
    with Fabric(getattr(request, "param", 3)) as made:
        yield made
