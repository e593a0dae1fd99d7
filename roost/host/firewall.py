"""Anti-spoofing with nftables: a tap may only send as the guest roost configured.

One bridge-family table `roost` in the daemon's namespace; each tap gets a chain, reached
through a verdict map keyed by the tap's name, so adding or removing a VM touches only its
own chain and map element (one atomic `nft -f` batch each).
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from roost.errors import HostError
from roost.host.netns import NetnsWorker

log = logging.getLogger(__name__)
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


class Firewall:
    """Per-tap rules; a no-op (with a warning at start) where `nft` is missing."""

    def __init__(self, worker: NetnsWorker) -> None:
        self._worker = worker
        self._nft = shutil.which("nft")
        if self._nft is None:
            log.warning("nft not found: taps get no anti-spoofing rules (install nftables)")
            return
        if self._run(f"list table {TABLE}\n", check=False) != 0:
            self._run(BASE)

    @property
    def enabled(self) -> bool:
        return self._nft is not None

    def _run(self, script: str, *, check: bool = True) -> int:
        assert self._nft is not None
        process = self._worker.spawn(
            [self._nft, "-f", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, errors = process.communicate(script.encode(), timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise HostError("nft did not finish within 30 s") from None
        if check and process.returncode != 0:
            raise HostError(f"nftables refused the rules: {errors.decode().strip()}")
        return process.returncode

    def protect(self, tap: str, mac: str, ip: str | None) -> None:
        """Let `tap` send only IPv4 and ARP, from `mac`, never as a DHCP server, and — when
        `ip` is given — only from `ip`. (IPv6 is not supported yet, so it is not let out.)"""
        if not self.enabled:
            return
        chain = f"vm-{tap}"
        lines = [
            f"add chain {TABLE} {chain}",
            f"flush chain {TABLE} {chain}",
            f"add rule {TABLE} {chain} ether saddr != {mac} drop",
            f"add rule {TABLE} {chain} ether type != {{ ip, arp }} drop",
            f"add rule {TABLE} {chain} udp sport 67 drop",
        ]
        if ip is not None:
            lines += [
                f"add rule {TABLE} {chain} ether type ip ip saddr != {ip} drop",
                f"add rule {TABLE} {chain} ether type arp arp saddr ip != {ip} drop",
            ]
        lines.append(f'add element {TABLE} taps {{ "{tap}" : jump {chain} }}')
        self._run("\n".join(lines) + "\n")

    def release(self, tap: str) -> None:
        """Remove the tap's rules, if it has any."""
        if not self.enabled:
            return
        chain = f"vm-{tap}"
        self._run(f'delete element {TABLE} taps {{ "{tap}" }}\n', check=False)
        self._run(f"flush chain {TABLE} {chain}\ndelete chain {TABLE} {chain}\n", check=False)
