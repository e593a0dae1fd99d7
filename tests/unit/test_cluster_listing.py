"""A cluster's VMs as any agent lists them, and what an agent's engine acts on: an engine on
fakes over a real database (SQLite and PostgreSQL, whose `hosts` table both have) with two
registered hosts, h1 (this agent) and h2. VMs carry their host's name; another host's VM is
shown from its row alone; `?host=` selects a host's VMs; recovery, forwards, metrics and the CNI
reap see this host's VMs only; `vm list` has a HOST column only in a cluster."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.cli.remote import VM_COLUMNS, vm_table
from roost.cli.views import vm_human
from roost.spec import Manifest, VMConfig
from roost.state import forwards
from roost.state.hosts import Hosts
from roost.state.models import VM
from roost.state.vms import VMQuery, VMRecords
from tests.engine_fakes import World
from tests.records import host_registration


def place(world: World, host_id: int, *vms: str) -> None:
    """Put VMs on a host, as placement records them."""
    placed = update(VM).where(VM.name.in_(vms)).values(host_id=host_id)
    world.db.transact_core(lambda connection: connection.execute(placed))


class Cluster:
    """The world's engine as host h1's, with VMs a and b (a running) on h1 and c (running,
    as h2 recorded it) on h2."""

    def __init__(self, world: World) -> None:
        self.world = world
        hosts = Hosts(world.db)
        self.h1 = hosts.register(host_registration("h1", "10.251.0.1")).host_id
        self.h2 = hosts.register(host_registration("h2", "10.251.0.2")).host_id
        engine = world.engine
        engine.create_vm("a", VMConfig(plugin="p"))
        engine.create_vm("b", VMConfig(plugin="p"), start=False)
        engine.create_vm("c", VMConfig(plugin="p"), start=False)
        place(world, self.h1, "a", "b")
        place(world, self.h2, "c")
        engine.act_as_host(self.h1)
        VMRecords(world.db, self.h2).write("c", None, status="running", pid=4242)  # as h2 would


@pytest.fixture
def world(tmp_short: Path, migrated_database_url: str) -> Iterator[World]:
    instance = World(tmp_short, database_url=migrated_database_url)
    yield instance
    instance.close()


@pytest.fixture
def cluster(world: World) -> Cluster:
    return Cluster(world)


class Api:
    def __init__(self, world: World) -> None:
        endpoints = [Endpoint.parse("unix:///run/roost.sock")]
        self.runner = asyncio.Runner()
        self.transport = httpx.ASGITransport(app=create_app(world.engine, endpoints))

    def get(self, url: str) -> httpx.Response:
        async def call() -> httpx.Response:
            async with httpx.AsyncClient(
                transport=self.transport, base_url="http://roost"
            ) as client:
                return await client.get(url)

        return self.runner.run(call())

    def names(self, url: str) -> list[str]:
        response = self.get(url)
        assert response.status_code == 200, response.text
        return [vm["name"] for vm in response.json()]

    def close(self) -> None:
        self.runner.close()


@pytest.fixture
def api(world: World) -> Iterator[Api]:
    instance = Api(world)
    yield instance
    instance.close()


def by_name(views: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {view["name"]: view for view in views}


# ---- the VM's JSON --------------------------------------------------------------------------


def test_a_single_hosts_vms_have_a_null_host(world: World) -> None:
    made = world.engine.create_vm("a", VMConfig(plugin="p"), start=False)
    assert made["host"] is None
    assert [vm["host"] for vm in world.engine.list_vms()] == [None]
    assert json.loads(world.engine.list_vms_encoded()[0][1])["host"] is None


def test_every_vm_shows_its_hosts_name_in_show_list_and_the_kept_listing(
    cluster: Cluster,
) -> None:
    engine = cluster.world.engine
    listed = by_name(engine.list_vms())
    assert {name: vm["host"] for name, vm in listed.items()} == {"a": "h1", "b": "h1", "c": "h2"}
    encoded = by_name([json.loads(view) for _, view in engine.list_vms_encoded()])
    assert encoded == listed
    assert engine.show_vm("c") == listed["c"]


def test_another_hosts_vm_shows_its_stored_pid_and_none_of_its_hosts_paths(
    cluster: Cluster,
) -> None:
    engine = cluster.world.engine
    listed = by_name(engine.list_vms())
    own, other = listed["a"], listed["c"]
    assert own["vmm"]["pid"] is not None and own["vmm"]["api_socket"] is not None
    assert own["console_log"] is not None
    assert other["status"] == "running"
    assert other["vmm"] == {"kind": "fake", "pid": 4242, "api_socket": None}
    assert other["console_log"] is None
    assert other["vsock"]["uds_path"] is None
    assert other["vsock"]["cid"] is not None  # its CID on its own host

    VMRecords(cluster.world.db, cluster.h2).write("c", None, status="stopped")
    assert engine.show_vm("c")["vmm"]["pid"] is None
    stopped = json.loads(dict(engine.list_vms_encoded())["c"])
    assert stopped["status"] == "stopped" and stopped["vmm"]["pid"] is None


def test_a_vm_of_an_offline_host_reads_unknown_in_a_kept_listing_and_back_again(
    cluster: Cluster,
) -> None:
    engine = cluster.world.engine

    def statuses() -> dict[str, str]:
        return {name: json.loads(view)["status"] for name, view in engine.list_vms_encoded()}

    assert statuses() == {"a": "running", "b": "created", "c": "running"}
    offline = frozenset({cluster.h2})
    engine.offline_hosts = lambda: offline
    assert statuses() == {"a": "running", "b": "created", "c": "unknown"}
    assert engine.show_vm("c")["status"] == "unknown"
    engine.offline_hosts = frozenset
    assert statuses() == {"a": "running", "b": "created", "c": "running"}


def test_a_status_filter_selects_vms_by_the_status_they_read_while_their_host_is_offline(
    cluster: Cluster, api: Api
) -> None:
    engine = cluster.world.engine
    engine.records.write("b", None, status="lost")  # lost stays lost, offline host or not
    place(cluster.world, cluster.h2, "b")
    assert api.names("/v1/vms?status=running") == ["a", "c"]
    assert api.names("/v1/vms?status=unknown") == []
    offline = frozenset({cluster.h2})
    engine.offline_hosts = lambda: offline
    assert api.names("/v1/vms?status=running") == ["a"]
    assert api.names("/v1/vms?status=running&fields=name") == ["a"]
    assert api.names("/v1/vms?status=unknown") == ["c"]
    assert api.names("/v1/vms?status=unknown&status=lost") == ["b", "c"]
    assert api.names("/v1/vms?status=unknown&host=h1") == []
    assert [vm["name"] for vm in engine.list_vms(VMQuery(unknown=True))] == ["c"]
    assert api.names("/v1/vms") == ["a", "b", "c"]


def test_unknown_is_a_status_a_filter_takes_and_any_other_word_is_422(api: Api) -> None:
    assert api.names("/v1/vms?status=unknown") == []
    response = api.get("/v1/vms?status=gone")
    assert response.status_code == 422
    assert "unknown" in response.json()["error"]["details"][0]["msg"]


# ---- ?host= ---------------------------------------------------------------------------------


def test_host_selects_that_hosts_vms_alone_and_with_the_other_filters_and_pages(
    cluster: Cluster, api: Api
) -> None:
    assert api.names("/v1/vms") == ["a", "b", "c"]
    assert api.names("/v1/vms?host=h1") == ["a", "b"]
    assert api.names("/v1/vms?host=h2") == ["c"]
    assert api.names("/v1/vms?host=h1&status=created") == ["b"]
    assert api.names("/v1/vms?host=h2&status=created") == []
    assert api.names("/v1/vms?host=h2&fields=name") == ["c"]
    assert api.names("/v1/vms?host=nosuchhost") == []
    first = api.get("/v1/vms?host=h1&limit=1")
    assert [vm["name"] for vm in first.json()] == ["a"]
    assert first.headers["link"] == '</v1/vms?host=h1&limit=1&after=a>; rel="next"'
    assert api.names("/v1/vms?host=h1&limit=1&after=a") == ["b"]


def test_a_host_that_is_no_name_or_given_twice_is_422_at_query_host(api: Api) -> None:
    for url in ("/v1/vms?host=Not_A_Name", "/v1/vms?host=h1&host=h2"):
        response = api.get(url)
        assert response.status_code == 422, response.text
        assert [d["loc"] for d in response.json()["error"]["details"]] == ["query.host"]


# ---- what the engine acts on ---------------------------------------------------------------


def test_recovery_sees_only_this_hosts_vms(cluster: Cluster) -> None:
    records = cluster.world.engine.records
    assert records.names() == {"a", "b"}
    assert records.elsewhere() == {"c"}
    assert [record.name for record in records.live()] == ["a"]
    assert records.live_taps() == {nic.tap for nic in records.live()[0].nics.values()}


def test_a_single_host_has_no_vm_elsewhere(world: World) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"), start=False)
    assert world.engine.records.names() == {"a"}
    assert world.engine.records.elsewhere() == set()


def test_a_restart_listens_again_on_the_forwards_of_this_hosts_vms_only(
    cluster: Cluster,
) -> None:
    db = cluster.world.db
    db.transact_core(lambda connection: forwards.add(connection, "a", "127.0.0.1:7001", 80))
    db.transact_core(lambda connection: forwards.add(connection, "c", "127.0.0.1:7002", 80))
    with db.read() as session:
        connection = session.connection()
        assert [f.vm for f in forwards.every(connection)] == ["a", "c"]
        assert [f.vm for f in forwards.every(connection, cluster.h1)] == ["a"]
        assert [f.vm for f in forwards.every(connection, cluster.h2)] == ["c"]


def test_the_cni_reap_leaves_another_hosts_vms_alone(cluster: Cluster) -> None:
    engine = cluster.world.engine
    seen: list[Collection[str]] = []
    engine.cni_attachments.reap = lambda in_use, hold: seen.append(in_use())  # type: ignore[method-assign]
    engine.reap_cni()
    assert seen == [{"a", "c"}]  # b is stopped here: its attachments are reaped


def test_metrics_count_this_hosts_vms(cluster: Cluster) -> None:
    counted: dict[str, float] = {}
    for family in cluster.world.engine.metrics.collect():
        if family.name == "roost_vms":
            for sample in family.samples:
                status = sample.labels["status"]
                counted[status] = counted.get(status, 0) + sample.value
    assert {status: n for status, n in counted.items() if n} == {"running": 1, "created": 1}


# ---- vm list's table ------------------------------------------------------------------------


def test_vm_lists_table_has_a_host_column_only_in_a_cluster(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = cluster.world.engine.list_vms()
    vm_table(listed)
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "HOST", *VM_COLUMNS[1:]]
    assert [row.split()[:3] for row in rows] == [
        ["a", "h1", "p"],
        ["b", "h1", "p"],
        ["c", "h2", "p"],
    ]
    vm_table([{**vm, "host": None} for vm in listed])
    header, *_ = capsys.readouterr().out.splitlines()
    assert header.split() == VM_COLUMNS


def test_vm_show_names_the_host_and_where_another_hosts_vm_has_its_socket(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = cluster.world.engine

    def fields(vm: dict[str, Any]) -> dict[str, str]:
        vm_human(vm)
        lines = capsys.readouterr().out.splitlines()
        return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines)

    other = engine.show_vm("c")
    shown = fields(other)
    assert shown["host"] == "h2"
    assert shown["vsock socket"] == "on host h2"
    assert (
        fields({**other, "vsock": {**other["vsock"], "reason": "no device"}})["vsock socket"]
        == "none: no device"
    )
    assert "host" not in fields({**engine.show_vm("a"), "host": None})


def test_artifact_gc_keeps_what_only_another_hosts_vm_refers_to(cluster: Cluster) -> None:
    world = cluster.world
    engine = world.engine
    kernel = engine.plugins.show("p")["artifacts"]["kernel"]["sha256"]
    engine.stop_vm("a", force=True)
    for name in ("a", "b"):  # this host's VMs gone: only c, on h2, runs the old kernel
        engine.destroy_vm(name)
    manifest = engine.plugins.show("p")["manifest"]
    newer = world.root / "vmlinux-2"
    newer.write_bytes(b"\x7fELF" + bytes(128))
    replaced = {**manifest, "kernel": {"path": str(newer)}}
    engine.plugins.install(Manifest.model_validate(replaced), force=True)
    engine.plugins.collect_garbage()
    assert engine.plugins.show("p")["artifacts"]["kernel"]["sha256"] != kernel
    assert world.store.has(kernel)
