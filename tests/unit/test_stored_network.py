"""A VM's recorded network reads back as it was written, whether its single network is its one
interface's (read once) or not."""

from __future__ import annotations

import copy
from typing import Any

from roost.state.vms import StoredNetwork

EFFECTIVE = {
    "mode": "bridged",
    "source": "plugin",
    "subnet": "10.212.0.0/16",
    "gateway": "10.212.0.1",
    "auto_assign": True,
    "ip": "10.212.0.2",
}
PLAN = {
    "tap": True,
    "ipam": "auto",
    "nic": True,
    "vsock": True,
    "kernel_ip_arg": "ip=10.212.0.2::10.212.0.1:255.255.0.0:s00000:eth0:off",
    "attach": "managed",
    "observe_ip": False,
    "antispoof": "ip_and_mac",
}


def interface(index: int, effective: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": index,
        "name": f"eth{index}",
        "default_route": index == 0,
        "effective": effective,
        "plan": PLAN,
        "bridge": "rbr2",
        "ipv6": None,
    }


def test_a_single_interface_network_reads_back_as_written_and_is_its_interfaces() -> None:
    data = {"network": dict(EFFECTIVE), "interfaces": [interface(0, dict(EFFECTIVE))]}
    stored = StoredNetwork.from_json(copy.deepcopy(data))
    assert stored is not None
    assert stored.to_json() == data
    assert stored.network == stored.interfaces[0].effective


def test_a_network_unlike_its_interfaces_and_several_interfaces_read_back_as_written() -> None:
    other = {**EFFECTIVE, "ip": "10.212.0.3"}
    unlike = {"network": other, "interfaces": [interface(0, dict(EFFECTIVE))]}
    several = {
        "network": None,
        "interfaces": [interface(0, dict(EFFECTIVE)), interface(1, dict(other))],
    }
    for data in (unlike, several):
        stored = StoredNetwork.from_json(copy.deepcopy(data))
        assert stored is not None
        assert stored.to_json() == data
