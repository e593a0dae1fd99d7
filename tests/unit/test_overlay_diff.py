"""The overlay's diff: what the host has against what the database wants gives the fewest
changes that make them equal."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given
from hypothesis import strategies as st

from roost.engine.overlay import (
    Changes,
    FdbChange,
    Member,
    Segment,
    diff,
    segments,
    wanted_forwarding,
)
from roost.host.vxlan import VXLAN_PORT, Forwarding, VxlanDevice

LOCAL = "192.0.2.1"
VTEPS = [LOCAL, "192.0.2.2", "192.0.2.3", "192.0.2.4"]
MACS = [f"02:00:00:00:00:{i:02x}" for i in range(6)]


def device(
    vni: int,
    bridge: str = "br-a",
    mtu: int = 1450,
    flood: frozenset[str] = frozenset(),
    macs: Mapping[str, str] | None = None,
    *,
    local: str = LOCAL,
    learning: bool = False,
) -> VxlanDevice:
    return VxlanDevice(
        vni, local, VXLAN_PORT, learning, mtu, bridge, True, Forwarding(flood, macs or {})
    )


def segment(
    vni: int,
    peers: frozenset[str] = frozenset(),
    macs: Mapping[str, str] | None = None,
    bridge: str = "br-a",
    mtu: int = 1450,
) -> Segment:
    return Segment(vni, bridge, mtu, peers, macs or {})


def applied(present: Mapping[int, VxlanDevice], changes: Changes) -> dict[int, VxlanDevice]:
    """What the kernel has after `changes` (the same rules as roost.host.vxlan: a device made
    again as wanted starts without entries)."""
    after = {vni: dev for vni, dev in present.items() if vni not in changes.remove}
    for wanted in changes.ensure:
        kept = after.get(wanted.vni)
        forwarding = Forwarding()
        if kept is not None and kept.local == LOCAL and not kept.learning:
            forwarding = kept.forwarding
        after[wanted.vni] = VxlanDevice(
            wanted.vni, LOCAL, VXLAN_PORT, False, wanted.mtu, wanted.bridge, True, forwarding
        )
    for change in changes.fdb:
        dev = after[change.vni]
        flood = (dev.forwarding.flood | change.flood_add) - change.flood_remove
        macs = {**dev.forwarding.macs, **change.macs_replace}
        for mac in change.macs_remove:
            macs.pop(mac, None)
        after[change.vni] = VxlanDevice(
            dev.vni,
            dev.local,
            dev.port,
            dev.learning,
            dev.mtu,
            dev.master,
            dev.up,
            Forwarding(frozenset(flood), macs),
        )
    return after


vnis = st.integers(1, 4)
forwardings = st.fixed_dictionaries(
    {
        "flood": st.frozensets(st.sampled_from(VTEPS)),
        "macs": st.dictionaries(st.sampled_from(MACS), st.sampled_from(VTEPS)),
    }
)
any_segments = st.builds(
    segment,
    vni=vnis,
    peers=st.frozensets(st.sampled_from(VTEPS)),
    macs=st.dictionaries(
        st.sampled_from([*MACS, *(m.upper() for m in MACS)]), st.sampled_from(VTEPS)
    ),
    bridge=st.sampled_from(["br-a", "br-b"]),
    mtu=st.sampled_from([1400, 1450]),
)
devices = st.builds(
    lambda vni, bridge, mtu, fwd, local, learning: device(
        vni,
        bridge,
        mtu,
        frozenset(fwd["flood"] - {LOCAL}),
        {m: v for m, v in fwd["macs"].items() if v != LOCAL},
        local=local,
        learning=learning,
    ),
    vni=vnis,
    bridge=st.sampled_from(["br-a", "br-b"]),
    mtu=st.sampled_from([1400, 1450, 1500]),
    fwd=forwardings,
    local=st.sampled_from([LOCAL, "192.0.2.9"]),
    learning=st.booleans(),
)


@given(
    st.lists(any_segments, unique_by=lambda s: s.vni), st.lists(devices, unique_by=lambda d: d.vni)
)
def test_the_changes_make_the_host_what_is_wanted_and_then_nothing_is_left_to_do(
    wanted: list[Segment], have: list[VxlanDevice]
) -> None:
    present = {dev.vni: dev for dev in have}
    after = applied(present, diff(wanted, present, LOCAL))
    assert after.keys() == {s.vni for s in wanted}
    for s in wanted:
        dev = after[s.vni]
        assert (dev.master, dev.mtu, dev.local) == (s.bridge, s.mtu, LOCAL)
        assert dev.forwarding == wanted_forwarding(s, LOCAL)
    assert not diff(wanted, after, LOCAL)


@given(
    st.lists(any_segments, unique_by=lambda s: s.vni), st.lists(devices, unique_by=lambda d: d.vni)
)
def test_a_change_touches_only_entries_that_differ(
    wanted: list[Segment], have: list[VxlanDevice]
) -> None:
    present = {dev.vni: dev for dev in have}
    for change in diff(wanted, present, LOCAL).fdb:
        dev = present.get(change.vni)
        if dev is None or dev.local != LOCAL or dev.learning:
            continue  # made again, empty: everything is added
        assert not change.flood_add & dev.forwarding.flood
        assert change.flood_remove <= dev.forwarding.flood
        assert all(dev.forwarding.macs.get(m) != v for m, v in change.macs_replace.items())
        assert change.macs_remove <= dev.forwarding.macs.keys()


def test_a_mac_gone_from_the_database_is_removed_and_nothing_else_is_touched() -> None:
    present = {7: device(7, flood=frozenset({"192.0.2.2"}), macs={MACS[0]: "192.0.2.2"})}
    wanted = [segment(7, peers=frozenset({"192.0.2.2"}))]
    assert diff(wanted, present, LOCAL) == Changes(
        fdb=(FdbChange(7, macs_remove=frozenset({MACS[0]})),)
    )


def test_a_moved_mac_is_replaced_and_a_new_peer_flooded_to() -> None:
    present = {7: device(7, flood=frozenset({"192.0.2.2"}), macs={MACS[0]: "192.0.2.2"})}
    wanted = [segment(7, frozenset({"192.0.2.2", "192.0.2.3"}), {MACS[0]: "192.0.2.3"})]
    assert diff(wanted, present, LOCAL) == Changes(
        fdb=(FdbChange(7, flood_add=frozenset({"192.0.2.3"}), macs_replace={MACS[0]: "192.0.2.3"}),)
    )


def test_own_vtep_and_the_flood_mac_are_never_written() -> None:
    wanted = [
        segment(
            7,
            frozenset({LOCAL, "192.0.2.2"}),
            {MACS[0]: LOCAL, "00:00:00:00:00:00": "192.0.2.2", MACS[1].upper(): "192.0.2.2"},
        )
    ]
    assert diff(wanted, {}, LOCAL) == Changes(
        ensure=(wanted[0],),
        fdb=(
            FdbChange(7, flood_add=frozenset({"192.0.2.2"}), macs_replace={MACS[1]: "192.0.2.2"}),
        ),
    )


def test_a_device_no_network_wants_is_removed_and_one_made_otherwise_is_made_again() -> None:
    present = {
        3: device(3),
        7: device(7, flood=frozenset({"192.0.2.2"}), local="192.0.2.9"),
        8: device(8, mtu=1500),
    }
    wanted = [segment(7, frozenset({"192.0.2.2"})), segment(8)]
    assert diff(wanted, present, LOCAL) == Changes(
        remove=(3,),
        ensure=(wanted[0], wanted[1]),
        fdb=(FdbChange(7, flood_add=frozenset({"192.0.2.2"})),),
    )


def test_nothing_to_do_when_the_host_is_as_wanted() -> None:
    present = {7: device(7, flood=frozenset({"192.0.2.2"}), macs={MACS[0]: "192.0.2.2"})}
    wanted = [segment(7, frozenset({"192.0.2.2"}), {MACS[0]: "192.0.2.2"})]
    assert not diff(wanted, present, LOCAL)


def test_a_host_wants_the_networks_it_has_a_part_in_with_the_other_hosts_as_peers() -> None:
    a, b, c = VTEPS[0], VTEPS[1], VTEPS[2]
    members = [
        Member(7, "br-x", 1450, a, "02:00:00:00:07:0A"),
        Member(7, "br-x", 1450, b, "02:00:00:00:07:0b"),
        Member(7, "br-x", 1450, b, "02:00:00:00:07:0c"),
        Member(7, "br-x", 1450, c),  # the gateway's host, without a VM on it
        Member(8, "br-y", 1400, b, "02:00:00:00:08:0b"),  # no part of a's: not wanted
        Member(9, "br-z", 1450, a),  # a carries the gateway, nobody else anything
    ]
    assert segments(a, members) == [
        Segment(
            7,
            "br-x",
            1450,
            frozenset({b, c}),
            {"02:00:00:00:07:0b": b, "02:00:00:00:07:0c": b},
        ),
        Segment(9, "br-z", 1450, frozenset(), {}),
    ]
    assert [s.vni for s in segments(c, members)] == [7]
    assert segments(c, members)[0].macs == {"02:00:00:00:07:0a": a, **segments(a, members)[0].macs}
