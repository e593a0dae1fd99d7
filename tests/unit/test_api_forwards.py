"""The forwards API (`/v1/vms/{name}/forwards`) on an engine of fakes with real relays, and who
may set a VM's `vsock_services`: any target over the Unix socket, only sockets under a
`--service-dir` over TCP (403 otherwise), the daemon's own API socket never (422)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost.api.app import create_app
from roost.api.endpoints import Endpoint
from roost.engine.relays import VsockRelays
from roost.errors import ConflictError
from roost.spec import VMConfig
from roost.vmm.base import VsockTarget
from tests.engine_fakes import World

TOKEN = "s3cret-token"
TCP_URL = "http://127.0.0.1:8000"


def no_vmm(name: str) -> VsockTarget:
    raise ConflictError(f"VM {name!r} is stopped")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Api:
    """The app over the Unix socket (`unix`) and over TCP with the token (`tcp`)."""

    def __init__(self, world: World, root: Path, service_dirs: tuple[Path, ...] = ()) -> None:
        self.api_socket = root / "roost.sock"
        world.engine.settings = dataclasses.replace(
            world.settings, token=TOKEN, service_dirs=service_dirs
        )
        endpoints = [
            Endpoint.parse(f"unix://{self.api_socket}"),
            Endpoint.parse("tcp://127.0.0.1:8000"),
        ]
        app = create_app(world.engine, endpoints)
        self.runner = asyncio.Runner()
        transport = httpx.ASGITransport(app=app)
        self.unix = httpx.AsyncClient(transport=transport, base_url="http://roost")
        self.tcp = httpx.AsyncClient(
            transport=transport,
            base_url=TCP_URL,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )

    def __call__(
        self, method: str, url: str, *, over: str = "unix", **kwargs: Any
    ) -> httpx.Response:
        client = self.unix if over == "unix" else self.tcp
        return self.runner.run(client.request(method, url, **kwargs))

    def close(self) -> None:
        self.runner.run(self.unix.aclose())
        self.runner.run(self.tcp.aclose())
        self.runner.close()


@pytest.fixture
def world(tmp_short: Path) -> Iterator[World]:
    instance = World(tmp_short)
    relays = VsockRelays(instance.db, no_vmm)
    relays.start()
    instance.engine.listeners = relays
    instance.engine.create_vm("v1", VMConfig(plugin="p"), start=False)
    yield instance
    relays.close()
    instance.close()


@pytest.fixture
def api(world: World, tmp_short: Path) -> Iterator[Api]:
    instance = Api(world, tmp_short, service_dirs=((tmp_short / "services").resolve(),))
    yield instance
    instance.close()


def error(response: httpx.Response) -> tuple[int, str, list[str]]:
    body = response.json()["error"]
    return response.status_code, body["code"], [detail["loc"] for detail in body["details"]]


# ---- forwards ---------------------------------------------------------------------------


def test_a_forward_is_added_listed_and_removed(api: Api) -> None:
    listen = f"127.0.0.1:{free_port()}"
    added = api("POST", "/v1/vms/v1/forwards", json={"listen": listen, "guest_port": 1024})
    assert added.status_code == 201
    forward = added.json()
    assert forward == {"id": forward["id"], "listen": listen, "guest_port": 1024}
    assert api("GET", "/v1/vms/v1/forwards").json() == [forward]
    assert api("DELETE", f"/v1/vms/v1/forwards/{forward['id']}").status_code == 204
    assert api("GET", "/v1/vms/v1/forwards").json() == []
    assert error(api("DELETE", f"/v1/vms/v1/forwards/{forward['id']}"))[:2] == (404, "not_found")


def test_forwards_of_an_unknown_vm_are_not_found(api: Api) -> None:
    body = {"listen": f"127.0.0.1:{free_port()}", "guest_port": 1}
    assert error(api("POST", "/v1/vms/nope/forwards", json=body))[:2] == (404, "not_found")
    assert error(api("GET", "/v1/vms/nope/forwards"))[:2] == (404, "not_found")
    assert error(api("DELETE", "/v1/vms/nope/forwards/1"))[:2] == (404, "not_found")


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"listen": "127.0.0.1:8080"}, "guest_port"),
        ({"listen": "127.0.0.1:8080", "guest_port": "22"}, "guest_port"),
        ({"listen": "127.0.0.1:8080", "guest_port": 0}, "guest_port"),
        ({"listen": "127.0.0.1:8080", "guest_port": 4294967295}, "guest_port"),
        ({"listen": "0.0.0.0:8080", "guest_port": 22}, "listen"),
        ({"listen": 8080, "guest_port": 22}, "listen"),
        ({"listen": "127.0.0.1:8080", "guest_port": 22, "persist": True}, "persist"),
    ],
)
def test_a_bad_forward_is_invalid_at_its_field(api: Api, body: dict[str, Any], loc: str) -> None:
    assert error(api("POST", "/v1/vms/v1/forwards", json=body)) == (422, "invalid", [loc])


def test_an_address_that_is_taken_is_a_conflict(api: Api) -> None:
    body = {"listen": f"127.0.0.1:{free_port()}", "guest_port": 1024}
    assert api("POST", "/v1/vms/v1/forwards", json=body).status_code == 201
    assert error(api("POST", "/v1/vms/v1/forwards", json=body))[:2] == (409, "conflict")


def test_a_forward_id_that_is_not_a_number_is_invalid(api: Api) -> None:
    assert error(api("DELETE", "/v1/vms/v1/forwards/first"))[:2] == (422, "invalid")


@pytest.mark.parametrize("forward_id", ["0", "-1", str(2**63), "9" * 40])
def test_a_forward_id_no_forward_can_have_is_not_found(api: Api, forward_id: str) -> None:
    removed = api("DELETE", f"/v1/vms/v1/forwards/{forward_id}")
    assert error(removed)[:2] == (404, "not_found")


# ---- who may set vsock_services ---------------------------------------------------------


def create(api: Api, services: dict[str, str], over: str, name: str = "v2") -> httpx.Response:
    body = {"name": name, "start": False, "plugin": "p", "vsock_services": services}
    return api("POST", "/v1/vms", json=body, over=over)


def patch(api: Api, services: dict[str, str] | None, over: str) -> httpx.Response:
    return api("PATCH", "/v1/vms/v1/config", json={"vsock_services": services}, over=over)


def test_a_unix_socket_client_may_name_any_service(api: Api) -> None:
    services = {"1024": "unix:///run/anything.sock", "1025": "tcp://10.1.2.3:80"}
    assert create(api, services, "unix").status_code == 201
    assert patch(api, services, "unix").status_code == 200


def test_a_tcp_client_naming_a_service_outside_the_service_dirs_is_forbidden(api: Api) -> None:
    services = {"1024": "unix:///run/anything.sock", "1025": "tcp://127.0.0.1:80"}
    for answer in (create(api, services, "tcp"), patch(api, services, "tcp")):
        assert error(answer) == (403, "forbidden", ["vsock_services.1024", "vsock_services.1025"])
        assert "--service-dir" in answer.json()["error"]["message"]
    assert api("GET", "/v1/vms/v2").status_code == 404
    assert "vsock_services" not in api("GET", "/v1/vms/v1/config").json()["config"]


def test_a_tcp_client_may_name_sockets_under_a_service_dir(api: Api, tmp_short: Path) -> None:
    services = {"7": f"unix://{tmp_short}/services/echo.sock"}
    assert create(api, services, "tcp").status_code == 201
    assert patch(api, services, "tcp").status_code == 200
    assert patch(api, None, "tcp").status_code == 200  # removing them names no host resource


def test_a_path_that_leads_out_of_a_service_dir_is_judged_where_it_leads(
    api: Api, tmp_short: Path
) -> None:
    (tmp_short / "services").mkdir()
    (tmp_short / "services" / "out").symlink_to("/run")
    escapes = {
        "1": f"unix://{tmp_short}/services/out/x.sock",
        "2": f"unix://{tmp_short}/services/../x.sock",
    }
    assert error(create(api, escapes, "tcp")) == (
        403,
        "forbidden",
        ["vsock_services.1", "vsock_services.2"],
    )


def test_the_daemon_s_own_api_socket_is_refused_from_every_client(
    api: Api, tmp_short: Path
) -> None:
    (tmp_short / "services").mkdir()
    (tmp_short / "services" / "api.sock").symlink_to(api.api_socket)
    for target in (f"unix://{api.api_socket}", f"unix://{tmp_short}/services/api.sock"):
        for over in ("unix", "tcp"):
            answer = create(api, {"5": target}, over)
            assert error(answer) == (422, "invalid", ["vsock_services.5"])
            assert "own API socket" in answer.json()["error"]["message"]
            assert error(patch(api, {"5": target}, over)) == (422, "invalid", ["vsock_services.5"])
