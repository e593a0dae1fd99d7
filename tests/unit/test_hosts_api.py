"""`/v1/hosts` on a daemon that is not part of a cluster (an engine on fakes over SQLite): the
list is empty, and a host, its cordon and its drain are 404 saying why; and the `roost host`
commands' output for people (the tables and fields, within 80 columns) and scripts."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.cli import host as host_cli
from roost.cli.main import app
from tests.engine_fakes import World

NOW = datetime(2026, 12, 5, 10, 0, 30, tzinfo=UTC)


def host(name: str, state: str = "active", vcpus: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "state": state,
        "vtep_address": "10.251.0.1",
        "api": f"unix:///run/roost-{name}/roost.sock",
        "labels": {"zone": "a"},
        "capacity": {"vcpus": 64, "memory_mib": 15953},
        "allocated": {"vcpus": vcpus, "memory_mib": vcpus * 256},
        "heartbeat_at": "2026-12-05T10:00:28.000Z",
        "epoch": 3,
    }


def call(world: World, method: str, url: str) -> httpx.Response:
    transport = httpx.ASGITransport(
        app=create_app(world.engine, [Endpoint.parse("unix:///run/roost.sock")])
    )

    async def request() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://roost") as client:
            return await client.request(method, url)

    return asyncio.run(request())


def test_without_a_cluster_the_list_is_empty_and_each_host_is_not_found(world: World) -> None:
    listed = call(world, "GET", "/v1/hosts")
    assert (listed.status_code, listed.json()) == (200, [])
    for method, url in [
        ("GET", "/v1/hosts/h1"),
        ("POST", "/v1/hosts/h1/cordon"),
        ("POST", "/v1/hosts/h1/uncordon"),
        ("POST", "/v1/hosts/h1/drain"),
    ]:
        answer = call(world, method, url)
        assert answer.status_code == 404, url
        error = answer.json()["error"]
        assert error["code"] == "not_found"
        assert "not part of a cluster" in error["message"]


def test_a_host_name_that_is_not_one_is_refused(world: World) -> None:
    assert call(world, "GET", "/v1/hosts/Not_A_Name").status_code == 422


def test_the_hosts_table_fits_80_columns_and_shows_use_and_heartbeat_age(
    capsys: pytest.CaptureFixture[str],
) -> None:
    host_cli.hosts_table(
        [host("host1", vcpus=3), host("host2", "cordoned"), host("host3", "offline")], NOW
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "VTEP", "VCPUS", "MEMORY", "MIB", "HEARTBEAT"]
    assert lines[1].split() == ["host1", "active", "10.251.0.1", "3/64", "768/15953", "2s", "ago"]
    assert lines[2].split()[1] == "cordoned"
    assert max(map(len, lines)) <= 80


def test_an_empty_list_says_there_is_no_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    host_cli.hosts_table([], NOW)
    shown = capsys.readouterr()
    assert shown.out == ""
    assert "not part of a cluster" in shown.err


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s ago"), (119, "119s ago"), (600, "10m ago"), (90000, "25h ago"), (200000, "2d ago")],
)
def test_a_heartbeat_age_reads_in_one_unit(seconds: int, shown: str) -> None:
    moment = datetime.fromtimestamp(NOW.timestamp() - seconds, UTC)
    assert host_cli.heartbeat_age(moment.isoformat().replace("+00:00", "Z"), NOW) == shown


def test_a_host_shows_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    host_cli.show_host(host("host1", vcpus=2), NOW)
    shown = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert shown["host"] == "host1"
    assert shown["labels"] == "zone=a"
    assert shown["vcpus"] == "2/64 allocated"
    assert shown["memory"] == "512/15953 MiB allocated"
    assert shown["epoch"] == "3"
    assert shown["heartbeat"] == "2026-12-05T10:00:28.000Z (2s ago)"


def test_a_drain_prints_what_moved_and_what_stayed_with_the_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    host_cli.show_drain(
        {
            "host": host("host2", "cordoned"),
            "moved": [{"vm": "idle", "to": "host3"}],
            "stayed": [{"vm": "web", "reason": "running: stop it or remove it"}],
        }
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "host host2 is cordoned: no VM is placed there"
    assert lines[1:4] == ["moved 1 VM(s):", "VM    TO", "idle  host3"]
    assert lines[4:] == ["1 VM(s) stayed:", "VM   REASON", "web  running: stop it or remove it"]


def test_the_host_commands_print_the_daemons_json_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = {
        ("GET", "/v1/hosts"): [host("host1")],
        ("GET", "/v1/hosts/host1"): host("host1"),
        ("POST", "/v1/hosts/host1/cordon"): host("host1", "cordoned"),
        ("POST", "/v1/hosts/host1/uncordon"): host("host1"),
        ("POST", "/v1/hosts/host1/drain"): {"host": host("host1"), "moved": [], "stayed": []},
    }

    class Client:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def call(self, method: str, path: str) -> Any:
            return answers[(method, path)]

        def close(self) -> None:
            pass

    monkeypatch.setattr("roost.cli.reach.Client", Client)
    for words, key in [
        (["list"], ("GET", "/v1/hosts")),
        (["show", "host1"], ("GET", "/v1/hosts/host1")),
        (["cordon", "host1"], ("POST", "/v1/hosts/host1/cordon")),
        (["uncordon", "host1"], ("POST", "/v1/hosts/host1/uncordon")),
        (["drain", "host1"], ("POST", "/v1/hosts/host1/drain")),
    ]:
        result = CliRunner().invoke(app, ["host", *words, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == answers[key]
