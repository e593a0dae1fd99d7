"""`/v1/policies` of an app over an engine on fakes (a fake policy firewall that plans each
transaction for real): the status codes, the error codes and locs, and the per-rule counters
in `GET /v1/policies/{name}` and in `/metrics`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.host.policy import Count
from roost.spec.policy import Direction
from tests.engine_fakes import FakePolicyFirewall, World

WEB_IN = {
    "ingress": [{"action": "allow", "protocol": "tcp", "destination_port": "80"}],
    "egress": [{"action": "drop", "destination": ["203.0.113.0/24"]}],
}


class Api:
    def __init__(self, world: World) -> None:
        endpoints = [Endpoint.parse("unix:///run/roost.sock")]
        self.runner = asyncio.Runner()
        self.transport = httpx.ASGITransport(app=create_app(world.engine, endpoints))

    def call(self, method: str, url: str, body: Any = None) -> httpx.Response:
        async def call() -> httpx.Response:
            async with httpx.AsyncClient(
                transport=self.transport, base_url="http://roost"
            ) as client:
                return await client.request(method, url, json=body)

        return self.runner.run(call())

    def close(self) -> None:
        self.runner.close()


@pytest.fixture
def firewall(world: World) -> FakePolicyFirewall:
    fake = FakePolicyFirewall()
    world.engine.policies.firewall = fake
    return fake


@pytest.fixture
def api(world: World, firewall: FakePolicyFirewall) -> Iterator[Api]:
    instance = Api(world)
    yield instance
    instance.close()


def error_of(response: httpx.Response) -> tuple[int, str, list[str]]:
    error = response.json()["error"]
    return response.status_code, error["code"], [d["loc"] for d in error["details"]]


def test_post_creates_and_a_second_post_is_409_exists(api: Api) -> None:
    created = api.call("POST", "/v1/policies", {"name": "web-in", **WEB_IN})
    assert created.status_code == 201
    assert created.json()["name"] == "web-in"
    again = api.call("POST", "/v1/policies", {"name": "web-in", **WEB_IN})
    assert error_of(again)[:2] == (409, "exists")
    listed = api.call("GET", "/v1/policies").json()
    assert [(p["name"], p["used_by"]) for p in listed] == [("web-in", [])]


def test_put_answers_201_when_it_creates_and_200_when_it_replaces(
    api: Api, firewall: FakePolicyFirewall
) -> None:
    assert api.call("PUT", "/v1/policies/web-in", WEB_IN).status_code == 201
    replaced = api.call("PUT", "/v1/policies/web-in", {**WEB_IN, "egress": []})
    assert (replaced.status_code, replaced.json()["egress"]) == (200, [])
    assert firewall.policies["web-in"].egress == []


def test_a_body_naming_another_policy_than_the_url_is_422_at_name(api: Api) -> None:
    response = api.call("PUT", "/v1/policies/web-in", {"name": "other", **WEB_IN})
    assert error_of(response) == (422, "invalid", ["name"])


def test_a_broken_rule_and_an_unknown_network_are_422_at_their_locs(api: Api) -> None:
    port_without_protocol = {"action": "allow", "destination_port": "80"}
    response = api.call("PUT", "/v1/policies/p", {"ingress": [port_without_protocol]})
    assert error_of(response) == (422, "invalid", ["ingress.0.destination_port"])
    unknown = {"action": "drop", "destination": ["@nowhere"]}
    response = api.call("PUT", "/v1/policies/p", {"egress": [unknown]})
    assert error_of(response) == (422, "invalid", ["egress.0.destination.0"])
    assert api.call("GET", "/v1/policies").json() == []


def test_show_has_counters_on_each_rule_and_metrics_count_them(
    api: Api, firewall: FakePolicyFirewall
) -> None:
    api.call("PUT", "/v1/policies/web-in", WEB_IN)
    firewall.counts[("web-in", Direction.EGRESS, 0)] = Count(3, 180)
    shown = api.call("GET", "/v1/policies/web-in").json()
    assert shown["ingress"][0]["counters"] == {"packets": 0, "bytes": 0}
    assert shown["egress"][0]["counters"] == {"packets": 3, "bytes": 180}
    assert shown["used_by"] == []
    families = text_string_to_metric_families(api.call("GET", "/metrics").text)
    samples = {
        (s.name, s.labels["direction"], s.labels["rule"]): s.value
        for family in families
        for s in family.samples
        if s.name.startswith("roost_policy_rule_") and s.labels["policy"] == "web-in"
    }
    assert samples == {
        ("roost_policy_rule_packets_total", "egress", "0"): 3,
        ("roost_policy_rule_bytes_total", "egress", "0"): 180,
    }


def test_delete_answers_204_then_404(api: Api, firewall: FakePolicyFirewall) -> None:
    api.call("PUT", "/v1/policies/web-in", WEB_IN)
    assert api.call("DELETE", "/v1/policies/web-in").status_code == 204
    assert firewall.policies == {}
    assert error_of(api.call("DELETE", "/v1/policies/web-in"))[:2] == (404, "not_found")
    assert error_of(api.call("GET", "/v1/policies/web-in"))[:2] == (404, "not_found")


def test_a_policy_name_in_the_url_is_judged(api: Api) -> None:
    assert error_of(api.call("GET", "/v1/policies/Not_A_Name")) == (422, "invalid", ["name"])
