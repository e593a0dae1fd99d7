"""CNI documents: conflists as an operator writes them, results and errors as plugins answer."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from roost.errors import InvalidError
from roost.spec.cni import (
    check_container_id,
    cni_args,
    parse_conflist,
    parse_error,
    parse_result,
)

BRIDGE = {
    "type": "bridge",
    "bridge": "cni0",
    "ipam": {"type": "host-local", "subnet": "10.88.0.0/24"},
}


def conflist(**changes: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "pods", "plugins": [BRIDGE], **changes}


def problems(data: Any, loc: str = "cni") -> dict[str, str]:
    with pytest.raises(InvalidError) as failed:
        parse_conflist(data, loc)
    return {d.loc: d.msg for d in failed.value.details}


def test_a_conflist_keeps_each_plugins_own_fields_as_written() -> None:
    parsed = parse_conflist(
        conflist(plugins=[BRIDGE, {"type": "portmap", "capabilities": {"portMappings": True}}])
    )
    assert parsed.name == "pods" and parsed.cni_version == "1.0.0"
    assert [p.fields() for p in parsed.plugins] == [
        BRIDGE,
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ]
    assert parsed.to_json() == conflist(
        plugins=[BRIDGE, {"type": "portmap", "capabilities": {"portMappings": True}}]
    )


def test_a_single_plugin_conf_reads_as_a_list_of_one() -> None:
    parsed = parse_conflist({"cniVersion": "0.4.0", "name": "one", **BRIDGE})
    assert parsed.name == "one" and parsed.cni_version == "0.4.0"
    assert [p.fields() for p in parsed.plugins] == [BRIDGE]


def test_a_conflist_missing_its_name_and_plugins_is_422_at_each_field() -> None:
    assert problems({"cniVersion": "1.0.0"}) == {
        "cni.name": "is required",
        "cni.plugins": "is required",
    }


def test_a_plugin_type_that_is_a_path_is_refused() -> None:
    found = problems(conflist(plugins=[{"type": "../../bin/sh"}]))
    assert list(found) == ["cni.plugins.0.type"]
    assert "no path" in found["cni.plugins.0.type"]


def test_an_unsupported_cni_version_names_the_ones_roost_runs() -> None:
    found = problems(conflist(cniVersion="1.1.0"))
    assert found["cni.cniVersion"].startswith("'1.1.0' is not a CNI version roost runs; use one of")


def test_fields_roost_sets_per_call_are_refused_in_a_plugin() -> None:
    found = problems(conflist(plugins=[{**BRIDGE, "prevResult": {}}]))
    assert found == {
        "cni.plugins": "plugins.0.prevResult is set by roost at each call; remove it from the list"
    }


def test_an_unknown_top_level_field_and_an_empty_list_are_refused() -> None:
    assert problems(conflist(plugin=[BRIDGE], plugins=[])) == {
        "cni.plugins": "must not be empty",
        "cni.plugin": "is not a known field; check its spelling",
    }
    assert problems(["not", "an", "object"]) == {"cni": "must be a JSON object: a CNI conflist"}


def test_a_network_name_with_spaces_is_refused() -> None:
    assert "is not a CNI network name" in problems(conflist(name="my pods"))["cni.name"]


RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "8a:40:c3:61:cb:09"},
        {"name": "veth1", "mac": "d6:f6:4b:e4:ba:2e"},
        {"name": "eth0", "mac": "92:1b:f6:65:c6:81", "sandbox": "/run/netns/roost-vm-a"},
    ],
    "ips": [
        {"address": "10.88.0.2/24", "gateway": "10.88.0.1", "interface": 2},
        {"address": "fd88::2/64", "gateway": "fd88::1", "interface": 2},
        {"address": "10.99.0.7/16", "interface": 2},
    ],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd88::1"}],
    "dns": {"nameservers": ["10.88.0.1"]},
}


def test_a_result_keeps_every_address_ipv4_and_ipv6_of_its_interface() -> None:
    result = parse_result(RESULT)
    index, interface = result.sandbox_interface("eth0", "/run/netns/roost-vm-a")
    assert (index, interface.mac) == (2, "92:1b:f6:65:c6:81")
    assert [(str(ip.address), str(ip.gateway)) for ip in result.ips_of(index)] == [
        ("10.88.0.2/24", "10.88.0.1"),
        ("fd88::2/64", "fd88::1"),
        ("10.99.0.7/16", "None"),
    ]
    assert result.routes[1].gw == ipaddress.IPv6Address("fd88::1")
    assert result.dns.nameservers == ["10.88.0.1"]
    assert result.to_json() == RESULT


def test_a_result_without_the_interface_in_the_sandbox_says_what_it_has() -> None:
    with pytest.raises(ValueError, match="names no interface 'eth1' inside /run/netns/x"):
        parse_result(RESULT).sandbox_interface("eth1", "/run/netns/x")


def test_an_older_result_reads_the_same_with_its_extra_fields_kept() -> None:
    old = {
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "eth0", "sandbox": "/run/netns/n"}],
        "ips": [{"version": "4", "address": "10.1.0.5/24", "interface": 0}],
    }
    result = parse_result(old)
    assert str(result.ips[0].address) == "10.1.0.5/24"
    assert result.to_json() == old


def test_a_result_with_a_bad_address_says_where() -> None:
    with pytest.raises(ValueError, match=r"^ips\.0\.address"):
        parse_result({"cniVersion": "1.0.0", "ips": [{"address": "10.88.0.300/24"}]})


def test_a_plugin_error_object_reads_with_its_details() -> None:
    error = parse_error(
        {"cniVersion": "1.0.0", "code": 7, "msg": "no subnet", "details": "ranges is empty"}
    )
    assert error is not None
    assert error.text() == "no subnet (ranges is empty) [CNI error code 7]"
    assert parse_error({"cniVersion": "1.0.0", "ips": []}) is None


def test_cni_args_are_written_as_the_spec_wants_and_refused_when_they_cannot_be() -> None:
    assert (
        cni_args({"IgnoreUnknown": "1", "K8S_POD_NAME": "web"})
        == "IgnoreUnknown=1;K8S_POD_NAME=web"
    )
    with pytest.raises(InvalidError) as failed:
        cni_args({"A": "x;y"})
    assert failed.value.details[0].loc == "cni.args.A"


def test_a_container_id_follows_the_spec() -> None:
    assert check_container_id("roost-vm-3") == "roost-vm-3"
    with pytest.raises(ValueError):
        check_container_id("-x")
