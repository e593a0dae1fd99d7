"""`GET /metrics` of an app over an engine on fakes, parsed with prometheus_client's own text
parser: every name is roost's, VMs by status, mode and VMM, leases and sizes of networks,
operation durations, VMM exits, API requests by route template; open like `/healthz`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.engine.settings import Settings
from roost.spec import NetworkMode, VMConfig
from roost.state.vms import VMStatus
from tests.engine_fakes import World
from tests.harness import wait_for

TOKEN = "s3cret-token"
UNIX_URL = "http://roost"  # no port: a Unix socket, as uvicorn reports it
TCP_URL = "http://127.0.0.1:8000"
NETWORK = "net-10-66-0-0-24"  # the network of the fakes' plugin `p`


class Api:
    def __init__(self, world: World) -> None:
        world.engine.settings = Settings(token=TOKEN)
        endpoints = [
            Endpoint.parse("unix:///run/roost.sock"),
            Endpoint.parse("tcp://127.0.0.1:8000"),
        ]
        self.runner = asyncio.Runner()
        self.transport = httpx.ASGITransport(app=create_app(world.engine, endpoints))

    def get(self, url: str, base_url: str = UNIX_URL, **headers: str) -> httpx.Response:
        """GET `url`; `headers` by their names with "_" for "-"."""

        async def get() -> httpx.Response:
            async with httpx.AsyncClient(transport=self.transport, base_url=base_url) as client:
                named = {name.replace("_", "-"): value for name, value in headers.items()}
                return await client.get(url, headers=named)

        return self.runner.run(get())

    def scrape(self) -> list[Sample]:
        response = self.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        families = text_string_to_metric_families(response.text)
        return [sample for family in families for sample in family.samples]

    def close(self) -> None:
        self.runner.close()


@pytest.fixture
def api(world: World) -> Iterator[Api]:
    instance = Api(world)
    yield instance
    instance.close()


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def labels_of(samples: list[Sample], name: str) -> set[frozenset[str]]:
    return {frozenset(s.labels) - {"le"} for s in samples if s.name.startswith(name)}


def test_every_metric_is_roost_s_with_the_labels_it_documents(api: Api, world: World) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"))
    api.get("/v1/vms")
    samples = api.scrape()
    assert all(sample.name.startswith("roost_") for sample in samples)
    expected: dict[str, set[str]] = {
        "roost_vms": {"status", "mode", "vmm"},
        "roost_network_leases": {"network"},
        "roost_network_size": {"network"},
        "roost_vm_operation_duration_seconds": {"operation"},
        "roost_vmm_exits": {"vmm", "outcome"},
        "roost_api_requests": {"method", "route", "status"},
    }
    for name, labels in expected.items():
        assert labels_of(samples, name) == {frozenset(labels)}, name


def test_vms_are_counted_by_status_mode_and_vmm_with_every_status_there(
    api: Api, world: World
) -> None:
    world.engine.create_vm("a", VMConfig(plugin="p"))
    world.engine.create_vm("b", VMConfig(plugin="p"), start=False)
    world.engine.create_vm("c", VMConfig(plugin="p"), start=False)
    samples = api.scrape()
    vms = {
        (s.labels["status"], s.labels["mode"]): s.value
        for s in samples
        if s.name == "roost_vms" and s.labels["vmm"] == "fake"
    }
    assert vms[("running", "bridged")] == 1
    assert vms[("created", "bridged")] == 2
    assert sum(vms.values()) == 3
    # every status of every mode (vsock, bridged, dhcp, cni) and multi, at zero when no VM has it
    assert len(vms) == len(VMStatus) * (len(NetworkMode) + 1)
    assert {mode for _, mode in vms} == {*NetworkMode, "multi"}
    assert value(samples, "roost_network_leases", network=NETWORK) == 3
    assert value(samples, "roost_network_size", network=NETWORK) == 253  # a /24 but 3


def test_durations_and_exits_are_observed_as_the_engine_works(api: Api, world: World) -> None:
    engine = world.engine
    engine.create_vm("a", VMConfig(plugin="p"))
    engine.create_vm("b", VMConfig(plugin="p"), start=False)
    engine.stop_vm("a", timeout=0, force=True)
    engine.stop_vm("a")  # already stopped: no VMM stopped, nothing observed
    engine.start_vm("b")
    world.driver.started[-1].child.kill()
    wait_for(lambda: engine.show_vm("b")["status"] == "crashed", what="the crash")
    samples = api.scrape()
    counts = {
        operation: value(samples, "roost_vm_operation_duration_seconds_count", operation=operation)
        for operation in ("create", "start", "stop")
    }
    assert counts == {"create": 2, "start": 1, "stop": 1}
    assert value(samples, "roost_vm_operation_duration_seconds_sum", operation="create") > 0
    bucket = "roost_vm_operation_duration_seconds_bucket"
    assert value(samples, bucket, operation="stop", le="+Inf") == 1
    exits = {s.labels["outcome"]: s.value for s in samples if s.name == "roost_vmm_exits_total"}
    assert exits == {"stopped": 1, "crashed": 1}


def test_api_requests_are_counted_by_route_template_and_status(api: Api) -> None:
    api.get("/v1/vms/nope")
    api.get("/v1/vms/also-nope")
    api.get("/nowhere")
    api.get("/v1/vms", base_url=TCP_URL)  # refused before routing: no token
    samples = api.scrape()

    def requests(route: str, status: str) -> float:
        return value(samples, "roost_api_requests_total", method="GET", route=route, status=status)

    assert requests("/v1/vms/{name}", "404") == 2
    assert requests("unmatched", "404") == 1
    assert requests("/v1/vms", "401") == 1
    assert not [s for s in samples if "nope" in str(s.labels)]


@pytest.mark.parametrize(
    ("host", "status"), [("127.0.0.1:8000", 200), ("localhost", 200), ("evil.example", 421)]
)
def test_metrics_are_open_on_tcp_like_healthz_but_the_host_must_be_the_daemon_s(
    api: Api, host: str, status: int
) -> None:
    assert api.get("/metrics", base_url=TCP_URL, host=host).status_code == status
    assert api.get("/v1/vms", base_url=TCP_URL, host=host).status_code in (401, 421)


def test_each_app_has_a_registry_of_its_own(world: World) -> None:
    first, second = Api(world), Api(world)
    try:
        first.get("/v1/vms")
        samples: list[Any] = second.scrape()
    finally:
        first.close()
        second.close()
    assert not [s for s in samples if s.labels.get("route") == "/v1/vms"]


def test_the_state_is_read_off_the_event_loop(api: Api, world: World) -> None:
    threads: set[str] = set()
    collect = world.engine.metrics._state

    def state() -> Any:
        threads.add(threading.current_thread().name)
        return collect()

    world.engine.metrics._state = state  # type: ignore[method-assign]
    api.scrape()
    assert threads and "MainThread" not in threads


def test_a_scraper_that_asks_for_openmetrics_gets_it(api: Api) -> None:
    response = api.get("/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
