"""`GET /v1/vms` of an app over an engine on fakes and a real database, SQLite and PostgreSQL:
VM labels, the filters (plugin, status, label, mode) and pages (`limit`, `after`, the `Link` to
the next one), checked against what each VM was made with."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.cli.client import next_link
from roost.spec import Manifest, VMConfig, VMConfigPatch
from tests.engine_fakes import DHCP_BRIDGE, World

MODES: dict[str, dict[str, Any]] = {
    "bridged": {},
    "vsock": {"network": {"mode": "vsock"}},
    "dhcp": {"network": {"mode": "dhcp"}},
    "bridged+dhcp": {"interfaces": [{"mode": "bridged"}, {"mode": "dhcp", "name": "wan"}]},
}


class Api:
    def __init__(self, world: World) -> None:
        endpoints = [Endpoint.parse("unix:///run/roost.sock")]
        self.runner = asyncio.Runner()
        self.transport = httpx.ASGITransport(app=create_app(world.engine, endpoints))

    def get(self, url: str, **params: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            async with httpx.AsyncClient(
                transport=self.transport, base_url="http://roost"
            ) as client:
                return await client.get(url, params=params or None)

        return self.runner.run(call())

    def names(self, url: str, **params: Any) -> list[str]:
        response = self.get(url, **params)
        assert response.status_code == 200, response.text
        return [vm["name"] for vm in response.json()]

    def close(self) -> None:
        self.runner.close()


@pytest.fixture
def dhcp_world(tmp_short: Path, migrated_database_url: str) -> Iterator[World]:
    """The world with plugins `p` and `q` (bridged on the default network) and an operator's
    bridge for dhcp VMs."""
    instance = World(tmp_short, dhcp_bridge=DHCP_BRIDGE, database_url=migrated_database_url)
    manifest = instance.engine.plugins.show("p")["manifest"]
    instance.engine.plugins.install(Manifest.model_validate({**manifest, "name": "q"}), force=False)
    yield instance
    instance.close()


@pytest.fixture
def api(dhcp_world: World) -> Iterator[Api]:
    instance = Api(dhcp_world)
    yield instance
    instance.close()


@dataclass(frozen=True)
class Made:
    """What a test made a VM with, which the listing must agree with."""

    plugin: str
    mode: str
    status: str
    labels: tuple[tuple[str, str], ...]

    def config(self) -> VMConfig:
        return VMConfig.model_validate(
            {"plugin": self.plugin, "labels": dict(self.labels), **MODES[self.mode]}
        )

    def modes(self) -> set[str]:
        return set() if self.mode == "vsock" else set(self.mode.split("+"))


def make(world: World, name: str, made: Made) -> None:
    world.engine.create_vm(name, made.config(), start=False)
    if made.status != "created":
        world.engine.records.write(name, None, status=made.status)


def selects(made: Made, query: dict[str, Any]) -> bool:
    """Whether `query` (the parameters of a `GET /v1/vms`) selects a VM made as `made`."""
    labels = dict(made.labels)
    mode = query.get("mode")
    return (
        query.get("plugin") in (None, made.plugin)
        and (not query.get("status") or made.status in query["status"])
        and all(labels.get(k) == v for k, _, v in (s.partition("=") for s in query["label"]))
        and (mode is None or (mode in made.modes() if mode != "vsock" else not made.modes()))
    )


# ---- labels ---------------------------------------------------------------------------------


def test_a_vms_labels_are_in_its_json_and_an_empty_object_when_it_has_none(
    dhcp_world: World,
) -> None:
    engine = dhcp_world.engine
    labelled = engine.create_vm(
        "a", VMConfig.model_validate({"plugin": "p", "labels": {"tier": "web", "a/b": ""}})
    )
    plain = engine.create_vm("b", VMConfig.model_validate({"plugin": "p"}), start=False)
    assert labelled["labels"] == {"a/b": "", "tier": "web"}
    assert plain["labels"] == {}
    assert [vm["labels"] for vm in engine.list_vms()] == [{"a/b": "", "tier": "web"}, {}]


def test_a_labels_only_patch_of_a_running_vm_needs_no_restart_and_selects_it_at_once(
    dhcp_world: World, api: Api
) -> None:
    engine = dhcp_world.engine
    engine.create_vm("a", VMConfig.model_validate({"plugin": "p", "labels": {"tier": "web"}}))
    engine.patch_config("a", VMConfigPatch.model_validate({"labels": {"tier": "db"}}))
    vm = engine.show_vm("a")
    assert (vm["status"], vm["restart_required"], vm["running_version"]) == ("running", False, 1)
    assert vm["labels"] == {"tier": "db"}
    assert api.names("/v1/vms", label="tier=db") == ["a"]
    assert api.names("/v1/vms", label="tier=web") == []
    history = engine.config_history("a")
    assert [version["config"]["labels"] for version in history] == [
        {"tier": "db"},
        {"tier": "web"},
    ]
    # its status changes keep showing its latest labels
    assert engine.pause_vm("a")["labels"] == {"tier": "db"}


# ---- filters --------------------------------------------------------------------------------


def test_each_filter_selects_exactly_the_vms_it_names(dhcp_world: World, api: Api) -> None:
    made = {
        "a": Made("p", "bridged", "created", (("tier", "web"),)),
        "b": Made("q", "vsock", "stopped", (("team", "x"), ("tier", "web"))),
        "c": Made("p", "dhcp", "crashed", (("tier", "db"),)),
        "d": Made("q", "bridged+dhcp", "created", ()),
    }
    for name, how in made.items():
        make(dhcp_world, name, how)
    assert api.names("/v1/vms") == ["a", "b", "c", "d"]
    assert api.names("/v1/vms", plugin="q") == ["b", "d"]
    assert api.names("/v1/vms", status=["stopped", "crashed"]) == ["b", "c"]
    assert api.names("/v1/vms", label="tier=web") == ["a", "b"]
    assert api.names("/v1/vms", label=["tier=web", "team=x"]) == ["b"]
    assert api.names("/v1/vms", mode="bridged") == ["a", "d"]
    assert api.names("/v1/vms", mode="dhcp") == ["c", "d"]
    assert api.names("/v1/vms", mode="vsock") == ["b"]
    assert api.names("/v1/vms", mode="cni") == []
    assert api.names("/v1/vms", plugin="p", mode="dhcp", status="crashed") == ["c"]
    assert api.names("/v1/vms", plugin="nothing") == []


BAD_QUERIES = [
    ("status=sleeping", "query.status"),
    ("status=running&status=Running", "query.status"),
    ("mode=tcp", "query.mode"),
    ("label=tier", "query.label"),
    ("label=-bad=x", "query.label"),
    ("limit=0", "query.limit"),
    ("limit=10001", "query.limit"),
    ("limit=ten", "query.limit"),
    ("after=Not_A_Name", "query.after"),
    ("plugin=p&plugin=q", "query.plugin"),
    ("limit=1&limit=2", "query.limit"),
]


def test_a_filter_or_bound_that_means_nothing_is_422_at_its_parameter(api: Api) -> None:
    for query, loc in BAD_QUERIES:
        response = api.get(f"/v1/vms?{query}")
        assert response.status_code == 422, query
        error = response.json()["error"]
        assert error["code"] == "invalid"
        assert [detail["loc"] for detail in error["details"]] == [loc], query


# ---- pages ----------------------------------------------------------------------------------


def test_a_page_with_more_after_it_links_to_the_next_with_the_same_filters(
    dhcp_world: World, api: Api
) -> None:
    for name in ("a", "b", "c"):
        make(dhcp_world, name, Made("p", "bridged", "created", (("tier", "web"),)))
    first = api.get("/v1/vms?label=tier%3Dweb&limit=2&mode=bridged")
    assert [vm["name"] for vm in first.json()] == ["a", "b"]
    link = next_link(first.headers["link"])
    assert first.headers["link"].endswith('>; rel="next"')
    assert link is not None and urlsplit(link).path == "/v1/vms"
    assert parse_qsl(urlsplit(link).query) == [
        ("label", "tier=web"),
        ("limit", "2"),
        ("mode", "bridged"),
        ("after", "b"),
    ]
    last = api.get(link)
    assert [vm["name"] for vm in last.json()] == ["c"]
    assert "link" not in last.headers
    # a page that ends exactly at the last VM has no next one
    assert "link" not in api.get("/v1/vms?limit=3").headers
    assert "link" not in api.get("/v1/vms").headers


NAMES = [f"vm-{index:02}" for index in range(16)]
MADE = st.builds(
    Made,
    plugin=st.sampled_from(["p", "q"]),
    mode=st.sampled_from(sorted(MODES)),
    status=st.sampled_from(["created", "stopped", "crashed"]),
    labels=st.lists(
        st.sampled_from([("tier", "web"), ("tier", "db"), ("team", "x")]),
        unique_by=lambda label: label[0],
        max_size=2,
    ).map(lambda labels: tuple(sorted(labels))),
)
QUERIES = st.fixed_dictionaries(
    {
        "plugin": st.sampled_from([None, "p", "q"]),
        "status": st.lists(st.sampled_from(["created", "stopped", "crashed"]), max_size=2),
        "label": st.lists(st.sampled_from(["tier=web", "tier=db", "team=x"]), max_size=2),
        "mode": st.sampled_from([None, "vsock", "bridged", "dhcp", "cni"]),
    }
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    vms=st.dictionaries(st.sampled_from(NAMES), MADE, max_size=len(NAMES)),
    query=QUERIES,
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=8),
)
def test_any_sequence_of_pages_concatenates_to_the_whole_filtered_list_in_name_order(
    dhcp_world: World, api: Api, vms: dict[str, Made], query: dict[str, Any], sizes: list[int]
) -> None:
    engine = dhcp_world.engine
    existing = {vm["name"] for vm in engine.list_vms()}
    for name in sorted(existing):  # each example starts from the VMs the last one left
        engine.destroy_vm(name)
    for name, made in vms.items():
        make(dhcp_world, name, made)
    filters = {key: value for key, value in query.items() if value}
    expected = sorted(name for name, made in vms.items() if selects(made, query))
    assert api.names("/v1/vms", **filters) == expected

    # pages of changing sizes, each after the last name seen
    seen: list[str] = []
    for step in range(len(expected) + 1):
        after = {"after": seen[-1]} if seen else {}
        page = api.get("/v1/vms", **filters, **after, limit=sizes[step % len(sizes)])
        seen += [vm["name"] for vm in page.json()]
        if "link" not in page.headers:
            break
    assert seen == expected

    # the Link of each page, followed as it is
    followed: list[str] = []
    url: str | None = "/v1/vms"
    params: dict[str, Any] = {**filters, "limit": sizes[0]}
    while url is not None:
        page = api.get(url, **params)
        followed += [vm["name"] for vm in page.json()]
        url, params = next_link(page.headers.get("link", "")), {}
    assert followed == expected


def test_mode_selects_by_the_interfaces_a_vm_has_now_as_patches_and_restarts_change_them(
    dhcp_world: World, api: Api
) -> None:
    engine = dhcp_world.engine
    engine.create_vm("idle", VMConfig.model_validate({"plugin": "p"}), start=False)
    engine.create_vm("busy", VMConfig.model_validate({"plugin": "p"}))
    to_dhcp = VMConfigPatch.model_validate({"network": {"mode": "dhcp"}})
    engine.patch_config("idle", to_dhcp)  # no VMM: what it has now at once
    engine.patch_config("busy", to_dhcp)  # its VMM runs the bridged version until a restart
    assert api.names("/v1/vms", mode="dhcp") == ["idle"]
    assert api.names("/v1/vms", mode="bridged") == ["busy"]
    engine.restart_vm("busy")
    assert api.names("/v1/vms", mode="dhcp") == ["busy", "idle"]
    engine.patch_config("idle", VMConfigPatch.model_validate({"network": {"mode": "vsock"}}))
    assert api.names("/v1/vms", mode="vsock") == ["idle"]
    assert [i["mode"] for i in engine.show_vm("busy")["interfaces"]] == ["dhcp"]
