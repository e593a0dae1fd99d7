"""The engine's part of `GET /metrics`: what it observes as it works (how long creates, starts
and stops take; how VMMs end) and, read from the database at each scrape, how many VMs are in
each status and how full each network is.

The metrics belong to no registry of their own: each API app collects them into its own
(`roost.api.metrics`), so tests can build several apps over one engine.
"""

from __future__ import annotations

import functools
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import case, func, select

from roost.host.policy import Count
from roost.spec import NetworkMode
from roost.spec.policy import Direction
from roost.state.db import Database
from roost.state.models import VM, IPLease, Network
from roost.state.vms import VMStatus

OPERATIONS = ("create", "start", "stop")
OUTCOMES = (VMStatus.STOPPED, VMStatus.CRASHED)
# from a stop of a VMM that is already gone (milliseconds) to a TCG boot (a minute)
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MULTI = "multi"  # the mode label of a VM with several interfaces
_SINGLE_MODE = VM.network[("network", "mode")].as_string()
_MODE = case(
    (_SINGLE_MODE.is_not(None), _SINGLE_MODE),
    (func.json_array_length(VM.network["interfaces"]) > 1, MULTI),
)

RuleCounters = Callable[[], Mapping[tuple[str, Direction, int], Count]]

P = ParamSpec("P")
T = TypeVar("T")


class EngineMetrics:
    """Durations and VMM exits as the engine observes them, and the state at scrape time.
    Every series of a known label value is there from the start, at zero, so that rates and
    sums over it are defined before the first VM."""

    def __init__(
        self, db: Database, vmms: Iterable[str], policy_rules: RuleCounters = dict
    ) -> None:
        self.db = db
        # the host this agent is, in a cluster (set when it joins): its VMs are the ones
        # counted, each agent exporting its own (a scrape of every agent sums to the cluster)
        self.host_id: int | None = None
        self.vmms = tuple(vmms)
        self.policy_rules = policy_rules
        self.durations = Histogram(
            "roost_vm_operation_duration_seconds",
            "How long a VM operation took, for those that succeeded: create (recorded, and "
            "booted unless created without a start), start (planned to booted) and stop "
            "(of a running VMM, to its end)",
            ["operation"],
            buckets=BUCKETS,
            registry=None,
        )
        self.exits = Counter(
            "roost_vmm_exits",
            "VMMs that ended, by VMM and by how their VM ended: stopped (asked to, or "
            "exit code 0) or crashed",
            ["vmm", "outcome"],
            registry=None,
        )
        for operation in OPERATIONS:
            self.durations.labels(operation)
        for vmm in self.vmms:
            for outcome in OUTCOMES:
                self.exits.labels(vmm, outcome)

    def observe(self, operation: str, seconds: float) -> None:
        self.durations.labels(operation).observe(seconds)

    def vmm_exited(self, vmm: str, outcome: str) -> None:
        self.exits.labels(vmm, outcome).inc()

    def collect(self) -> Iterator[Metric]:
        """Called by a registry at each scrape, on a thread that may wait for the database."""
        yield from self.durations.collect()
        yield from self.exits.collect()
        yield from self._state()
        yield from self._policy_rules()

    def _policy_rules(self) -> Iterator[Metric]:
        """Each policy rule's matches (over every tap attaching its policy), as nftables
        counts them: they restart from zero when the policy is replaced."""
        labels = ["policy", "direction", "rule"]
        packets = CounterMetricFamily(
            "roost_policy_rule_packets", "Packets a network policy's rule matched", labels=labels
        )
        octets = CounterMetricFamily(
            "roost_policy_rule_bytes", "Bytes a network policy's rule matched", labels=labels
        )
        for (policy, direction, index), count in sorted(self.policy_rules().items()):
            packets.add_metric([policy, direction, str(index)], count.packets)
            octets.add_metric([policy, direction, str(index)], count.bytes)
        yield packets
        yield octets

    def _state(self) -> Iterator[Metric]:
        with self.db.read() as session:
            counts = select(VM.status, _MODE, VM.vmm_kind, func.count()).group_by(
                VM.status, _MODE, VM.vmm_kind
            )
            if self.host_id is not None:
                counts = counts.where(VM.host_id == self.host_id)
            vms = session.execute(counts).all()
            networks = session.execute(
                select(Network.name, Network.first, Network.last, func.count(IPLease.ip))
                .outerjoin(IPLease, IPLease.network_id == Network.id)
                .group_by(Network.id)
                .order_by(Network.name)
            ).all()
        counted = Tally({(status, mode, vmm): count for status, mode, vmm, count in vms})
        by_status = GaugeMetricFamily(
            "roost_vms", "VMs by status, network mode and VMM", labels=["status", "mode", "vmm"]
        )
        kinds = dict.fromkeys([*self.vmms, *(vmm for _, _, vmm in counted)])
        for vmm in kinds:
            for mode in (*NetworkMode, MULTI):
                for status in VMStatus:
                    by_status.add_metric([status, mode, vmm], counted[(status, mode, vmm)])
        yield by_status
        leases = GaugeMetricFamily(
            "roost_network_leases", "Addresses leased on a network", labels=["network"]
        )
        size = GaugeMetricFamily(
            "roost_network_size",
            "Addresses a network has for VMs (its subnet but network, broadcast and gateway)",
            labels=["network"],
        )
        for name, first, last, leased in networks:
            leases.add_metric([name], leased)
            # an external network registered without a subnet has no size roost knows
            if first is not None and last is not None:
                size.add_metric([name], last - first - 2)
        yield leases
        yield size


class _Measured(Protocol):
    metrics: EngineMetrics


S = TypeVar("S", bound=_Measured)


def timed(
    operation: str,
) -> Callable[[Callable[Concatenate[S, P], T]], Callable[Concatenate[S, P], T]]:
    """Observe how long each call of an engine method that succeeds takes, as `operation`."""

    def decorate(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
        @functools.wraps(method)
        def measured(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            began = time.monotonic()
            result = method(self, *args, **kwargs)
            self.metrics.observe(operation, time.monotonic() - began)
            return result

        return measured

    return decorate
