"""Releasing a tap's anti-spoofing rules removes them when it has some and changes nothing when
it has none (a VM removed without ever starting), in one batch nftables takes either way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from roost.host.firewall import Firewall
from roost.host.netns import NetnsWorker
from tests.harness import run

pytestmark = pytest.mark.root


@pytest.fixture
def firewall(netns: str) -> Iterator[Firewall]:
    worker = NetnsWorker(netns)
    try:
        yield Firewall(worker)
    finally:
        worker.close()


def table(netns: str) -> list[dict[str, Any]]:
    listed = json.loads(run("nft", "-j", "list", "table", "bridge", "roost", netns=netns).stdout)
    return [item for item in listed["nftables"] if "metainfo" not in item]


def test_release_removes_a_protected_taps_rules_and_changes_nothing_for_a_tap_without(
    firewall: Firewall, netns: str
) -> None:
    bare = table(netns)
    firewall.protect("rtap1", "02:00:00:00:00:01", "10.0.0.2")
    firewall.protect("rtap2", "02:00:00:00:00:02", "10.0.0.3")
    firewall.release("rtap1")
    firewall.release("rtap9")  # never protected
    firewall.protect("rtap9", "02:00:00:00:00:09", "10.0.0.9")
    chains = {item["chain"]["name"] for item in table(netns) if "chain" in item}
    assert chains == {"antispoof", "vm-rtap2", "vm-rtap9"}
    firewall.release("rtap2")
    firewall.release("rtap9")
    firewall.release("rtap9")  # again: nothing left to remove
    assert table(netns) == bare
