"""Registering a network: the request's formats and rules (names, bridges, subnets, IPv6
prefixes, a cni network's conflist), field-addressed; and the API's answer to a TCP client
registering an external or a cni one."""

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


BRIDGE_CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "cninet",
    "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}],
}


def test_a_cni_network_is_its_conflist_as_written() -> None:
    request = parse_network_create({"name": "cninet", "cni": BRIDGE_CONFLIST})
    assert request.cni is not None
    assert request.cni.to_json() == BRIDGE_CONFLIST
    assert (request.subnet, request.bridge, request.external) == (None, None, False)


def conflist_name(data: dict[str, Any]) -> str:
    request = parse_network_create(data)
    assert request.cni is not None
    return request.cni.name


def test_a_cni_network_s_conflist_is_named_after_it_unless_it_names_itself() -> None:
    unnamed = {"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}
    assert conflist_name({"name": "lab", "cni": unnamed}) == "lab"
    assert conflist_name({"name": "lab", "cni": {**BRIDGE_CONFLIST, "name": "other"}}) == "other"


def test_a_single_plugin_conf_is_a_list_of_one() -> None:
    conf = {"cniVersion": "1.0.0", "name": "one", "type": "bridge", "bridge": "cni0"}
    request = parse_network_create({"name": "one", "cni": conf})
    assert request.cni is not None
    assert [plugin.fields() for plugin in request.cni.plugins] == [
        {"type": "bridge", "bridge": "cni0"}
    ]


@pytest.mark.parametrize(
    ("data", "locs", "says"),
    [
        ({"name": "lab", "cni": []}, ["cni"], "JSON object"),
        ({"name": "lab", "cni": "bridge"}, ["cni"], "JSON object"),
        (
            {"name": "lab", "cni": {**BRIDGE_CONFLIST, "cniVersion": "9.9"}},
            ["cni.cniVersion"],
            "9.9",
        ),
        ({"name": "lab", "cni": {**BRIDGE_CONFLIST, "plugins": []}}, ["cni.plugins"], "empty"),
        (
            {"name": "lab", "cni": {**BRIDGE_CONFLIST, "plugins": [{"type": "../sbin/x"}]}},
            ["cni.plugins.0.type"],
            "no path",
        ),
        ({"name": "lab", "cni": {**BRIDGE_CONFLIST, "name": "a b"}}, ["cni.name"], "CNI network"),
        (
            {"name": "lab", "cni": {**BRIDGE_CONFLIST, "extra": 1}},
            ["cni.extra"],
            "not a known field",
        ),
        (
            {"name": "lab", "cni": BRIDGE_CONFLIST, "subnet": "10.1.0.0/24"},
            ["subnet"],
            "not for a cni network",
        ),
        (
            {"name": "lab", "cni": BRIDGE_CONFLIST, "gateway": "10.1.0.1", "bridge": "br0"},
            ["gateway", "bridge"],
            "not for a cni network",
        ),
        (
            {"name": "lab", "cni": BRIDGE_CONFLIST, "ipv6_prefix": "auto"},
            ["ipv6_prefix"],
            "not for a cni network",
        ),
        (
            {"name": "lab", "cni": BRIDGE_CONFLIST, "external": True},
            ["external"],
            "external or cni",
        ),
        ({"name": "default", "cni": BRIDGE_CONFLIST}, ["name"], "roost gives its own"),
        (
            {"name": "Lab", "cni": {**BRIDGE_CONFLIST, "cniVersion": "2"}},
            ["name", "cni.cniVersion"],
            "network name",
        ),
    ],
)
def test_what_a_cni_registration_refuses(data: dict[str, Any], locs: list[str], says: str) -> None:
    found = refused(data)
    assert [where for where, _ in found] == locs, found
    assert says in found[0][1], found


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


def test_only_the_unix_socket_may_register_a_cni_network() -> None:
    engine = NetworkEngine()
    body = {"name": "cninet", "cni": BRIDGE_CONFLIST}
    tcp = Api(engine, "http://127.0.0.1:8000")
    try:
        response = tcp.request(
            "POST", "/v1/networks", json=body, headers={"authorization": f"Bearer {TOKEN}"}
        )
        assert response.status_code == 403
        error = error_of(response)
        assert (error["code"], [d["loc"] for d in error["details"]]) == ("forbidden", ["cni"])
    finally:
        tcp.close()
    unix = Api(engine, UNIX)
    try:
        assert unix.request("POST", "/v1/networks", json=body).status_code == 201
    finally:
        unix.close()
    assert [request.name for request in engine.networks.created] == ["cninet"]


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
    assert set(properties) == {
        "name",
        "subnet",
        "gateway",
        "bridge",
        "external",
        "ipv6_prefix",
        "cni",
    }
