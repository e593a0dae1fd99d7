"""Placement's decision, a pure function of a snapshot of the hosts: who has room, who has what
a VM needs, emptiest first, and the errors that say why none may take it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roost.errors import ConflictError, NotFoundError
from roost.plan.placement import HostSnapshot, HostState, Need, chosen, place

HOST = HostSnapshot(
    id=1,
    name="h1",
    api="unix:///run/h1.sock",
    state=HostState.ACTIVE,
    labels={"zone": "a"},
    facts={"vmms": ["firecracker"], "vsock": ["firecracker"]},
    capacity_vcpus=16,
    capacity_memory_mib=8192,
    allocated_vcpus=0,
    allocated_memory_mib=0,
)
SMALL = Need(vcpus=1, memory_mib=256)


def host(number: int, **changes: object) -> HostSnapshot:
    return replace(HOST, id=number, name=f"h{number}", **changes)  # type: ignore[arg-type]


def test_the_emptiest_host_comes_first_and_full_offline_or_cordoned_ones_not_at_all() -> None:
    snapshot = [
        host(1, allocated_vcpus=8),
        host(2, allocated_memory_mib=1024),
        host(3),
        host(4, state=HostState.OFFLINE),
        host(5, state=HostState.CORDONED),
        host(6, allocated_vcpus=16),
    ]
    assert [found.name for found in place(snapshot, SMALL)] == ["h3", "h2", "h1"]


def test_hosts_lacking_what_a_vm_needs_come_last_naming_it() -> None:
    snapshot = [host(1, labels={"zone": "b"}), host(2, allocated_vcpus=12)]
    need = replace(SMALL, labels={"zone": "a"}, requires={"vmms": ["qemu"]})
    found = place(snapshot, need)
    assert [(c.name, c.missing) for c in found] == [
        ("h1", ["label zone=a", "vmms qemu"]),  # ineligible ones too by free capacity
        ("h2", ["vmms qemu"]),
    ]
    with pytest.raises(ConflictError) as refused:
        chosen(found, need)
    assert refused.value.code == "no_eligible_host"
    assert "h1: label zone=a, vmms qemu" in refused.value.message


def test_a_named_host_is_the_only_candidate_and_an_unknown_one_is_not_found() -> None:
    snapshot = [host(1), host(2)]
    assert [c.name for c in place(snapshot, replace(SMALL, host="h2"))] == ["h2"]
    with pytest.raises(NotFoundError):
        place(snapshot, replace(SMALL, host="h9"))
    full = replace(SMALL, host="h1", vcpus=17)
    with pytest.raises(ConflictError) as refused:
        chosen(place(snapshot, full), full)
    assert refused.value.code == "no_capacity"
    assert "host 'h1'" in refused.value.message


def test_no_host_with_room_is_no_capacity() -> None:
    with pytest.raises(ConflictError) as refused:
        chosen(place([host(1, state=HostState.OFFLINE)], SMALL), SMALL)
    assert refused.value.code == "no_capacity"


@given(
    st.lists(
        st.tuples(st.integers(0, 16), st.integers(0, 8192), st.sampled_from(list(HostState))),
        max_size=20,
    ),
    st.integers(0, 16),
    st.integers(0, 8192),
)
def test_every_candidate_is_active_and_has_room_and_every_such_host_is_one(
    hosts: list[tuple[int, int, HostState]], vcpus: int, memory: int
) -> None:
    snapshot = [
        host(n, allocated_vcpus=v, allocated_memory_mib=m, state=state)
        for n, (v, m, state) in enumerate(hosts)
    ]
    found = {c.name for c in place(snapshot, Need(vcpus=vcpus, memory_mib=memory))}
    fits = {
        h.name
        for h in snapshot
        if h.state is HostState.ACTIVE
        and h.allocated_vcpus + vcpus <= h.capacity_vcpus
        and h.allocated_memory_mib + memory <= h.capacity_memory_mib
    }
    assert found == fits
