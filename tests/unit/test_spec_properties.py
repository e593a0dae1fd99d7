"""Properties: normalising a spec twice changes nothing, and a valid spec survives JSON."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from roost.spec import Manifest, VMConfig, VMConfigPatch

names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
sha = st.text("0123456789abcdefABCDEF", min_size=64, max_size=64)
artifact = st.one_of(
    st.fixed_dictionaries({"path": st.sampled_from(["i.cpio", "/a/b", "../k"])}),
    st.fixed_dictionaries(
        {"url": st.sampled_from(["https://x.test/a", "file:///srv/a"])}, optional={"sha256": sha}
    ),
)
mode_spelling = st.sampled_from(["", " ", "\t"]).flatmap(
    lambda pad: st.sampled_from(["vsock", "VSOCK", "Bridged", "dhcp", "DHCP"]).map(
        lambda m: pad + m + pad
    )
)


@st.composite
def bridged_network(draw: st.DrawFn, with_ip: bool) -> dict[str, Any]:
    prefix = draw(st.integers(16, 28))
    # 1.0.0.0-126.255.255.255: clear of every reserved range a subnet may not overlap
    base = draw(st.integers(0x0100_0000, 0x7EFF_FFFF)) & ~((1 << (32 - prefix)) - 1)
    subnet = ipaddress.IPv4Network((base, prefix))
    hosts = subnet.num_addresses - 2
    gateway = subnet.network_address + draw(st.integers(1, hosts))
    net: dict[str, Any] = {"mode": draw(st.sampled_from(["bridged", " BRIDGED"]))}
    net["subnet"] = str(subnet)
    if draw(st.booleans()):
        net["gateway"] = str(gateway)
        net["auto_assign"] = draw(st.sampled_from([True, False, None]))
    else:
        net["auto_assign"] = True
    if with_ip:
        ip = subnet.network_address + draw(st.integers(1, hosts))
        if ip != ipaddress.IPv4Address(net.get("gateway", str(subnet.network_address + 1))):
            net["ip"] = str(ip)
    return {k: v for k, v in net.items() if v is not None}


def network(with_ip: bool) -> st.SearchStrategy[dict[str, Any] | None]:
    return st.one_of(
        st.none(),
        st.fixed_dictionaries({"mode": st.sampled_from(["vsock", " Vsock ", "dhcp", "DHCP"])}),
        st.just({"mode": "bridged"}),
        bridged_network(with_ip),
    )


manifests = st.fixed_dictionaries(
    {
        "name": names,
        "version": st.from_regex(r"[0-9a-z.+-]{1,10}", fullmatch=True),
        "initramfs": artifact,
    },
    optional={
        "kernel": artifact,
        "rootfs": artifact,
        "description": st.text(max_size=30),
        "boot_args": st.lists(st.sampled_from(["console=ttyS0", "quiet", " panic=1 "])).map(
            " ".join
        ),
        "resources": st.fixed_dictionaries(
            {}, optional={"vcpus": st.integers(1, 32), "memory_mib": st.integers(16, 65536)}
        ),
        "network": network(with_ip=False),
        "labels": st.dictionaries(names, st.text(max_size=10), max_size=3),
    },
)
vm_configs = st.fixed_dictionaries(
    {"plugin": names},
    optional={
        "network": network(with_ip=True),
        "resources": st.fixed_dictionaries({}, optional={"vcpus": st.integers(1, 32)}),
        "boot_args": st.sampled_from(["quiet", "loglevel=3  debug"]),
    },
)


def normalise(model: type[Any], data: Any) -> dict[str, Any]:
    return model.model_validate(data).model_dump(mode="json", exclude_none=True)


@settings(max_examples=300)
@given(manifests)
def test_manifest_normalisation_is_idempotent_and_round_trips(data: dict[str, Any]) -> None:
    once = normalise(Manifest, data)
    assert normalise(Manifest, once) == once
    assert Manifest.model_validate(json.loads(json.dumps(once))) == Manifest.model_validate(data)


@settings(max_examples=300)
@given(vm_configs)
def test_vm_config_normalisation_is_idempotent_and_round_trips(data: dict[str, Any]) -> None:
    once = normalise(VMConfig, data)
    assert normalise(VMConfig, once) == once
    assert VMConfig.model_validate(json.loads(json.dumps(once))) == VMConfig.model_validate(data)


@given(vm_configs, mode_spelling)
def test_patch_with_everything_absent_changes_nothing(data: dict[str, Any], mode: str) -> None:
    config = VMConfig.model_validate(data)
    assert VMConfigPatch().apply(config) == config
    patched = VMConfigPatch.model_validate({"network": {"mode": mode}}).apply(config)
    assert patched.network is not None
    assert patched.network.mode is not None
    assert patched.network.mode.value == mode.strip().lower()
