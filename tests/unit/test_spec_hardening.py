"""The spec's limits against hostile input: reserved address ranges and padded prefix lengths
are no subnets, labels are few and short, artifact paths and URLs are what a filesystem or a
network can take. Every refusal names its field."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roost.errors import InvalidError
from roost.plan.network import DefaultNetwork
from roost.spec import Manifest, VMConfig, VMConfigPatch, parse
from roost.spec.network import network_override, parse_subnet

MANIFEST: dict[str, Any] = {"name": "web", "version": "1", "initramfs": {"path": "/i.cpio"}}


def refusal(model: type[Any], data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidError) as caught:
        parse(model, data)
    return [(detail.loc, detail.msg) for detail in caught.value.details]


def subnet_refusals(subnet: str) -> dict[str, list[tuple[str, str]]]:
    """What every place that takes a subnet says about `subnet`."""
    bridged = {"mode": "bridged", "subnet": subnet, "auto_assign": True}
    places = {
        "manifest": refusal(Manifest, {**MANIFEST, "network": bridged}),
        "vm config": refusal(VMConfig, {"plugin": "web", "network": bridged}),
        "vm patch": refusal(VMConfigPatch, {"network": bridged}),
    }
    with pytest.raises(InvalidError) as flags:
        network_override(None, mode="bridged", subnet=subnet, auto_assign=True)
    places["cli flags"] = [(d.loc, d.msg) for d in flags.value.details]
    with pytest.raises(InvalidError) as default:
        DefaultNetwork.from_cidr(subnet)
    places["--default-subnet"] = [(d.loc, d.msg) for d in default.value.details]
    return places


RESERVED = [
    ("0.0.0.0/8", "0.0.0.0/8, the 'this network' range"),
    ("0.255.0.0/16", "0.0.0.0/8, the 'this network' range"),
    ("127.0.0.0/8", "127.0.0.0/8, the loopback range"),
    ("127.1.2.0/24", "127.0.0.0/8, the loopback range"),
    ("169.254.0.0/16", "169.254.0.0/16, the link-local range"),
    ("169.0.0.0/8", "169.254.0.0/16, the link-local range"),
    ("169.254.7.0/24", "169.254.0.0/16, the link-local range"),
    ("224.0.0.0/8", "224.0.0.0/4, the multicast range"),
    ("239.255.255.0/24", "224.0.0.0/4, the multicast range"),
    ("240.0.0.0/8", "240.0.0.0/4, the reserved range"),
    ("255.255.255.252/30", "limited broadcast address 255.255.255.255"),
]


@pytest.mark.parametrize(("subnet", "named"), RESERVED)
def test_a_subnet_overlapping_a_reserved_range_is_refused_everywhere_with_the_field_named(
    subnet: str, named: str
) -> None:
    for place, details in subnet_refusals(subnet).items():
        expected = "default_subnet" if place == "--default-subnet" else "network.subnet"
        assert [loc for loc, _ in details] == [expected], place
        assert named in details[0][1], place
        assert "choose a private range such as 10.0.0.0/8" in details[0][1], place


@pytest.mark.parametrize(
    "subnet",
    [
        "1.0.0.0/8",
        "126.255.255.0/24",
        "128.0.0.0/8",
        "169.253.0.0/16",
        "169.255.0.0/16",
        "100.64.0.0/10",
        "223.255.255.252/30",
        "10.0.0.0/8",
        "192.168.0.0/16",
    ],
)
def test_a_subnet_next_to_a_reserved_range_is_accepted(subnet: str) -> None:
    assert str(parse_subnet(subnet)) == subnet
    bridged = {"mode": "bridged", "subnet": subnet, "auto_assign": True}
    parse(VMConfig, {"plugin": "web", "network": bridged})
    assert str(DefaultNetwork.from_cidr(subnet).subnet) == subnet


@pytest.mark.parametrize(
    ("subnet", "text"),
    [
        ("10.0.0.0/024", "/024 has a leading zero; write the prefix length, 10.0.0.0/24"),
        ("10.0.0.0/08", "/08 has a leading zero; write the prefix length, 10.0.0.0/8"),
        ("10.0.0.0/00024", "/00024 has a leading zero"),
        ("10.0.0.0/255.255.255.0", "/255.255.255.0 is a mask; write the prefix length"),
        ("10.0.0.0/0.0.0.255", "/0.0.0.255 is a mask; write the prefix length, 10.0.0.0/24"),
    ],
)
def test_a_prefix_length_with_leading_zeros_or_written_as_a_mask_is_refused(
    subnet: str, text: str
) -> None:
    for place, details in subnet_refusals(subnet).items():
        assert len(details) == 1, place
        assert text in details[0][1], place


def overlaps_a_reserved_range(network: ipaddress.IPv4Network) -> bool:
    """Worked out from the first octets alone, independently of the code under test."""
    first, last = int(network.network_address), int(network.broadcast_address)
    octets = range(first >> 24, (last >> 24) + 1)
    link_local = first <= 0xA9FE_FFFF and last >= 0xA9FE_0000
    return 0 in octets or 127 in octets or octets[-1] >= 224 or link_local


@given(st.integers(0, 2**32 - 1), st.integers(8, 30))
def test_a_subnet_is_refused_exactly_when_it_overlaps_a_reserved_range(
    address: int, prefix: int
) -> None:
    network = ipaddress.IPv4Network((address >> (32 - prefix) << (32 - prefix), prefix))
    try:
        parse_subnet(str(network))
    except ValueError as error:
        assert overlaps_a_reserved_range(network), error
        assert "a VM network cannot use" in str(error)
    else:
        assert not overlaps_a_reserved_range(network)


@given(st.integers(0x0A00_0000, 0x0AFF_FFFF), st.integers(8, 30), st.integers(1, 3))
def test_any_prefix_length_padded_with_zeros_is_refused(
    address: int, prefix: int, zeros: int
) -> None:
    network = ipaddress.IPv4Network((address >> (32 - prefix) << (32 - prefix), prefix))
    assert parse_subnet(str(network)) == network
    with pytest.raises(ValueError, match="leading zero"):
        parse_subnet(f"{network.network_address}/{'0' * zeros}{prefix}")


LABEL_OWNERS: list[tuple[type[Any], dict[str, Any]]] = [
    (VMConfig, {"plugin": "web"}),
    (VMConfigPatch, {}),
    (Manifest, MANIFEST),
]


@pytest.mark.parametrize(("model", "base"), LABEL_OWNERS)
def test_sixty_four_labels_are_accepted(model: type[Any], base: dict[str, Any]) -> None:
    labels = {f"key-{n}": "x" * 256 for n in range(64)}
    assert parse(model, {**base, "labels": labels}).labels == labels


@pytest.mark.parametrize(("model", "base"), LABEL_OWNERS)
@pytest.mark.parametrize(
    ("labels", "text"),
    [
        ({f"k{n}": "v" for n in range(65)}, "has 65 labels; at most 64 are allowed"),
        ({f"k{n}": "v" for n in range(100_000)}, "has 100000 labels; at most 64 are allowed"),
        ({"team": "v" * 257}, "label 'team': values are limited to 256 characters"),
        ({"k" * 254: "v"}, "must be 1-253 characters"),
    ],
)
def test_too_many_or_too_long_labels_are_refused_at_labels(
    model: type[Any], base: dict[str, Any], labels: dict[str, str], text: str
) -> None:
    [(loc, msg)] = refusal(model, {**base, "labels": labels})
    assert loc == "labels"
    assert text in msg


@given(st.integers(0, 70))
def test_labels_are_accepted_exactly_up_to_sixty_four(count: int) -> None:
    data = {"plugin": "web", "labels": {f"k{n}": str(n) for n in range(count)}}
    if count <= 64:
        assert len(parse(VMConfig, data).labels) == count
    else:
        assert [loc for loc, _ in refusal(VMConfig, data)] == ["labels"]


@pytest.mark.parametrize(
    ("artifact", "loc", "text"),
    [
        ({"path": "/srv/a\x00b"}, "initramfs.path", "must not contain NUL characters"),
        ({"path": "/srv/\udcff"}, "initramfs.path", "must be valid UTF-8 text"),
        ({"path": "/" + "a" * 4095}, "initramfs.path", "is 4096 bytes long; the limit is 4095"),
        ({"url": "http://[::1"}, "initramfs.url", "is not a valid URL: Invalid IPv6 URL"),
        ({"url": "http://[::1]:99999/i"}, "initramfs.url", "Port out of range"),
        ({"url": "http://127.0.0.1:http/i"}, "initramfs.url", "is not a valid URL"),
        ({"url": "http://127.0.0.1:0/i"}, "initramfs.url", "names port 0"),
        ({"url": "http://:80/i"}, "initramfs.url", "must be an http://, https:// or file://"),
        ({"url": "https://x.test/\x00"}, "initramfs.url", "must not contain NUL characters"),
        ({"url": "https://x.test/" + "a" * 8192}, "initramfs.url", "the limit is 8192"),
    ],
)
def test_an_artifact_path_or_url_no_filesystem_or_network_takes_is_refused_at_its_field(
    artifact: dict[str, str], loc: str, text: str
) -> None:
    [(where, msg)] = refusal(Manifest, {**MANIFEST, "initramfs": artifact})
    assert where == loc
    assert text in msg


@pytest.mark.parametrize(
    "artifact",
    [
        {"path": "/" + "a" * 4094},
        {"url": "http://[::1]:8080/i"},
        {"url": "https://[2001:db8::1]/i"},
        {"url": "file:///srv/%C3%A9t%C3%A9"},
    ],
)
def test_artifact_paths_and_urls_at_the_limits_are_accepted(artifact: dict[str, str]) -> None:
    parse(Manifest, {**MANIFEST, "initramfs": artifact})
