"""`GET /v1/vms` answers from each VM's JSON as last listed (`roost.engine.views.ListedViews`):
the bytes are exactly those of the VMs' views encoded as a whole, for VMs of every mode,
several interfaces, cni, labels and statuses, and no kept JSON outlives a change to its VM.
`?fields=name` lists names alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.responses import JSONResponse

from roost.engine.views import ListedViews
from roost.spec import VMConfig, VMConfigPatch
from roost.state.vms import VMQuery
from tests.engine_fakes import DHCP_BRIDGE, World
from tests.unit.test_cni_engine import CNI_CONFIG, EngineWorld
from tests.unit.test_vm_list import MODES, Api

CONFIGS: dict[str, dict[str, Any]] = {
    **{f"m-{mode.replace('+', '-')}": {"plugin": "p", **extra} for mode, extra in MODES.items()},
    "labelled": {"plugin": "p", "labels": {"tier": "web", "a/b": ""}},
    "two-bridged": {
        "plugin": "p",
        "interfaces": [
            {"mode": "bridged"},
            {"mode": "bridged", "name": "eth1", "subnet": "10.77.0.0/24", "auto_assign": True},
        ],
    },
    "sized": {"plugin": "p", "resources": {"vcpus": 2, "memory_mib": 256}},
    "cni": {"plugin": "p", "network": CNI_CONFIG},
}


@pytest.fixture
def world(tmp_short: Path, migrated_database_url: str) -> Iterator[World]:
    """On SQLite and on PostgreSQL (whose driver decodes the JSON columns itself)."""
    instance = World(tmp_short, dhcp_bridge=DHCP_BRIDGE, database_url=migrated_database_url)
    EngineWorld(instance)  # cni interfaces attach with its fakes
    yield instance
    instance.close()


@pytest.fixture
def api(world: World) -> Iterator[Api]:
    instance = Api(world)
    yield instance
    instance.close()


def whole(world: World) -> bytes:
    """What `GET /v1/vms` answered before its views were kept: every view made anew and the
    list encoded as one JSON response."""
    return bytes(JSONResponse(world.engine.list_vms()).body)


def listed(api: Api, **params: Any) -> bytes:
    response = api.get("/v1/vms", **params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.content


def make_all(world: World) -> None:
    engine = world.engine
    for index, (name, config) in enumerate(CONFIGS.items()):
        engine.create_vm(name, VMConfig.model_validate(config), start=index % 2 == 0)
    engine.records.write("m-vsock", None, status="crashed", status_reason="it fell over")
    engine.pause_vm("m-bridged")


def test_a_listing_is_byte_for_byte_the_views_encoded_as_a_whole_and_stays_so(
    world: World, api: Api
) -> None:
    make_all(world)
    expected = whole(world)
    assert listed(api) == expected
    assert listed(api) == expected  # from the kept JSON this time
    names = [vm["name"] for vm in world.engine.list_vms()]
    assert len(names) == len(CONFIGS)
    page = api.get("/v1/vms", limit=3)
    assert page.content == bytes(JSONResponse(world.engine.list_vms()[:3]).body)
    assert page.headers["link"] == f'</v1/vms?limit=3&after={names[2]}>; rel="next"'


def test_no_kept_json_outlives_a_change_to_its_vm(world: World, api: Api) -> None:
    make_all(world)
    engine = world.engine
    changes = [
        lambda: engine.records.write("m-dhcp", None, status="error", status_reason="broke"),
        lambda: engine.patch_config(
            "labelled", VMConfigPatch.model_validate({"labels": {"tier": "db"}})
        ),
        lambda: engine.patch_config(
            "sized", VMConfigPatch.model_validate({"resources": {"vcpus": 3}})
        ),
        lambda: engine.stop_vm("m-bridged"),
        lambda: engine.start_vm("m-bridged"),
        lambda: engine.start_vm("m-vsock"),
        lambda: engine.records.set_observed_ip("m-dhcp", 0, "10.99.0.7"),
        lambda: engine.restart_vm("sized"),
        lambda: engine.destroy_vm("two-bridged"),
        lambda: engine.create_vm("two-bridged", VMConfig.model_validate({"plugin": "p"})),
    ]
    for change in changes:
        assert listed(api) == whole(world)
        change()
        assert listed(api) == whole(world)


def test_a_vm_whose_vmm_stops_running_behind_its_row_is_listed_without_its_socket(
    world: World, api: Api
) -> None:
    world.engine.create_vm("a", VMConfig.model_validate({"plugin": "p"}))
    assert b'"api_socket":"' in listed(api)
    world.engine.live.pop("a")
    assert listed(api) == whole(world)
    assert b'"api_socket":null' in listed(api)


def test_names_alone_are_listed_with_fields_name_filtered_and_paged_alike(
    world: World, api: Api
) -> None:
    make_all(world)
    names = [vm["name"] for vm in world.engine.list_vms()]
    assert api.get("/v1/vms", fields="name").json() == [{"name": name} for name in names]
    first = api.get("/v1/vms", fields="name", limit=2)
    assert first.json() == [{"name": name} for name in names[:2]]
    assert first.headers["link"] == f'</v1/vms?fields=name&limit=2&after={names[1]}>; rel="next"'
    crashed = api.get("/v1/vms", fields="name", status="crashed", label=[])
    assert crashed.json() == [{"name": "m-vsock"}]


@pytest.mark.parametrize("query", ["fields=status", "fields=name&fields=name"])
def test_a_wrong_fields_is_refused_at_its_place(api: Api, query: str) -> None:
    response = api.get(f"/v1/vms?{query}")
    assert response.status_code == 422
    assert [detail["loc"] for detail in response.json()["error"]["details"]] == ["query.fields"]


def test_kept_views_are_bounded_and_all_dropped_past_the_bound() -> None:
    made: list[str] = []

    def view(row: Any, live: bool) -> dict[str, Any]:
        made.append(row["name"])
        return {"name": row["name"], "live": live}

    class Row(tuple[Any, ...]):
        @property
        def name(self) -> str:
            return str(self[0])

        @property
        def _mapping(self) -> dict[str, Any]:
            return {"name": self[0], "network": None, "config": None, "manifest": None}

    kept = ListedViews(view, bound=2)
    rows = [Row((name,)) for name in "abc"]
    assert kept.encoded(rows, {"b"}) == [
        ("a", b'{"name":"a","live":false}'),
        ("b", b'{"name":"b","live":true}'),
        ("c", b'{"name":"c","live":false}'),
    ]
    assert made == ["a", "b", "c"]
    kept.encoded(rows[2:], {"b"})
    assert made == ["a", "b", "c"]  # c kept
    kept.encoded(rows[:1], set())
    assert made == ["a", "b", "c", "a"]  # a dropped at the bound


def test_a_listing_of_every_vm_drops_the_kept_json_of_removed_ones(world: World) -> None:
    engine = world.engine
    for name in ("a", "b", "c"):
        engine.create_vm(name, VMConfig.model_validate({"plugin": "p"}), start=False)
    engine.list_vms_encoded()
    engine.destroy_vm("b")
    engine.list_vms_encoded(VMQuery(limit=1))  # a page keeps what it does not list
    assert len(engine.listed) == 3
    made: list[str] = []
    view = engine._view

    def counted(row: Any, live: bool | None = None) -> dict[str, Any]:
        made.append(row["name"])
        return view(row, live)

    engine.listed._view = counted
    assert [name for name, _ in engine.list_vms_encoded()] == ["a", "c"]
    assert len(engine.listed) == 2
    engine.create_vm("b", VMConfig.model_validate({"plugin": "p"}), start=False)
    assert [name for name, _ in engine.list_vms_encoded()] == ["a", "b", "c"]
    assert made == ["b"]  # the new b made anew, a and c kept throughout
