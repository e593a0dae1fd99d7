"""Registered networks as the pure planning layer sees them: a VM (or one of its interfaces)
may name a network (`"network": "lan2"`) instead of giving a subnet, and resolution looks the
name up through a `NetworkLookup` the caller supplies (the daemon reads its database; offline
planning has none and shows the name as resolved by the daemon)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from roost.spec.cni import Conflist


class NetworkKind(StrEnum):
    """How a network came to be, and so who owns its bridge and addresses."""

    ON_DEMAND = "on-demand"  # made by a subnet in a config, removed with its last lease
    MANAGED = "managed"  # `network create --subnet`: roost's bridge, kept until `network rm`
    EXTERNAL = "external"  # `network create --external` (and `dhcp`): the operator's bridge
    CNI = "cni"  # `network create --cni`: no bridge; its conflist's plugins attach VMs


@dataclass(frozen=True)
class RegisteredNetwork:
    """A network known to the daemon by name. `subnet`/`gateway` are None for an external
    network registered without a subnet; `ipv6_prefix` is a managed network's /64, if any. A
    cni network has neither bridge nor subnet, only the `conflist` its plugins run. `mtu` is
    a cluster network's (None: the kernel's default)."""

    name: str
    kind: NetworkKind
    bridge: str | None
    subnet: ipaddress.IPv4Network | None
    gateway: ipaddress.IPv4Address | None
    ipv6_prefix: ipaddress.IPv6Network | None
    conflist: Conflist | None = None
    mtu: int | None = None

    @property
    def managed(self) -> bool:
        """Whether roost owns the bridge and its addresses (on-demand and named managed)."""
        return self.kind in (NetworkKind.ON_DEMAND, NetworkKind.MANAGED)


# None: no network of that name is registered
NetworkLookup = Callable[[str], RegisteredNetwork | None]

# the external network of `--dhcp-bridge`, registered at start: a dhcp VM that names none is on it
DHCP_NETWORK = "dhcp"
# Names roost gives its own networks and links; an operator's network or bridge cannot take them.
RESERVED_NETWORK_NAMES = ("default", DHCP_NETWORK)
RESERVED_NETWORK_PREFIXES = ("net-",)
RESERVED_BRIDGE_PREFIXES = ("rbr", "rtap")
RESERVED_BRIDGE_NAMES = ("roost0",)
