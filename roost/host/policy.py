"""Network policies in the daemon's namespace: roost.plan.policy's statements, run by
libnftables, each change in one atomic transaction, plus the counters they keep.

Only roost's own tables `inet roost_policy` and `bridge roost_policy` are touched; the
anti-spoofing table `bridge roost` (roost.host.firewall) runs before them (see
roost.plan.policy for the priorities and why).
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from roost.errors import HostError
from roost.host import sysctl
from roost.host.firewall import LIBRARY, Nftables
from roost.host.netns import NetnsWorker
from roost.plan.policy import (
    BRIDGE_TABLE,
    INET_TABLE,
    LOG_GROUP,
    SHORT,
    NetworkLookup,
    TapPolicies,
    base_ruleset,
    parse_comment,
    parse_default_comment,
    remove_attachment_ruleset,
    tap_map,
    transaction,
)
from roost.spec.policy import Action, Direction, Policy

OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
PROBE = "roost_policy_probe"
# what policies need from the kernel, each tried in a dry run (nothing is made)
PROBES = (
    (
        "nftables conntrack matching in the inet family (ct state): policies could not let "
        "replies through",
        "inet",
        "ct state established,related accept",
    ),
    (
        "nftables reject in the inet family: reject rules could not answer",
        "inet",
        "meta l4proto tcp reject with tcp reset",
    ),
    ("the nftables bridge family (marks and verdict maps by port name)", "bridge", "meta mark 1"),
    ("NFLOG (nftables `log group`): rules with log: true could not log", "inet", "log group 1"),
)
BRIDGE_SYSCTLS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")


@dataclass(frozen=True)
class Count:
    packets: int
    bytes: int

    def __add__(self, other: Count) -> Count:
        return Count(self.packets + other.packets, self.bytes + other.bytes)


@dataclass(frozen=True)
class Counters:
    """What the policy rules matched since they were last (re)made: per policy rule (over
    every tap attaching the policy) and per attachment's default verdict (over every tap
    with that attachment; `PolicyFirewall.attachment_of` names a tap's)."""

    rules: dict[tuple[str, Direction, int], Count]
    defaults: dict[tuple[str, Direction], Count]


class PolicyNftables(Nftables):
    """A libnftables context that can also answer in JSON and try a script without making
    anything (dry run)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        super().__init__(library)
        library.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        library.nft_ctx_output_get_flags.restype = ctypes.c_uint
        library.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        library.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        library.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        library.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        flags = library.nft_ctx_output_get_flags(self._context)
        library.nft_ctx_output_set_flags(self._context, flags | OUTPUT_JSON)

    def query(self, command: str) -> Any:
        """What a `list` command prints, parsed; HostError when nftables refuses it."""
        refused = self.run(command + "\n")
        if refused is not None:
            raise HostError(f"nftables refused {command!r}: {refused}")
        output = self._library.nft_ctx_get_output_buffer(self._context) or b"{}"
        return json.loads(output)

    def dry_run(self, script: str) -> str | None:
        self._library.nft_ctx_set_dry_run(self._context, True)
        try:
            return self.run(script)
        finally:
            self._library.nft_ctx_set_dry_run(self._context, False)


def _context(worker: NetnsWorker) -> PolicyNftables:
    try:
        library = ctypes.CDLL(LIBRARY)
    except OSError:
        raise HostError(
            f"network policies need {LIBRARY} (Debian: apt-get install libnftables1)"
        ) from None
    nft = worker.run(PolicyNftables, library)
    worker.on_close(nft.free)
    return nft


def kernel_gaps(worker: NetnsWorker) -> list[str]:
    """What the namespace's kernel lacks for policies, each said in words (empty: nothing)."""
    nft = _context(worker)
    gaps = []
    with worker.inside():
        for what, family, rule in PROBES:
            hook = "forward" if family == "inet" else "prerouting"
            script = (
                f"add table {family} {PROBE}\n"
                f"add chain {family} {PROBE} probe {{ type filter hook {hook} priority 0; }}\n"
                f"add rule {family} {PROBE} probe {rule}\n"
            )
            refused = nft.dry_run(script)
            if refused is not None:
                gaps.append(f"{what} ({refused.splitlines()[0]})")
        for name in BRIDGE_SYSCTLS:
            try:
                value = sysctl.read(name)
            except HostError:
                gaps.append(f"br_netfilter ({name} is missing): no state for bridged traffic")
                continue
            if value != "1":
                gaps.append(
                    f"{name} is {value}: bridged traffic has no conntrack state, so replies "
                    f"meet the policies as new traffic (set it to 1)"
                )
    return gaps


class PolicyFirewall:
    """roost's policy tables in one namespace: made at start (adopting the taps' attachments
    an earlier daemon left), then changed only in whole transactions."""

    def __init__(self, worker: NetnsWorker, log_group: int = LOG_GROUP) -> None:
        self._worker = worker
        self._log_group = log_group
        self._nft = _context(worker)
        self._lock = threading.RLock()  # apply holds it from planning to running
        self._run(base_ruleset())
        self._taps = self._attached()
        in_use = set(self._taps.values())
        stale = [name for name in self._attachments() if name not in in_use]
        self._run([line for name in stale for line in remove_attachment_ruleset(name)])

    def _run(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        with self._lock, self._worker.inside():
            refused = self._nft.run("\n".join(lines) + "\n")
        if refused is not None:
            raise HostError(f"nftables refused the policy rules: {refused}")

    def _query(self, command: str) -> list[dict[str, Any]]:
        with self._lock, self._worker.inside():
            listing = self._nft.query(command)
        items: list[dict[str, Any]] = listing.get("nftables", [])
        return items

    def _attached(self) -> dict[str, str]:
        """Each tap's attachment, as the ingress map holds it."""
        taps = {}
        for item in self._query(f"list map {BRIDGE_TABLE} {tap_map(Direction.INGRESS)}"):
            for tap, verdict in item.get("map", {}).get("elem", []):
                chain = verdict["jump"]["target"]
                taps[tap] = chain.removesuffix(f"-{SHORT[Direction.INGRESS]}")
        return taps

    def _attachments(self) -> set[str]:
        """Every attachment with chains in the table."""
        suffix = f"-{SHORT[Direction.INGRESS]}"
        return {
            item["chain"]["name"].removesuffix(suffix)
            for item in self._query("list chains bridge")
            if "chain" in item
            and item["chain"]["table"] == BRIDGE_TABLE.split()[1]
            and item["chain"]["name"].startswith("a-")
            and item["chain"]["name"].endswith(suffix)
        }

    def apply(
        self,
        *,
        policies: Sequence[Policy] = (),
        taps: Sequence[TapPolicies] = (),
        removed_taps: Sequence[str] = (),
        removed_policies: Sequence[str] = (),
        lookup: NetworkLookup,
    ) -> None:
        """One atomic transaction: (re)make `policies` (for every tap attaching them at once),
        attach `taps`, detach `removed_taps`, remove attachments no tap uses any more, then
        `removed_policies`. A tap's policies must be made in this call or an earlier one. A
        tap is attached by name: it may be attached before it exists, so a VMM never sends
        through it unfiltered."""
        with self._lock:
            planned = transaction(
                current=self._taps,
                policies=policies,
                taps=taps,
                removed_taps=removed_taps,
                removed_policies=removed_policies,
                lookup=lookup,
                log_group=self._log_group,
            )
            self._run(planned.lines)
            self._taps = planned.taps

    def release(self, tap: str) -> None:
        """Detach the tap, if it is attached."""
        self.apply(removed_taps=[tap], lookup=lambda name: None)

    def attachment_of(self, tap: str) -> str | None:
        return self._taps.get(tap)

    def attached_taps(self) -> set[str]:
        """Every tap attached now (those an earlier daemon left among them)."""
        return set(self._taps)

    def made_policies(self) -> set[str]:
        """Every policy with chains in the table (one a daemon that died while creating it
        made but never stored among them)."""
        suffix = f"-{SHORT[Direction.INGRESS]}-{Action.ALLOW}"
        return {
            name.removeprefix("p-").removesuffix(suffix)
            for item in self._query(f"list chains {BRIDGE_TABLE.split()[0]}")
            if "chain" in item and item["chain"]["table"] == BRIDGE_TABLE.split()[1]
            for name in (item["chain"]["name"],)
            if name.startswith("p-") and name.endswith(suffix)
        }

    def counters(self) -> Counters:
        """Every policy rule's and attachment default's counters, read in one listing."""
        rules: dict[tuple[str, Direction, int], Count] = {}
        defaults: dict[tuple[str, Direction], Count] = {}
        for item in self._query(f"list table {BRIDGE_TABLE}"):
            rule = item.get("rule")
            if rule is None or "comment" not in rule:
                continue
            count = next(
                (Count(**expr["counter"]) for expr in rule["expr"] if "counter" in expr), None
            )
            if count is None:
                continue
            named = parse_comment(rule["comment"])
            if named is not None:
                rules[named] = rules.get(named, Count(0, 0)) + count
            default = parse_default_comment(rule["comment"])
            if default is not None:
                defaults[default] = defaults.get(default, Count(0, 0)) + count
        return Counters(rules, defaults)

    def remove_tables(self) -> None:
        """Remove both tables (a daemon that no longer enforces policies)."""
        lines = []
        for table in (INET_TABLE, BRIDGE_TABLE):
            lines += [f"add table {table}", f"delete table {table}"]
        self._run(lines)
        self._taps = {}
