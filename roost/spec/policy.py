"""Network policies: named sets of ingress and egress rules a VM's interface can attach.

A rule matches IP traffic by protocol, ports, ICMP type and addresses (CIDRs, or
`@<network>` for a registered network's IPv4 subnet and IPv6 prefix) and says what to do with
it. Ingress rules match traffic towards the VM, so they name its `source`; egress rules match
what the VM sends, so they name its `destination`. Field formats are pydantic's (their errors
carry the field's own loc); the rules that relate a rule's fields are `policy_errors`',
reported at `ingress.<i>.<field>` / `egress.<i>.<field>`.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator

from roost.errors import ErrorDetail, InvalidError
from roost.spec.common import DNS_LABEL, Name, Spec
from roost.spec.parse import details_of

# Rules are walked one after the other for every new connection a tap sees, and each is a few
# nftables rules (one per address family, one more to log); addresses are set elements, one
# lookup however many. So rules are capped low, addresses high: 256 rules are more than an
# Incus ACL or a security group holds in practice, and 10,000 addresses (a country's ranges, a
# cloud's published blocks) keep one policy's nftables transaction, applied while the daemon
# holds its host lock, well under a second.
MAX_RULES = 256
MAX_ADDRESSES = 10_000
MAX_DESCRIPTION = 256
MAX_ICMP_TYPE = 255
MAX_PORT = 65535
PORT = re.compile(r"(0|[1-9][0-9]{0,4})(-(0|[1-9][0-9]{0,4}))?")
NETWORK_REFERENCE = "@"


class Action(StrEnum):
    ALLOW = "allow"
    DROP = "drop"
    REJECT = "reject"


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    ICMP4 = "icmp4"
    ICMP6 = "icmp6"


class Direction(StrEnum):
    """Ingress: traffic towards the VM (out of its tap); egress: what the VM sends."""

    INGRESS = "ingress"
    EGRESS = "egress"


PORT_PROTOCOLS = (Protocol.TCP, Protocol.UDP)
ICMP_FAMILY = {Protocol.ICMP4: 4, Protocol.ICMP6: 6}
# the address list a rule of each direction names (the other end is the VM itself)
PEER_FIELD = {Direction.INGRESS: "source", Direction.EGRESS: "destination"}


def parse_port(value: Any) -> str:
    """A port (`"80"`) or an inclusive range (`"1000-2000"`), kept as written."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError('must be a port such as "80" or a range such as "1000-2000"')
    text = str(value)
    match = PORT.fullmatch(text)
    if match is None:
        raise ValueError(f'{text!r} is not a port such as "80" or a range such as "1000-2000"')
    low = int(match.group(1))
    high = low if match.group(3) is None else int(match.group(3))
    if high > MAX_PORT:
        raise ValueError(f"{text}: ports go up to {MAX_PORT}")
    if low > high:
        raise ValueError(f"{text}: a range goes from low to high; write {high}-{low}")
    return text


def port_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def parse_peer(value: Any) -> str:
    """A CIDR (`10.0.0.0/8`, `fd00::/8`; a bare address is one host) with no host bits, or
    `@<network name>`; kept exactly as written."""
    if not isinstance(value, str):
        raise ValueError('must be a string: a CIDR such as "10.0.0.0/8" or "@<network name>"')
    if value.startswith(NETWORK_REFERENCE):
        name = value.removeprefix(NETWORK_REFERENCE)
        if not DNS_LABEL.fullmatch(name):
            raise ValueError(
                f"{value!r} does not name a network: write @ and a network's name, e.g. @web "
                "(roost network list shows them)"
            )
        return value
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            f'{value!r} is not a CIDR such as "10.0.0.0/8" or "fd00::/8", nor "@<network name>"'
        ) from None
    if ipaddress.ip_interface(value).ip != network.network_address:
        raise ValueError(f"{value} has host bits set; did you mean {network}?")
    return value


def peer_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The CIDR a peer names, None for a `@network` reference."""
    if text.startswith(NETWORK_REFERENCE):
        return None
    return ipaddress.ip_network(text)


def _strict_int(value: Any) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError("must be a whole number")
    return value


def _strict_bool(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


Port = Annotated[str, BeforeValidator(parse_port)]
Peer = Annotated[str, BeforeValidator(parse_peer)]
Description = Annotated[str, Field(max_length=MAX_DESCRIPTION)]


class Rule(Spec):
    """One rule; unset matchers match anything (`protocol: null` is any IP protocol)."""

    action: Annotated[Action, BeforeValidator(_lower)]
    protocol: Annotated[Protocol | None, BeforeValidator(_lower)] = None
    source: list[Peer] | None = None
    destination: list[Peer] | None = None
    source_port: Port | None = None
    destination_port: Port | None = None
    icmp_type: Annotated[
        int | None, Field(ge=0, le=MAX_ICMP_TYPE), BeforeValidator(_strict_int)
    ] = None
    description: Description = ""
    log: Annotated[bool, BeforeValidator(_strict_bool)] = False

    @field_validator("source", "destination")
    @classmethod
    def _not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must not be empty: leave it out (or null) to match any address")
        return value

    def peers(self, direction: Direction) -> list[str] | None:
        """The addresses this rule names for `direction` (None: any)."""
        return self.source if direction is Direction.INGRESS else self.destination


class Policy(Spec):
    """A named policy, as stored and as `roost policy show` prints it."""

    name: Name
    description: Description = ""
    ingress: Annotated[list[Rule], Field(max_length=MAX_RULES)] = []
    egress: Annotated[list[Rule], Field(max_length=MAX_RULES)] = []

    def rules(self, direction: Direction) -> list[Rule]:
        return self.ingress if direction is Direction.INGRESS else self.egress


DefaultAction = Literal["allow", "drop"]


class PolicyDefaults(Spec):
    """What traffic no attached policy's rule decides gets, per direction (allow both: a VM
    without policies behaves as before policies existed)."""

    ingress: Annotated[DefaultAction, BeforeValidator(_lower)] = "allow"
    egress: Annotated[DefaultAction, BeforeValidator(_lower)] = "allow"


def rule_errors(rule: Rule, direction: Direction, loc: str) -> list[ErrorDetail]:
    """The rules that relate one rule's fields; `loc` is `ingress.<i>` or `egress.<i>`."""
    errors: list[ErrorDetail] = []

    def err(field: str, msg: str) -> None:
        errors.append(ErrorDetail(f"{loc}.{field}", msg))

    peer_field = PEER_FIELD[direction]
    other = PEER_FIELD[Direction.EGRESS if direction is Direction.INGRESS else Direction.INGRESS]
    if getattr(rule, other) is not None:
        end = "source" if direction is Direction.EGRESS else "destination"
        err(
            other,
            f"{direction} rules match traffic whose {end} is the VM itself, so they name only "
            f"{peer_field}; move these addresses to {peer_field}",
        )
    for field in ("source_port", "destination_port"):
        if getattr(rule, field) is not None and rule.protocol not in PORT_PROTOCOLS:
            err(
                field,
                f"needs protocol tcp or udp (ports mean nothing to {rule.protocol or 'any'} "
                "protocol)",
            )
    if rule.icmp_type is not None and rule.protocol not in ICMP_FAMILY:
        err("icmp_type", "needs protocol icmp4 or icmp6")
    peers = rule.peers(direction) or []
    families = {net.version for net in map(peer_network, peers) if net is not None}
    if len(families) > 1:
        err(
            peer_field,
            "mixes IPv4 and IPv6 addresses in one rule; write one rule per address family "
            "(a @network reference stands for both)",
        )
    wanted = ICMP_FAMILY.get(rule.protocol) if rule.protocol else None
    seen: dict[str, int] = {}
    kept = _EarlierNetworks()
    for index, peer in enumerate(peers):
        here = f"{peer_field}.{index}"
        if peer in seen:
            err(here, f"{peer} is listed twice (also at {peer_field}.{seen[peer]}); keep one")
            continue
        seen[peer] = index
        net = peer_network(peer)
        if net is None:
            continue
        if wanted is not None and net.version != wanted:
            err(here, f"{peer} is IPv{net.version}, but protocol {rule.protocol} is IPv{wanted}")
        other_index = kept.overlapping(net)
        if other_index is not None:
            err(
                here,
                f"{peer} overlaps {peers[other_index]} ({peer_field}.{other_index}); keep "
                "the wider one",
            )
        kept.add(net, index)
    return errors


class _EarlierNetworks:
    """The CIDRs of a list read so far, found by overlap in time that does not grow with the
    list (a policy may hold 10,000: comparing each with every earlier one took ~30 s). Two
    CIDRs overlap only when one holds the other: an earlier one holding a new one has one of
    its (at most 129) prefixes, and one inside it starts within its range."""

    def __init__(self) -> None:
        self._by_prefix: dict[tuple[int, int, int], int] = {}  # (version, length, start) → index
        self._lengths: dict[int, set[int]] = {4: set(), 6: set()}
        self._starts: dict[int, list[tuple[int, int]]] = {4: [], 6: []}  # sorted (start, index)

    def overlapping(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int | None:
        """The index of an earlier CIDR overlapping `net` (the first that holds it, else the
        lowest inside it), if any."""
        first, last = int(net.network_address), int(net.broadcast_address)
        found = []
        for length in self._lengths[net.version]:
            if length <= net.prefixlen:
                start = first & ~((1 << (net.max_prefixlen - length)) - 1)
                holder = self._by_prefix.get((net.version, length, start))
                if holder is not None:
                    found.append(holder)
        if found:
            return min(found)
        starts = self._starts[net.version]
        at = bisect.bisect_left(starts, (first, -1))
        return starts[at][1] if at < len(starts) and starts[at][0] <= last else None

    def add(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network, index: int) -> None:
        start = int(net.network_address)
        self._by_prefix.setdefault((net.version, net.prefixlen, start), index)
        self._lengths[net.version].add(net.prefixlen)
        bisect.insort(self._starts[net.version], (start, index))


def policy_errors(policy: Policy) -> list[ErrorDetail]:
    """Every rule of every direction checked, plus the cap on addresses per policy."""
    errors: list[ErrorDetail] = []
    addresses = 0
    for direction in Direction:
        for index, rule in enumerate(policy.rules(direction)):
            errors += rule_errors(rule, direction, f"{direction}.{index}")
            addresses += len(rule.peers(direction) or [])
    if addresses > MAX_ADDRESSES:
        errors.append(
            ErrorDetail(
                "-",
                f"names {addresses} addresses; a policy holds at most {MAX_ADDRESSES}: merge "
                "neighbouring CIDRs or split the policy in two",
            )
        )
    return errors


def parse_policy(data: Any, name: str | None = None) -> Policy:
    """A policy as a client sends it; `name` (the URL's, the CLI's NAME) fills a missing
    `name` and must equal a given one. Raises `InvalidError` with every problem's loc."""
    if not isinstance(data, dict):
        raise InvalidError.at("-", "must be a JSON object")
    if name is not None:
        given = data.get("name", name)
        if given != name:
            raise InvalidError.at(
                "name", f"is {given!r} but the policy being written is {name!r}; make them equal"
            )
        data = {**data, "name": name}
    try:
        policy = Policy.model_validate(data)
    except ValidationError as error:
        raise InvalidError.of(details_of(error)) from None
    errors = policy_errors(policy)
    if errors:
        raise InvalidError.of(errors)
    return policy


def parse_policy_defaults(data: Any, loc: str = "policy_defaults") -> PolicyDefaults:
    """`policy_defaults` as written, errors under `loc`."""
    try:
        return PolicyDefaults.model_validate(data)
    except ValidationError as error:
        raise InvalidError.of(
            [
                ErrorDetail(loc if d.loc == "-" else f"{loc}.{d.loc}", d.msg)
                for d in details_of(error)
            ]
        ) from None
