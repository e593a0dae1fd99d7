"""Masquerading for roost's managed networks (`roost serve --nat`): their guests reach the
outside through the daemon namespace's default route, seen there as the namespace's address.

One ip-family table `roost_nat`, owned by roost. Each managed bridge gets a base chain of its
own on the postrouting hook, so adding or removing a network is one atomic batch touching
only its chain. A chain masquerades its network's subnet only when the packet leaves by
another interface than the network's own bridge: br_netfilter makes ip-family hooks see the
traffic inside a bridge too, which must keep the guests' own addresses.

There is no forward chain: with no other ruleset the forward hook accepts, and an accept in
roost's table could not overrule another table's drop anyway (nftables runs every table's
chains; a drop in any is final). IP forwarding is turned on in the namespace and never off.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Mapping

from roost.errors import HostError
from roost.host import sysctl
from roost.host.firewall import LIBRARY, nftables_in
from roost.host.netns import NetnsWorker

log = logging.getLogger(__name__)
TABLE = "ip roost_nat"
FORWARDING = "net.ipv4.ip_forward"


def _network(bridge: str, subnet: ipaddress.IPv4Network) -> list[str]:
    """The commands that (re)make `bridge`'s chain."""
    chain = f"{TABLE} net-{bridge}"
    return [
        f"add chain {chain} {{ type nat hook postrouting priority srcnat; policy accept; }}",
        f"flush chain {chain}",
        f'add rule {chain} ip saddr {subnet} oifname != "{bridge}" masquerade',
    ]


def _where(worker: NetnsWorker) -> str:
    return f"network namespace {worker.netns}" if worker.netns else "the daemon's namespace"


class Masquerade:
    """The NAT chains of the managed networks, and the IP forwarding they need."""

    def __init__(self, worker: NetnsWorker) -> None:
        nft = nftables_in(worker)
        if nft is None:
            raise HostError(
                f"--nat needs {LIBRARY} (Debian: apt-get install libnftables1); install it, "
                "or start without --nat"
            )
        self._worker = worker
        self._nft = nft
        self._lock = threading.Lock()
        self._run(f"add table {TABLE}\n")
        self.forward()

    def _run(self, script: str, *, check: bool = True) -> None:
        with self._lock, self._worker.inside():
            refused = self._nft.run(script)
        if check and refused is not None:
            raise HostError(f"nftables refused the NAT rules: {refused}")

    def forward(self) -> None:
        """IP forwarding on in the namespace (NAT needs it); said in the log whenever roost
        turns it on, as roost never turns it off again."""
        with self._worker.inside():
            was = sysctl.read(FORWARDING)
            if was != "1":
                sysctl.write(FORWARDING, "1")
        if was != "1":
            log.warning(
                "turned IPv4 forwarding on in %s for --nat (%s was %s); roost never turns it "
                "off: set it back yourself if you stop using --nat",
                _where(self._worker),
                FORWARDING,
                was,
            )

    def add(self, bridge: str, subnet: ipaddress.IPv4Network) -> None:
        """Masquerade `subnet` when it leaves by another interface than `bridge`."""
        self._run("\n".join([f"add table {TABLE}", *_network(bridge, subnet)]) + "\n")
        self.forward()  # turned off behind roost's back since the start? then said again

    def remove(self, bridge: str) -> None:
        """Remove `bridge`'s chain, if it has one."""
        chain = f"{TABLE} net-{bridge}"
        self._run(f"flush chain {chain}\ndelete chain {chain}\n", check=False)

    def reconcile(self, networks: Mapping[str, ipaddress.IPv4Network]) -> None:
        """Exactly one chain per network of `networks` (bridge → subnet), in one batch: the
        chains of networks that are gone go, missing ones come back."""
        lines = [f"add table {TABLE}", f"delete table {TABLE}", f"add table {TABLE}"]
        for bridge, subnet in sorted(networks.items()):
            lines += _network(bridge, subnet)
        self._run("\n".join(lines) + "\n")


def remove_table(worker: NetnsWorker) -> None:
    """Remove a NAT table an earlier `roost serve --nat` left in the namespace: a daemon
    started without --nat masquerades nothing."""
    nft = nftables_in(worker)
    if nft is None:
        return
    with worker.inside():
        if nft.run(f"list table {TABLE}\n") is not None:
            return  # none there
        refused = nft.run(f"delete table {TABLE}\n")
    if refused is not None:
        raise HostError(f"cannot remove the NAT table {TABLE} of an earlier --nat run: {refused}")
    log.warning(
        "removed the NAT table %s an earlier `roost serve --nat` left in %s: managed networks "
        "no longer reach the outside through it (start with --nat to keep them masqueraded)",
        TABLE,
        _where(worker),
    )
