"""A cluster's events with real agents (tests/cluster.py): `GET /v1/events` and `roost events`
on any agent tell what happened on every host — a VM created on another host, hosts joining
and cordoned — in one order with the same ids everywhere, and resume after an id on another
agent."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path
from typing import Any

import pytest

from roost.cli.events import _sse
from tests.cluster import Agent, MakeCluster
from tests.harness import EventsFollower, wait_for, write_plugin
from tests.integration.test_events_metrics import streams_opened

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]


class Follower(EventsFollower):
    """`roost events --json` against `agent`; the events it printed."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent.api, "--json")

    def until(self, done: Any, timeout: float = 60) -> list[dict[str, Any]]:
        """The events it prints until one for which `done(event)` holds (that one too)."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not seen or not done(seen[-1]):
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"roost events stopped after {seen}") from None
            seen.append(json.loads(line))
        return seen


def streamed(agent: Agent, last_event_id: int, through: int) -> list[dict[str, Any]]:
    """The events of `GET /v1/events` on `agent` after `last_event_id`, through id `through`."""
    headers = {"last-event-id": str(last_event_id)}
    with agent.http.stream("GET", "/v1/events", headers=headers) as response:
        assert response.status_code == 200
        blocks = _sse(response.iter_bytes())
        events = []
        for kind, event_id, data in blocks:
            if kind is None:
                continue  # the stream's opening, a heartbeat
            events.append(json.loads(data))
            assert event_id == str(events[-1]["id"])
            if events[-1]["id"] >= through:
                return events
    raise AssertionError(f"the stream ended after {events}")


def test_every_agent_tells_every_host_s_events_in_one_order(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(2)
    first, second = cluster[1], cluster[2]
    followers = [Follower(agent) for agent in cluster]
    try:
        for agent in cluster:
            wait_for(lambda a=agent: streams_opened(a) == 1, what="roost events to follow")
        second.ok("plugin", "install", write_plugin(tmp_path, "p"))
        second.ok("vm", "create", "web", "--plugin", "p", "--host", "host2", "--no-start")
        first.ok("host", "cordon", "host2")
        seen = [
            follower.until(lambda event: event["type"] == "host.cordoned") for follower in followers
        ]
    finally:
        codes = [follower.interrupt() for follower in followers]
    assert codes == [(0, ""), (0, "")]
    assert seen[0] == seen[1]  # the same events, ids and order on both agents
    told = [
        (e["type"], e["origin"], e.get("vm") or e.get("plugin") or e.get("host")) for e in seen[0]
    ]
    assert told == [
        ("plugin.installed", "host2", "p"),
        ("vm.created", "host2", "web"),
        ("host.cordoned", "host1", "host2"),
    ]
    ids = [event["id"] for event in seen[0]]
    assert ids == sorted(ids)

    # host1 streams from the table, host2's joining included; resumes after any id
    history = streamed(first, 0, ids[-1])
    joined = {(e["host"], e["origin"]) for e in history if e["type"] == "host.joined"}
    assert joined == {("host1", "host1"), ("host2", "host2")}
    assert history[-len(ids) :] == seen[0]
    assert streamed(second, ids[0], ids[-1]) == seen[0][1:]


def test_a_frozen_host_s_outage_is_told_on_its_peer(make_cluster: MakeCluster) -> None:
    # a grace far past the freeze: the host goes offline, never lost
    cluster = make_cluster(2, lost_after=120)
    first, second = cluster[1], cluster[2]
    follower = Follower(first)
    try:
        wait_for(lambda: streams_opened(first) == 1, what="roost events to follow")
        second.freeze()
        offline = follower.until(lambda event: event["type"] == "host.offline")
        second.thaw()
        back = follower.until(
            lambda event: event["type"] == "host.joined" and event["host"] == "host2"
        )
    finally:
        code, err = follower.interrupt()
    assert (code, err) == (0, "")
    assert (offline[-1]["host"], offline[-1]["origin"]) == ("host2", "host1")
    assert back[-1]["origin"] == "host1" and back[-1]["id"] > offline[-1]["id"]
