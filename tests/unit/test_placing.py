"""Placement of a create in a cluster: what a VM needs of its host (resources from its plugin and
config, its VMM's binary, its external networks, its conflists, its vsock device), the create's
body (`host`, `host_labels` create-only and refused on a single host), and the create flow's
decisions: the next candidate after a host's refusal for want of room or a failure, never after
a contested address or name."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import func, update
from starlette.responses import JSONResponse, Response

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.api.peers import Forwarder, Peer
from roost.api.placing import (
    ClusterRouter,
    create_request,
    first_taker,
    forward_create,
    moves_on,
)
from roost.api.replies import error_response
from roost.engine.settings import ClusterSettings
from roost.errors import ConflictError, HostError, InvalidError, RoostError
from roost.plan.needs import need_of, uses_vsock
from roost.plan.network import DefaultNetwork
from roost.plan.placement import Candidate
from roost.plan.registry import NetworkKind, RegisteredNetwork
from roost.plan.vm import VMPlan, plan_vm
from roost.spec import Manifest, VMConfig, parse
from roost.state.hosts import HostRegistration, Hosts
from roost.state.models import VM, Host
from tests.engine_fakes import World
from tests.postgres import PostgresServer
from tests.records import host_registration

DEFAULT = DefaultNetwork.from_cidr("10.57.0.0/24")
REGISTRY = {
    "ext": RegisteredNetwork(
        "ext",
        NetworkKind.EXTERNAL,
        "br-ext",
        ipaddress.IPv4Network("192.168.50.0/24"),
        ipaddress.IPv4Address("192.168.50.1"),
        None,
    ),
    "dhcp": RegisteredNetwork("dhcp", NetworkKind.EXTERNAL, "brdhcp", None, None, None),
}


def plan(network: Any = None, interfaces: Any = None, **config: Any) -> VMPlan:
    manifest = parse(
        Manifest,
        {
            "name": "p",
            "version": "1",
            "initramfs": {"path": "i"},
            "resources": {"vcpus": 2, "memory_mib": 256},
        },
    )
    fields = {"plugin": "p", **config}
    if network is not None:
        fields["network"] = network
    if interfaces is not None:
        fields["interfaces"] = interfaces
    return plan_vm("v", manifest, parse(VMConfig, fields), DEFAULT, REGISTRY.get)


# ---- what a VM needs ------------------------------------------------------------------------


def test_a_vm_needs_its_plans_resources_and_its_vmms_binary() -> None:
    need = need_of(
        plan(resources={"memory_mib": 512}),
        "qemu",
        vsock=False,
        registered_cni=(),
        host="host2",
        labels={"zone": "a"},
    )
    assert (need.vcpus, need.memory_mib) == (2, 512)
    assert need.requires == {"vmms": ["qemu"]}
    assert (need.host, dict(need.labels)) == ("host2", {"zone": "a"})


def test_a_vm_needs_the_external_networks_its_interfaces_join_dhcp_among_them() -> None:
    interfaces = [{"mode": "dhcp"}, {"mode": "bridged", "network": "ext"}, {"mode": "bridged"}]
    need = need_of(plan(interfaces=interfaces), "firecracker", vsock=False, registered_cni=())
    assert need.requires["external_networks"] == ["dhcp", "ext"]


def test_a_cni_vm_needs_its_conflist_on_the_host_unless_a_registered_network_carries_it() -> None:
    cni = {"mode": "cni", "cni": {"network": "mynet"}}
    need = need_of(plan(network=cni), "firecracker", vsock=False, registered_cni=())
    assert need.requires["cni_networks"] == ["mynet"]
    registered = need_of(plan(network=cni), "firecracker", vsock=False, registered_cni={"mynet"})
    assert "cni_networks" not in registered.requires


def test_a_vm_reached_over_vsock_needs_its_vmms_vsock_device_where_that_is_one_kind() -> None:
    vsock_only = plan(network={"mode": "vsock"})
    assert uses_vsock(vsock_only, {})
    assert not uses_vsock(plan(), {})
    assert uses_vsock(plan(), {1024: "/run/svc.sock"})
    firecracker = need_of(vsock_only, "firecracker", vsock=True, registered_cni=())
    assert firecracker.requires["vsock"] == ["firecracker"]
    # QEMU gives roost's own vhost-user vsock wherever it runs: its binary is enough
    assert need_of(vsock_only, "qemu", vsock=True, registered_cni=()).requires == {"vmms": ["qemu"]}


# ---- the create's body ----------------------------------------------------------------------


def test_host_and_host_labels_are_create_only_and_kept_out_of_the_config() -> None:
    body = {"name": "web", "plugin": "p", "host": "host2", "host_labels": {"zone": "a"}}
    wanted = create_request(dict(body), cluster=True)
    assert (wanted.name, wanted.start, wanted.host) == ("web", True, "host2")
    assert dict(wanted.host_labels) == {"zone": "a"}
    assert "host" not in wanted.config.model_dump(exclude_none=True)
    assert json.loads(wanted.on("host3")) == {**body, "host": "host3"}


@pytest.mark.parametrize("field", ["host", "host_labels"])
def test_a_single_host_refuses_host_and_host_labels_saying_it_is_not_a_cluster(
    field: str,
) -> None:
    value: Any = "host2" if field == "host" else {"zone": "a"}
    with pytest.raises(InvalidError) as refused:
        create_request({"name": "web", "plugin": "p", field: value}, cluster=False)
    (detail,) = refused.value.details
    assert detail.loc == field and "not in a cluster" in detail.msg


def test_host_labels_must_be_labels() -> None:
    for labels in (["zone=a"], {"zone": 1}, {"-bad": "a"}):
        with pytest.raises(InvalidError):
            create_request({"name": "web", "plugin": "p", "host_labels": labels}, cluster=True)


# ---- the create flow ------------------------------------------------------------------------

HOSTS = [Candidate(index, f"host{index}", f"unix:///h{index}", []) for index in (1, 2, 3)]
CREATED = JSONResponse({"name": "web"}, status_code=201)


def refusal(code: str) -> Response:
    errors: dict[str, RoostError] = {
        "no_capacity": ConflictError("full", code="no_capacity"),
        "ip_taken": ConflictError("taken", code="ip_taken"),
        "exists": ConflictError("exists", code="exists"),
        "host_error": HostError("boot failed"),
        "fenced": RoostError("fenced", code="fenced"),
    }
    return error_response(errors[code])


def tried(answers: dict[str, Response]) -> tuple[Response, list[str]]:
    asked: list[str] = []

    async def attempt(candidate: Candidate) -> Response:
        asked.append(candidate.name)
        return answers.get(candidate.name, CREATED)

    return anyio.run(first_taker, HOSTS, attempt), asked


@pytest.mark.parametrize("code", ["no_capacity", "host_error", "fenced"])
def test_a_host_that_has_no_room_or_fails_moves_the_create_to_the_next(code: str) -> None:
    answer, asked = tried({"host1": refusal(code)})
    assert answer is CREATED and asked == ["host1", "host2"]


@pytest.mark.parametrize("code", ["ip_taken", "exists"])
def test_a_contested_address_or_name_loses_at_once_not_retried_elsewhere(code: str) -> None:
    answer, asked = tried({"host1": refusal(code)})
    assert answer.status_code == 409 and asked == ["host1"]
    assert json.loads(bytes(answer.body))["error"]["code"] == code


def test_when_every_host_refuses_the_last_refusal_is_the_answer() -> None:
    answer, asked = tried({host.name: refusal("no_capacity") for host in HOSTS})
    assert asked == ["host1", "host2", "host3"]
    assert answer.status_code == 409


def test_only_no_capacity_and_failures_move_on() -> None:
    assert moves_on(502, b"") and moves_on(503, b"{}")
    assert not moves_on(201, b"{}") and not moves_on(422, b"{}") and not moves_on(404, b"{}")
    assert not moves_on(409, b"not json")


def test_a_peer_that_cannot_be_reached_is_a_failure_that_moves_the_create_on(
    tmp_path: Path,
) -> None:
    peer = Peer("host2", f"unix://{tmp_path / 'gone.sock'}")
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/vms",
        "raw_path": b"/v1/vms",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
        "server": ("/run/roost.sock", None),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def forward() -> Response:
        forwarder = Forwarder("host1", None)
        try:
            return await forward_create(forwarder, peer, b'{"name": "web"}', scope, receive)
        finally:
            await forwarder.aclose()

    answer = anyio.run(forward)
    assert answer.status_code == 502
    assert "host2" in json.loads(bytes(answer.body))["error"]["message"]
    assert moves_on(answer.status_code, bytes(answer.body))


# ---- the router -----------------------------------------------------------------------------


@pytest.fixture
def world(tmp_short: Path, postgres: PostgresServer) -> Iterator[World]:
    instance = World(tmp_short, database_url=postgres.database(migrated=True))
    yield instance
    instance.close()


def test_the_router_sends_a_vms_requests_to_its_host_read_at_each_request(world: World) -> None:
    hosts = Hosts(world.db)
    h1 = hosts.register(host_registration("h1", "10.251.0.1")).host_id
    h2 = hosts.register(host_registration("h2", "10.251.0.2")).host_id
    for name, host in (("a", h1), ("b", h2)):
        world.engine.create_vm(name, VMConfig(plugin="p"), start=False)
        placed = update(VM).where(VM.name == name).values(host_id=host)
        world.db.transact_core(lambda connection, placed=placed: connection.execute(placed))
    cluster = ClusterSettings("h1", "10.251.0.1", "unix:///run/roost-h1.sock", {}, 8, 4096)
    router = ClusterRouter(hosts, cluster, h1)

    def route(method: str, path: str) -> Peer | None:
        return router.route({"type": "http", "method": method, "path": path, "headers": []})

    assert route("POST", "/v1/vms/a/stop") is None  # this host's
    assert route("DELETE", "/v1/vms/nothing") is None  # answered here: 404
    assert route("GET", "/v1/vms/b") is None  # a read, from the database
    assert route("POST", "/v1/vms/b/stop") == Peer("h2", "unix:///run/roost-h2.sock")
    late = update(Host).where(Host.id == h2).values(heartbeat_at=func.now() - timedelta(minutes=1))
    world.db.transact_core(lambda connection: connection.execute(late))
    assert route("DELETE", "/v1/vms/b") == Peer("h2", "unix:///run/roost-h2.sock", offline=True)
    moved = update(VM).where(VM.name == "b").values(host_id=h1)
    world.db.transact_core(lambda connection: connection.execute(moved))
    assert route("POST", "/v1/vms/b/start") is None  # nothing of the old answer kept


def test_a_single_hosts_api_refuses_host_and_host_labels_and_creates_nothing(
    tmp_short: Path,
) -> None:
    world = World(tmp_short)
    transport = httpx.ASGITransport(
        app=create_app(world.engine, [Endpoint.parse("unix:///run/roost.sock")])
    )

    async def create(body: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://roost") as client:
            return await client.post("/v1/vms", json=body)

    try:
        for extra in ({"host": "host2"}, {"host_labels": {"zone": "a"}}):
            answer = asyncio.run(create({"name": "web", "plugin": "p", "start": False, **extra}))
            assert answer.status_code == 422
            (detail,) = answer.json()["error"]["details"]
            assert detail["loc"] == next(iter(extra)) and "not in a cluster" in detail["msg"]
        assert world.engine.list_vm_names() == []
        created = asyncio.run(create({"name": "web", "plugin": "p", "start": False}))
        assert created.status_code == 201, created.text
        assert created.json()["host"] is None
    finally:
        world.close()


def test_a_create_sent_with_x_roost_forwarded_by_a_client_is_still_held_to_placement(
    world: World,
) -> None:
    """The header says a peer placed the create here, but any client can send it: the host
    that takes it still checks that placement would take it (labels, what it has, room).
    (Forwarded creates that fit are made by the three-agent tests.)"""
    hosts = Hosts(world.db)
    h1 = hosts.register(host_registration("h1", "10.251.0.1")).host_id
    with_facts = {"vmms": ["fake"]}
    hosts.register(
        HostRegistration(
            "h2", "10.251.0.2", "unix:///gone.sock", {"zone": "b"}, 8, 4096, with_facts
        )
    )
    world.db.transact_core(
        lambda connection: connection.execute(
            update(Host).where(Host.id == h1).values(facts=with_facts)
        )
    )
    world.engine.act_as_host(h1)
    cluster = ClusterSettings("h1", "10.251.0.1", "unix:///run/roost-h1.sock", {}, 8, 4096)
    app = create_app(
        world.engine,
        [Endpoint.parse("unix:///run/roost.sock")],
        router=ClusterRouter(hosts, cluster, h1),
    )
    transport = httpx.ASGITransport(app=app)

    async def create(body: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://roost") as client:
            return await client.post("/v1/vms", json=body, headers={"X-Roost-Forwarded": "someone"})

    body = {"plugin": "p", "start": False}
    labelled = asyncio.run(create({"name": "a", "host_labels": {"zone": "b"}, **body}))
    assert labelled.status_code == 409, labelled.text
    assert labelled.json()["error"]["code"] == "no_eligible_host"
    big = asyncio.run(create({"name": "b", "resources": {"vcpus": 9}, **body}))
    assert big.status_code == 409 and big.json()["error"]["code"] == "no_capacity", big.text
    assert world.engine.list_vm_names() == []
