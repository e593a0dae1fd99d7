"""Events and metrics of a real daemon (throwaway netns, real Firecracker): `roost events --json`
follows a VM's life, a stream resumes after a Last-Event-ID, `roost events` survives a daemon
restart (told `overflow`: the new daemon has no history of the old one's events), and
`/metrics` counts the VMs, their durations and their VMMs' exits."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from roost.cli.events import _sse
from tests.harness import Daemon, EventsFollower, wait_for, write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker, pytest.mark.kvm]


class Follower(EventsFollower):
    """`roost events --json` against `daemon`; the events it printed, by line."""

    def __init__(self, daemon: Daemon, *args: str) -> None:
        super().__init__(daemon.api, "--json", *args)

    def until(self, done: Any, timeout: float = 60) -> list[dict[str, Any]]:
        """The events it prints until one for which `done(event)` holds (that one too)."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not seen or not done(seen[-1]):
            try:
                seen.append(
                    json.loads(self.lines.get(timeout=max(0.1, deadline - time.monotonic())))
                )
            except queue.Empty:
                raise AssertionError(f"roost events stopped after {seen}") from None
        return seen


def scrape(daemon: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = daemon.http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def streams_opened(daemon: Daemon) -> float:
    """How many event streams the daemon has opened (counted once each answer starts)."""
    labels = {"method": "GET", "route": "/v1/events", "status": "200"}
    return scrape(daemon).get(("roost_api_requests_total", frozenset(labels.items())), 0)


def test_a_vm_s_life_as_events_and_metrics(daemon: Daemon, tmp_path: Path) -> None:
    follower = Follower(daemon)
    try:
        wait_for(lambda: streams_opened(daemon) == 1, what="roost events to follow")
        daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
        vm = daemon.ok("vm", "create", "web-1", "--plugin", "p")
        assert vm["status"] == "running"
        daemon.ok("vm", "pause", "web-1")
        daemon.ok("vm", "resume", "web-1")
        daemon.ok("vm", "stop", "web-1")

        samples = scrape(daemon)
        running = {"mode": vm["network"]["mode"], "vmm": "firecracker"}
        assert metric(samples, "roost_vms", status="stopped", **running) == 1
        assert metric(samples, "roost_vms", status="running", **running) == 0
        for operation in ("create", "stop"):
            count = "roost_vm_operation_duration_seconds_count"
            assert metric(samples, count, operation=operation) == 1, operation
            total = "roost_vm_operation_duration_seconds_sum"
            assert metric(samples, total, operation=operation) > 0, operation
        exits = "roost_vmm_exits_total"
        assert metric(samples, exits, vmm="firecracker", outcome="stopped") == 1
        assert metric(samples, exits, vmm="firecracker", outcome="crashed") == 0
        assert metric(samples, "roost_network_leases", network="default") == 1

        daemon.ok("vm", "rm", "web-1")
        seen = follower.until(lambda event: event["type"] == "vm.deleted")
    finally:
        code, err = follower.interrupt()
    assert (code, err) == (0, "")

    assert all(set(event) >= {"id", "type", "time"} for event in seen)
    assert [event["id"] for event in seen] == sorted({event["id"] for event in seen})
    life = [
        (event["type"], event.get("status"))
        for event in seen
        if event.get("vm") == "web-1" or event.get("plugin") == "p"
    ]
    assert life == [
        ("plugin.installed", None),
        ("vm.created", None),
        ("vm.status", "starting"),
        ("vm.status", "running"),
        ("vm.status", "paused"),
        ("vm.status", "running"),
        ("vm.status", "stopping"),
        ("vm.status", "stopped"),
        ("vm.deleted", None),
    ]
    stopped = next(event for event in seen if event.get("status") == "stopped")
    assert set(stopped) == {"id", "type", "time", "vm", "status", "status_reason", "exit_code"}

    # a stream that resumes after the create's id gets the rest of the VM's life again
    created = next(event for event in seen if event["type"] == "vm.created")
    headers = {"last-event-id": str(created["id"])}
    with daemon.http.stream("GET", "/v1/events", headers=headers, params={"vm": "web-1"}) as got:
        blocks = _sse(got.iter_bytes())
        next(blocks)  # the stream's opening
        again = [json.loads(next(blocks)[2]) for _ in range(7)]
    assert again == [event for event in seen if event.get("vm") == "web-1"][1:]


def test_roost_events_follows_across_a_daemon_restart(daemon: Daemon, tmp_path: Path) -> None:
    follower = Follower(daemon)
    try:
        wait_for(lambda: streams_opened(daemon) == 1, what="roost events to follow")
        daemon.ok("plugin", "install", write_plugin(tmp_path, "p"))
        [installed] = follower.until(lambda event: event["type"] == "plugin.installed")
        began = time.monotonic()
        assert daemon.stop() == 0
        stopping = time.monotonic() - began
        assert stopping < 10, "the daemon waited for the event stream to end"
        daemon.start()
        daemon.ok("vm", "create", "web-2", "--plugin", "p", "--no-start")
        seen = follower.until(lambda event: event.get("vm") == "web-2")
    finally:
        code, err = follower.interrupt()
    overflow = seen[0]
    assert overflow["type"] == "overflow"
    assert overflow["after"] == installed["id"] < overflow["resumes_at"]
    assert seen[-1]["type"] == "vm.created"
    assert code == 0
    assert "reconnecting" in err
