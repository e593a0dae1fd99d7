"""Membership with real agents (tests/cluster.py: three `roost serve` agents in namespaces on
one PostgreSQL database, offline after 4 s, lost after 12 s): an agent frozen with SIGSTOP goes
offline and gets no placements; thawed after the grace it finds itself fenced, ends its lost
VM's VMM, joins again with a new epoch and takes changes again; and ending the reconciler's
database session hands its lock to another agent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import make_url, text

from roost.engine.cluster import RECONCILER_LOCK
from roost.state.db import Database
from roost.state.hosts import Hosts, HostState, Need
from tests.cluster import TEST_LOST_AFTER, TEST_OFFLINE_AFTER, Agent, MakeCluster
from tests.harness import links, process_alive, wait_for, write_plugin
from tests.postgres import PostgresServer

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]


@pytest.fixture
def db(postgres: PostgresServer) -> Iterator[list[Database]]:
    """The test's handle on its cluster's database (set once the cluster is made)."""
    made: list[Database] = []
    yield made
    for database in made:
        database.dispose()


def run_vm(agent: Agent, name: str) -> int:
    """A running Firecracker VM on `agent`'s host; its VMM's PID."""
    created = agent.ok("vm", "create", name, "--plugin", "p", "--host", agent.name)
    assert created["status"] == "running"
    return int(created["vmm"]["pid"])


def status(database: Database, name: str) -> str:
    with database.read() as session:
        found = session.connection().execute(
            text("SELECT status FROM vms WHERE name = :n"), {"n": name}
        )
        return str(found.scalar_one())


def past_events(agent: Agent) -> list[tuple[str, str, str | None]]:
    """The events in `agent`'s history, as (type, host or VM, status)."""
    found = []
    timeout = httpx.Timeout(10, read=2)  # the history comes at once, then the stream is quiet
    with agent.http.stream(
        "GET", "/v1/events", headers={"Last-Event-ID": "0"}, timeout=timeout
    ) as stream:
        try:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    data = json.loads(line.removeprefix("data: "))
                    found.append(
                        (data["type"], data.get("host") or data.get("vm"), data.get("status"))
                    )
        except httpx.ReadTimeout:
            pass
    return found


def test_a_frozen_agent_goes_offline_then_is_fenced_ends_its_lost_vm_and_joins_again(
    make_cluster: MakeCluster, db: list[Database], tmp_path: Path
) -> None:
    cluster = make_cluster(3)
    database = Database(cluster.database_url)
    db.append(database)
    hosts = Hosts(database)
    first, frozen = cluster[1], cluster[2]
    frozen.ok("plugin", "install", write_plugin(tmp_path, "p", network={"mode": "vsock"}))
    stranded = run_vm(frozen, "stranded")
    run_vm(first, "kept")
    epoch = hosts.get(frozen.name).epoch
    assert "firecracker" in hosts.get(frozen.name).facts["vmms"]  # what placement asks of it

    frozen.freeze()
    wait_for(
        lambda: first.http.get(f"/v1/hosts/{frozen.name}").json()["state"] == "offline",
        timeout=TEST_OFFLINE_AFTER + 30,
        what=f"{frozen.name} to be offline",
    )
    placed = {candidate.name for candidate in hosts.candidates(Need(1, 128), TEST_OFFLINE_AFTER)}
    assert placed == {"host1", "host3"}  # no placement on an offline host
    for name in ("elsewhere1", "elsewhere2"):
        assert first.ok("vm", "create", name, "--plugin", "p")["host"] != frozen.name
    wait_for(
        lambda: first.http.get("/v1/vms/stranded").json()["status"] == "unknown",
        what="its VM to read unknown on another host",
    )

    wait_for(
        lambda: status(database, "stranded") == "lost",
        timeout=TEST_LOST_AFTER + 30,
        what="its VM to be lost",
    )
    assert hosts.get(frozen.name, TEST_OFFLINE_AFTER).epoch == epoch + 1  # fenced
    told = {event for peer in (first, cluster[3]) for event in past_events(peer)}
    assert {
        ("host.offline", frozen.name, None),
        ("vm.status", "stranded", "unknown"),
        ("host.fenced", frozen.name, None),
        ("vm.status", "stranded", "lost"),
    } <= told  # by whichever peer reconciled
    assert process_alive(stranded)  # a frozen agent's VMM runs on: its host must end it

    frozen.thaw()
    wait_for(lambda: not process_alive(stranded), timeout=30, what="its lost VM's VMM to end")
    wait_for(
        lambda: hosts.get(frozen.name, TEST_OFFLINE_AFTER).state is HostState.ACTIVE,
        timeout=30,
        what=f"{frozen.name} to join again",
    )
    assert hosts.get(frozen.name).epoch == epoch + 2  # registered anew after its fence
    assert status(database, "stranded") == "lost"  # it wrote nothing of what it knew before
    assert status(database, "kept") == "running"
    assert frozen.http.get("/v1/vms/stranded").json()["status"] == "lost"
    assert run_vm(frozen, "again")  # it acts again


def test_an_agent_restarted_after_the_grace_ends_its_lost_vms_vmm_before_recovery(
    make_cluster: MakeCluster, db: list[Database], tmp_path: Path
) -> None:
    cluster = make_cluster(2)
    database = Database(cluster.database_url)
    db.append(database)
    first, restarted = cluster[1], cluster[2]
    restarted.ok("plugin", "install", write_plugin(tmp_path, "p", network={"mode": "vsock"}))
    stranded = run_vm(restarted, "stranded")
    restarted.stop()  # its VMs keep running while no agent follows them
    wait_for(
        lambda: status(database, "stranded") == "lost",
        timeout=TEST_LOST_AFTER + 30,
        what="its VM to be lost",
    )
    assert process_alive(stranded)

    restarted.start()  # no orphans: the lost VM's VMM is ended as it joins
    assert not process_alive(stranded)
    wait_for(
        lambda: restarted.http.get("/healthz").json()["status"] == "ok",
        what="its recovery to end",
    )
    assert first.http.get("/v1/vms/stranded").json()["status"] == "lost"


def test_a_lost_vm_of_a_frozen_host_is_removed_through_another_agent_and_its_host_ends_it(
    make_cluster: MakeCluster, db: list[Database], tmp_path: Path
) -> None:
    """Its host answers nothing while away (maybe for good): any agent removes the lost VM's
    record, its reservation and name with it; the host, thawed, ends the VMM it still runs and
    removes its taps and run dir."""
    cluster = make_cluster(2)
    database = Database(cluster.database_url)
    db.append(database)
    hosts = Hosts(database)
    first, frozen = cluster[1], cluster[2]
    frozen.ok("plugin", "install", write_plugin(tmp_path, "p"))  # bridged: it has a tap
    created = frozen.ok("vm", "create", "stranded", "--plugin", "p", "--host", frozen.name)
    stranded, tap = int(created["vmm"]["pid"]), created["network"]["tap"]
    assert tap in links(frozen.netns)

    frozen.freeze()
    wait_for(
        lambda: status(database, "stranded") == "lost",
        timeout=TEST_LOST_AFTER + 30,
        what="its VM to be lost",
    )
    removed = first.cli("vm", "rm", "stranded")
    assert removed.exit_code == 0, removed.stdout + removed.stderr
    assert first.http.get("/v1/vms/stranded").status_code == 404
    assert hosts.get(frozen.name).allocated.vcpus == 0
    assert process_alive(stranded)  # the frozen host's own to end

    frozen.thaw()
    wait_for(lambda: not process_alive(stranded), timeout=30, what="its VMM to end")
    wait_for(
        lambda: hosts.get(frozen.name, TEST_OFFLINE_AFTER).state is HostState.ACTIVE,
        timeout=30,
        what=f"{frozen.name} to join again",
    )
    assert tap not in links(frozen.netns)
    assert not (frozen.run_dir / "vms" / "stranded").exists()
    assert first.ok("vm", "create", "stranded", "--plugin", "p")["name"] == "stranded"


def reconciler_holder(postgres: PostgresServer, url: str) -> tuple[int, str] | None:
    """The backend PID and application name of the session holding the reconciler's lock."""
    database = make_url(url).database
    assert database is not None
    with psycopg.connect(postgres.conninfo(database), autocommit=True) as connection:
        found = connection.execute(
            "SELECT l.pid, a.application_name FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND (l.classid::bigint << 32) + l.objid::bigint = %s",
            (RECONCILER_LOCK,),
        ).fetchone()
    return None if found is None else (int(found[0]), str(found[1]))


def test_ending_the_reconcilers_session_hands_its_lock_to_another_agent(
    make_cluster: MakeCluster, postgres: PostgresServer
) -> None:
    cluster = make_cluster(3)
    url = cluster.database_url
    holder = wait_for(lambda: reconciler_holder(postgres, url), what="a reconciler")
    pid, name = holder
    assert name in {f"roost-reconciler {agent.name}" for agent in cluster}

    with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as connection:
        connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
    successor = wait_for(
        lambda: (
            (found := reconciler_holder(postgres, url)) is not None and found[0] != pid and found
        ),
        what="another reconciler to take the lock",
    )
    assert successor[1] != name  # the others try every interval; it notices its loss first
    for agent in cluster:
        assert agent.http.get("/healthz").json()["status"] == "ok"
