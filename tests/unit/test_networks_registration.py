"""Registering a network: the request's formats and rules (names, bridges, subnets, IPv6
prefixes), field-addressed; and the API's answer to a TCP client registering an external one."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from roost.errors import InvalidError
from roost.plan.registration import (
    AUTO_PREFIX,
    NetworkCreate,
    parse_network_create,
    random_prefix,
)
from tests.unit.test_api_app import TOKEN, UNIX, Api, FakeEngine, error_of


def refused(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidError) as caught:
        parse_network_create(data)
    return [(d.loc, d.msg) for d in caught.value.details]


def test_a_managed_network_gets_its_subnets_first_host_as_gateway() -> None:
    request = parse_network_create({"name": "lan2", "subnet": "10.77.0.0/24"})
    assert (str(request.gateway_addr), request.bridge, request.external) == (
        "10.77.0.1",
        None,
        False,
    )


def test_an_external_network_needs_only_its_bridge() -> None:
    request = parse_network_create({"name": "ext", "external": True, "bridge": "br-ext"})
    assert (request.subnet, request.gateway_addr) == (None, None)


@pytest.mark.parametrize(
    ("data", "loc", "says"),
    [
        ({"name": "default", "subnet": "10.1.0.0/24"}, "name", "roost gives its own"),
        ({"name": "dhcp", "subnet": "10.1.0.0/24"}, "name", "roost gives its own"),
        ({"name": "net-lab", "subnet": "10.1.0.0/24"}, "name", "roost gives its own"),
        ({"name": "Lab", "subnet": "10.1.0.0/24"}, "name", "network name"),
        ({"name": "lab"}, "subnet", "required for a managed network"),
        ({"name": "lab", "subnet": "10.1.0.0/24", "bridge": "b" * 16}, "bridge", "1-15 bytes"),
        ({"name": "lab", "subnet": "10.1.0.0/24", "bridge": "br lan"}, "bridge", "1-15 bytes"),
        ({"name": "lab", "subnet": "10.1.0.0/24", "bridge": ".."}, "bridge", "1-15 bytes"),
        ({"name": "lab", "subnet": "10.1.0.0/24", "bridge": "brü"}, "bridge", "1-15 bytes"),
        ({"name": "lab", "subnet": "10.1.0.0/24", "bridge": "rbr7"}, "bridge", "roost gives"),
        ({"name": "lab", "subnet": "10.1.0.0/24", "bridge": "rtap3"}, "bridge", "roost gives"),
        ({"name": "lab", "subnet": "10.1.0.0/24", "bridge": "roost0"}, "bridge", "roost gives"),
        ({"name": "lab", "subnet": "10.1.0.0/24", "gateway": "10.2.0.1"}, "gateway", "not inside"),
        ({"name": "lab", "external": True}, "bridge", "required for an external"),
        ({"name": "lab", "external": "yes", "bridge": "br0"}, "external", "true or false"),
        (
            {"name": "lab", "external": True, "bridge": "br0", "ipv6_prefix": "fd00:1::/64"},
            "ipv6_prefix",
            "only for a managed network",
        ),
        ({"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "::1/128"}, "ipv6_prefix", "/64"),
        ({"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "::/64"}, "ipv6_prefix", "::1"),
        (
            {"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "fe80::/64"},
            "ipv6_prefix",
            "link-local",
        ),
        (
            {"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "ff02::/64"},
            "ipv6_prefix",
            "multicast",
        ),
        (
            {"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "fd00:1::/48"},
            "ipv6_prefix",
            "/64",
        ),
        ({"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "fd00:1::"}, "ipv6_prefix", "/64"),
        (
            {"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "fd00:1::5/64"},
            "ipv6_prefix",
            "host bits",
        ),
        (
            {"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "10.1.0.0/24"},
            "ipv6_prefix",
            "IPv4",
        ),
        (
            {"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "auto6"},
            "ipv6_prefix",
            "IPv6 prefix",
        ),
    ],
)
def test_what_a_registration_refuses(data: dict[str, Any], loc: str, says: str) -> None:
    found = refused(data)
    assert [where for where, _ in found] == [loc], found
    assert says in found[0][1]


def test_an_ipv6_prefix_is_a_64_or_auto() -> None:
    request = parse_network_create(
        {"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "FD12:3456:789A:1::/64"}
    )
    assert request.ipv6_prefix == "fd12:3456:789a:1::/64"
    auto = parse_network_create({"name": "lab", "subnet": "10.1.0.0/24", "ipv6_prefix": "Auto"})
    assert auto.ipv6_prefix == AUTO_PREFIX


def test_an_auto_prefix_is_a_unique_local_64() -> None:
    prefix = ipaddress.IPv6Network(random_prefix())
    assert prefix.prefixlen == 64
    assert prefix.subnet_of(ipaddress.IPv6Network("fd00::/8"))


# ---- the API ----------------------------------------------------------------------------


class FakeNetworks:
    def __init__(self) -> None:
        self.created: list[NetworkCreate] = []

    def create(self, request: NetworkCreate) -> dict[str, Any]:
        self.created.append(request)
        return {"name": request.name}


class NetworkEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.release.set()
        self.networks = FakeNetworks()


EXTERNAL = {"name": "ext", "external": True, "bridge": "br-ext"}


def test_only_the_unix_socket_may_register_an_external_network() -> None:
    engine = NetworkEngine()
    tcp = Api(engine, "http://127.0.0.1:8000")
    headers = {"authorization": f"Bearer {TOKEN}"}
    try:
        response = tcp.request("POST", "/v1/networks", json=EXTERNAL, headers=headers)
        assert response.status_code == 403
        assert error_of(response)["code"] == "forbidden"
        managed = {"name": "lab", "subnet": "10.1.0.0/24"}
        assert tcp.request("POST", "/v1/networks", json=managed, headers=headers).status_code == 201
    finally:
        tcp.close()
    unix = Api(engine, UNIX)
    try:
        assert unix.request("POST", "/v1/networks", json=EXTERNAL).status_code == 201
    finally:
        unix.close()
    assert [request.name for request in engine.networks.created] == ["lab", "ext"]


def test_a_refused_registration_is_422_at_its_field() -> None:
    api = Api(NetworkEngine(), UNIX)
    try:
        response = api.request(
            "POST",
            "/v1/networks",
            json={"name": "lab", "subnet": "10.1.0.0/24", "bridge": "x" * 16},
        )
        assert response.status_code == 422
        assert [d["loc"] for d in error_of(response)["details"]] == ["bridge"]
    finally:
        api.close()


def test_the_registration_body_is_in_the_openapi_document() -> None:
    api = Api(NetworkEngine(), UNIX)
    try:
        document = api.request("GET", "/openapi.json").json()
    finally:
        api.close()
    body = document["paths"]["/v1/networks"]["post"]["requestBody"]["content"]
    properties = body["application/json"]["schema"]["properties"]
    assert set(properties) == {"name", "subnet", "gateway", "bridge", "external", "ipv6_prefix"}
