"""Anti-spoofing with nftables: a tap may only send as the guest roost configured.

One bridge-family table `roost` in the daemon's namespace; each tap gets a chain, reached
through a verdict map keyed by the tap's name, so adding or removing a VM touches only its
own chain and map element (one atomic batch each). The batches are the text `nft -f` reads,
run by libnftables (the library behind `nft`) in the daemon itself, from the calling thread
(inside the namespace for the moment): no process per VM, no hand-over to another thread.
"""

from __future__ import annotations

import ctypes
import logging
import threading

from roost.errors import HostError
from roost.host.netns import NetnsWorker

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
