"""The pure part of allocation: finding the first gap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from roost.state.alloc import first_gap, tap_mac


def test_first_gap_examples() -> None:
    assert first_gap([], 3, 10) == 3
    assert first_gap([3, 4, 5], 3, 10) == 6
    assert first_gap([3, 5], 3, 10) == 4
    assert first_gap([4, 5], 3, 10) == 3
    assert first_gap(range(3, 11), 3, 10) is None


@given(st.sets(st.integers(0, 60)), st.integers(0, 30), st.integers(30, 64))
def test_first_gap_is_the_lowest_free_value(taken: set[int], start: int, end: int) -> None:
    found = first_gap(sorted(t for t in taken if t >= start), start, end)
    free = [v for v in range(start, end + 1) if v not in taken]
    assert found == (free[0] if free else None)


def test_tap_mac_differs_from_the_guest_mac_but_stays_local_unicast() -> None:
    mac = tap_mac("02:ab:cd:ef:01:23")
    assert mac == "fe:ab:cd:ef:01:23"
    first = int(mac[:2], 16)
    assert first & 0b10 and not first & 0b1
