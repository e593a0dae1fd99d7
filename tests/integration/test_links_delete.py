"""Deleting links from the calling thread (one netlink request each, inside the namespace):
what exists goes, what does not is said so, and deletes from many threads at once all land in
the namespace they were asked of, never the caller's own."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator

import pytest

from roost.host.links import Links
from roost.host.netns import NetnsWorker
from tests.harness import links

pytestmark = pytest.mark.root
BRIDGE = "rbrdel"
TAPS = [f"rtapdel{index}" for index in range(8)]


@pytest.fixture
def host(netns: str) -> Iterator[Links]:
    worker = NetnsWorker(netns)
    made = Links(worker)
    made.ensure_bridge(BRIDGE, ipaddress.IPv4Interface("10.88.0.1/24"))
    yield made
    made.close()
    worker.close()


def test_a_deleted_tap_is_gone_and_deleting_it_again_says_there_was_none(
    netns: str, host: Links
) -> None:
    host.create_tap(TAPS[0], BRIDGE, "02:00:00:00:00:01")
    assert TAPS[0] in links(netns)
    assert host.delete(TAPS[0]) is True
    assert TAPS[0] not in links(netns)
    assert host.delete(TAPS[0]) is False


def test_taps_deleted_from_many_threads_at_once_all_go_from_their_namespace(
    netns: str, host: Links
) -> None:
    for index, tap in enumerate(TAPS):
        host.create_tap(tap, BRIDGE, f"02:00:00:00:01:{index:02x}")
    outcomes: dict[str, bool] = {}
    barrier = threading.Barrier(len(TAPS))

    def delete(tap: str) -> None:
        barrier.wait()
        outcomes[tap] = host.delete(tap)

    threads = [threading.Thread(target=delete, args=(tap,)) for tap in TAPS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == dict.fromkeys(TAPS, True)
    assert set(links(netns)) & set(TAPS) == set()
    assert BRIDGE in links(netns)
