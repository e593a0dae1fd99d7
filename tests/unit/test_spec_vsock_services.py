"""`vsock_services`: guest ports mapped to host services, in configs, patches and the schema."""

from __future__ import annotations

from typing import Any

import pytest

from roost.errors import InvalidError
from roost.spec import VMConfig, VMConfigPatch, parse
from roost.spec.vmconfig import TCPService, UnixService, service_target


def errors(model: type[Any], data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidError) as caught:
        parse(model, data)
    return {detail.loc: detail.msg for detail in caught.value.details}


def test_a_config_reads_its_services_as_integer_ports_in_order() -> None:
    config = parse(
        VMConfig,
        {
            "plugin": "web",
            "vsock_services": {"5000": "tcp://127.0.0.1:8080", "1024": "unix:///run/svc.sock"},
        },
    )
    assert config.vsock_services == {1024: "unix:///run/svc.sock", 5000: "tcp://127.0.0.1:8080"}
    assert list(config.vsock_services) == [1024, 5000]


def test_a_config_without_services_has_an_empty_map_left_out_of_its_json() -> None:
    config = parse(VMConfig, {"plugin": "web"})
    assert config.vsock_services == {}
    assert "vsock_services" not in config.model_dump(mode="json", exclude_none=True)


def test_stored_services_read_back_as_they_were_given() -> None:
    config = parse(VMConfig, {"plugin": "web", "vsock_services": {"7": "tcp://[::1]:22"}})
    stored = config.model_dump(mode="json", exclude_none=True)
    assert stored["vsock_services"] == {"7": "tcp://[::1]:22"}
    assert VMConfig.model_validate(stored) == config


@pytest.mark.parametrize(
    ("services", "loc", "words"),
    [
        ({"0": "unix:///a"}, "vsock_services.0", "not a vsock port"),
        ({"4294967295": "unix:///a"}, "vsock_services.4294967295", "out of range"),
        ({"99999999999": "unix:///a"}, "vsock_services.99999999999", "not a vsock port"),
        ({"http": "unix:///a"}, "vsock_services.http", "not a vsock port"),
        ({"080": "unix:///a"}, "vsock_services.080", "not a vsock port"),
        ({"-1": "unix:///a"}, "vsock_services.-1", "not a vsock port"),
        ({"1024": "unix://run/a.sock"}, "vsock_services.1024", "must be absolute"),
        ({"1024": "unix:///" + "a" * 120}, "vsock_services.1024", "limited to 107 bytes"),
        ({"1024": "unix:///a\x00b"}, "vsock_services.1024", "NUL"),
        ({"1024": "http://x:80"}, "vsock_services.1024", "not a service target"),
        ({"1024": "/run/a.sock"}, "vsock_services.1024", "not a service target"),
        ({"1024": "tcp://host"}, "vsock_services.1024", "needs a host and a port"),
        ({"1024": "tcp://:80"}, "vsock_services.1024", "needs a host and a port"),
        ({"1024": "tcp://host:0"}, "vsock_services.1024", "from 1 to 65535"),
        ({"1024": "tcp://host:65536"}, "vsock_services.1024", "from 1 to 65535"),
        ({"1024": "tcp://host:http"}, "vsock_services.1024", "from 1 to 65535"),
        ({"1024": "tcp://bad host:80"}, "vsock_services.1024", "not a host name"),
        ({"1024": "tcp://h/x:80"}, "vsock_services.1024", "not a host name"),
        ({"1024": "tcp://[nothere]:80"}, "vsock_services.1024", "not an IPv6 address"),
        ({"1024": "tcp://[::1]"}, "vsock_services.1024", "tcp://[::1]:port"),
        ({"1024": 80}, "vsock_services.1024", "must be a string"),
    ],
)
def test_each_bad_service_is_reported_at_its_port(
    services: dict[str, Any], loc: str, words: str
) -> None:
    for model, body in ((VMConfig, {"plugin": "web"}), (VMConfigPatch, {})):
        found = errors(model, {**body, "vsock_services": services})
        assert list(found) == [loc]
        assert words in found[loc]


def test_every_bad_service_is_reported_at_once() -> None:
    found = errors(VMConfig, {"plugin": "w", "vsock_services": {"0": "unix:///a", "9": "x"}})
    assert set(found) == {"vsock_services.0", "vsock_services.9"}


@pytest.mark.parametrize("value", [["unix:///a"], "unix:///a", 5])
def test_services_that_are_not_an_object_are_refused_at_the_field(value: Any) -> None:
    assert list(errors(VMConfig, {"plugin": "w", "vsock_services": value})) == ["vsock_services"]


def test_too_many_services_are_refused_before_they_are_read() -> None:
    services = {str(port): "unix:///a" for port in range(1, 66)}
    found = errors(VMConfig, {"plugin": "w", "vsock_services": services})
    assert "at most 64" in found["vsock_services"]


def test_the_highest_port_and_ipv6_and_hostnames_are_accepted() -> None:
    services = {
        "4294967294": "tcp://[fd00::1]:9000",
        "1": "tcp://svc.internal:1",
        "2": "tcp://10.0.0.1:65535",
    }
    assert set(parse(VMConfig, {"plugin": "w", "vsock_services": services}).vsock_services) == {
        1,
        2,
        4294967294,
    }


def test_targets_read_as_what_the_relay_dials() -> None:
    assert service_target("unix:///run/svc.sock") == UnixService("/run/svc.sock")
    assert service_target("tcp://[::1]:22") == TCPService("::1", 22)
    assert service_target("tcp://db.local:5432") == TCPService("db.local", 5432)


BASE = VMConfig(plugin="web", vsock_services={1024: "unix:///a.sock", 7: "tcp://h:1"})


def test_a_patch_without_services_keeps_them() -> None:
    assert parse(VMConfigPatch, {"labels": {"a": "b"}}).apply(BASE).vsock_services == {
        7: "tcp://h:1",
        1024: "unix:///a.sock",
    }


def test_a_patch_with_null_services_removes_them_all() -> None:
    assert parse(VMConfigPatch, {"vsock_services": None}).apply(BASE).vsock_services == {}


def test_a_patch_with_a_map_replaces_the_whole_map() -> None:
    patch = parse(VMConfigPatch, {"vsock_services": {"9": "unix:///b.sock"}})
    assert patch.apply(BASE).vsock_services == {9: "unix:///b.sock"}


def test_an_empty_map_in_a_patch_removes_them_all() -> None:
    assert parse(VMConfigPatch, {"vsock_services": {}}).apply(BASE).vsock_services == {}


def test_the_schema_describes_services_as_an_object_of_targets_keyed_by_port() -> None:
    for model in (VMConfig, VMConfigPatch):
        text = str(model.model_json_schema()["properties"]["vsock_services"])
        assert "propertyNames" in text
        assert "tcp://host:port" in text
