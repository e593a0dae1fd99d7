"""Anti-spoofing with nftables: a tap may only send as the guest roost configured.

One bridge-family table `roost` in the daemon's namespace; each tap gets a chain, reached
through a verdict map keyed by the tap's name, so adding or removing a VM touches only its
own chain and map element (one atomic batch each). The batches are the text `nft -f` reads,
run by libnftables (the library behind `nft`) in the daemon itself, from the calling thread
(inside the namespace for the moment): no process per VM, no hand-over to another thread.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import threading
from collections.abc import Sequence

from roost.errors import HostError
from roost.host.netns import NetnsWorker
from roost.plan.ipv6 import link_local

log = logging.getLogger(__name__)
LIBRARY = "libnftables.so.1"
TABLE = "bridge roost"
BASE = f"""
table {TABLE} {{
    map taps {{ type ifname : verdict; }}
    chain antispoof {{
        type filter hook prerouting priority -200; policy accept;
        iifname vmap @taps
    }}
}}
"""

# the comments naming the IPv6 drop rules (what each drops), for whoever reads their counters
DROPS = {
    "dhcpv6": "DHCPv6 server",
    "router": "router advertisement or redirect",
    "source": "spoofed IPv6 source",
    "dad": "unspecified source, not duplicate address detection",
    "neighbour": "neighbour advertisement for another address",
    "probe": "duplicate address detection for another address",
}
# what a guest sends from :: while its addresses are tentative (RFC 4862 5.4, RFC 3810 5.2.13)
DAD_TYPES = "nd-neighbor-solicit, mld2-listener-report, mld-listener-report"


def tap_rules(tap: str, mac: str, ip: str | None, ipv6: Sequence[str] | None = None) -> str:
    """The batch that (re)makes `tap`'s chain: frames only from `mac`, IPv4 and ARP (only from
    `ip` when given), never a DHCP server's. Without `ipv6` no IPv6 at all (a network without
    a prefix); with it, IPv6 too but only from those addresses, the link-local address of
    `mac` and `::` (duplicate address detection of those only), never a router advertisement or
    redirect, never a DHCPv6 server's answer, never a neighbour advertisement for another
    address. The IPv6 drop rules count what they drop, each named by its comment."""
    chain = f"vm-{tap}"
    rule = f"add rule {TABLE} {chain}"
    kinds = "ip, arp" if ipv6 is None else "ip, arp, ip6"
    lines = [
        f"add chain {TABLE} {chain}",
        f"flush chain {TABLE} {chain}",
        f"{rule} ether saddr != {mac} drop",
        f"{rule} ether type != {{ {kinds} }} drop",
        f"{rule} udp sport 67 drop",
        # a client takes a DHCP server's answer from any source port: what goes to its port
        f"{rule} udp dport 68 drop",
    ]
    if ip is not None:
        lines += [
            f"{rule} ether type ip ip saddr != {ip} drop",
            f"{rule} ether type arp arp saddr ip != {ip} drop",
        ]
    if ipv6 is not None:
        own = sorted({ipaddress.IPv6Address(address) for address in ipv6} | {link_local(mac)})
        sources = ", ".join(str(address) for address in own)
        targets = ", ".join(f"0x{int(address):032x}" for address in own)
        v6 = f"{rule} ether type ip6"
        lines += [
            f'{v6} udp sport 547 counter drop comment "{DROPS["dhcpv6"]}"',
            # a client takes a server's answer from any port: what goes to its port is one
            f'{v6} udp dport 546 counter drop comment "{DROPS["dhcpv6"]}"',
            f"{v6} icmpv6 type {{ nd-router-advert, nd-redirect }} counter drop "
            f'comment "{DROPS["router"]}"',
            f'{v6} ip6 saddr != {{ ::, {sources} }} counter drop comment "{DROPS["source"]}"',
            f'{v6} ip6 saddr :: meta l4proto != ipv6-icmp counter drop comment "{DROPS["dad"]}"',
            f"{v6} ip6 saddr :: icmpv6 type != {{ {DAD_TYPES} }} counter drop "
            f'comment "{DROPS["dad"]}"',
            # a probe from :: for an address makes a guest still checking it give it up
            f"{v6} ip6 saddr :: icmpv6 type nd-neighbor-solicit @th,64,128 != {{ {targets} }} "
            f'counter drop comment "{DROPS["probe"]}"',
            # the target of a neighbour advertisement (bytes 8-23 of the ICMPv6 message)
            f"{v6} icmpv6 type nd-neighbor-advert @th,64,128 != {{ {targets} }} counter drop "
            f'comment "{DROPS["neighbour"]}"',
        ]
    lines.append(f'add element {TABLE} taps {{ "{tap}" : jump {chain} }}')
    return "\n".join(lines) + "\n"


class Nftables:
    """One libnftables context: made on the namespace's thread, used by one thread at a time,
    each inside the namespace (its netlink socket must live there)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        library.nft_ctx_new.restype = ctypes.c_void_p
        library.nft_ctx_new.argtypes = [ctypes.c_uint32]
        library.nft_ctx_free.argtypes = [ctypes.c_void_p]
        library.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        library.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        library.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        library.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        library.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._library = library
        self._context = library.nft_ctx_new(0)
        if not self._context:
            raise HostError("libnftables could not make a context")
        library.nft_ctx_buffer_output(self._context)  # what `list` prints is not wanted
        library.nft_ctx_buffer_error(self._context)

    def run(self, script: str) -> str | None:
        """Run `script` as one atomic batch; None on success, else what nftables said."""
        if self._library.nft_run_cmd_from_buffer(self._context, script.encode()) == 0:
            return None
        said = self._library.nft_ctx_get_error_buffer(self._context) or b""
        return said.decode(errors="replace").strip() or "no reason given"

    def free(self) -> None:
        self._library.nft_ctx_free(self._context)


def nftables_in(worker: NetnsWorker) -> Nftables | None:
    """A libnftables context for the worker's namespace, freed when the worker closes; None
    where libnftables is missing."""
    try:
        library = ctypes.CDLL(LIBRARY)
    except OSError:
        return None
    nft = worker.run(Nftables, library)
    worker.on_close(nft.free)
    return nft


class Firewall:
    """Per-tap rules; a no-op (with a warning at start) where libnftables is missing."""

    def __init__(self, worker: NetnsWorker) -> None:
        self._worker = worker
        self._nft = nftables_in(worker)
        if self._nft is None:
            log.warning("%s not found: taps get no anti-spoofing rules (install nftables)", LIBRARY)
            return
        self._lock = threading.Lock()
        if self._run(f"list table {TABLE}\n", check=False) is not None:
            self._run(BASE)

    @property
    def enabled(self) -> bool:
        return self._nft is not None

    def _run(self, script: str, *, check: bool = True) -> str | None:
        assert self._nft is not None
        with self._lock, self._worker.inside():
            refused = self._nft.run(script)
        if check and refused is not None:
            raise HostError(f"nftables refused the rules: {refused}")
        return refused

    def protect(
        self, tap: str, mac: str, ip: str | None, ipv6: Sequence[str] | None = None
    ) -> None:
        """Let `tap` send only from `mac`, never as a DHCP server, IPv4 and ARP only from `ip`
        when it is given, and IPv6 only when `ipv6` (its addresses on a network with a prefix)
        is given; see `tap_rules`."""
        if not self.enabled:
            return
        self._run(tap_rules(tap, mac, ip, ipv6))

    def release(self, tap: str) -> None:
        """Remove the tap's rules, if it has any: one batch that first makes them (nothing
        where they exist), so it cannot fail. A batch nftables refuses costs ≈ 15 ms here
        (libnftables then reads the whole ruleset to say why), one it takes ≈ 0.2 ms, and every
        vm rm runs this for each tap its VM has had, started or not, under the lock."""
        if not self.enabled:
            return
        chain = f"vm-{tap}"
        self._run(
            f"add chain {TABLE} {chain}\n"
            f'add element {TABLE} taps {{ "{tap}" : jump {chain} }}\n'
            f'delete element {TABLE} taps {{ "{tap}" }}\n'
            f"flush chain {TABLE} {chain}\n"
            f"delete chain {TABLE} {chain}\n",
            check=False,
        )
