"""Policies end to end: the real daemon in a throwaway netns stores a policy made with the
CLI, makes its chains in its namespace's `bridge roost_policy` table at once, re-makes them
when the policy is replaced, and removes them with the policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from roost.plan.policy import policy_chain
from roost.spec.policy import Action, Direction
from tests.harness import Daemon, run, write_plugin

pytestmark = [pytest.mark.root]

WEB_IN = {
    "description": "web from the lab",
    "ingress": [
        {"action": "allow", "protocol": "tcp", "destination_port": "80", "source": ["@lab"]},
        {"action": "drop", "protocol": "icmp4"},
    ],
}


def policy_table(netns: str) -> str:
    return run("nft", "list", "table", "bridge", "roost_policy", netns=netns).stdout


def chains_of(netns: str, policy: str) -> set[str]:
    listing = policy_table(netns)
    return {
        chain
        for direction in Direction
        for action in Action
        if f"chain {(chain := policy_chain(policy, direction, action))} " in listing
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_a_policy_made_with_the_cli_is_in_the_daemons_nftables_until_removed(
    daemon: Daemon, tmp_path: Path
) -> None:
    daemon.ok("network", "create", "lab", "--subnet", "10.88.0.0/24")
    assert chains_of(daemon.netns, "web-in") == set()

    created = daemon.ok("policy", "create", "web-in", "--file", write(tmp_path / "p.json", WEB_IN))
    assert (created["name"], created["used_by"]) == ("web-in", [])
    assert len(chains_of(daemon.netns, "web-in")) == 6
    table = policy_table(daemon.netns)
    assert "10.88.0.0/24" in table and "tcp dport 80" in table

    exists = daemon.cli("policy", "create", "web-in", "--file", tmp_path / "p.json", "--json")
    assert (exists.exit_code, exists.json()["error"]["code"]) == (4, "exists")
    other = write(tmp_path / "other.json", {"name": "other", **WEB_IN})
    misnamed = daemon.cli("policy", "apply", "web-in", "--file", other)
    assert misnamed.exit_code == 1 and "make them equal" in misnamed.stderr

    listed = daemon.cli("policy", "list")
    assert listed.exit_code == 0
    assert listed.stdout.split("\n")[1].split()[:3] == ["web-in", "2", "0"]
    shown = daemon.ok("policy", "show", "web-in")
    assert [rule["counters"] for rule in shown["ingress"]] == [{"packets": 0, "bytes": 0}] * 2
    human = daemon.cli("policy", "show", "web-in")
    assert "@lab" in human.stdout and "PACKETS" in human.stdout

    opened = {**WEB_IN, "ingress": [{"action": "allow", "protocol": "icmp4"}]}
    replaced = daemon.ok("policy", "apply", "web-in", "--file", write(tmp_path / "p.json", opened))
    assert [rule["protocol"] for rule in replaced["ingress"]] == ["icmp4"]
    table = policy_table(daemon.netns)
    assert "10.88.0.0/24" not in table and "tcp dport 80" not in table

    unknown = {"egress": [{"action": "drop", "destination": ["@nowhere"]}]}
    refused = daemon.cli(
        "policy", "apply", "stray", "--file", write(tmp_path / "u.json", unknown), "--json"
    )
    assert refused.exit_code == 1
    assert [d["loc"] for d in refused.json()["error"]["details"]] == ["egress.0.destination.0"]
    assert chains_of(daemon.netns, "stray") == set()

    assert daemon.ok("policy", "rm", "web-in") == {"removed": "web-in"}
    assert chains_of(daemon.netns, "web-in") == set()
    assert daemon.ok("policy", "list") == []
    gone = daemon.cli("policy", "rm", "web-in", "--json")
    assert (gone.exit_code, gone.json()["error"]["code"]) == (3, "not_found")


@pytest.mark.firecracker
def test_a_policy_a_vm_names_is_in_use_until_the_vm_is_gone(daemon: Daemon, tmp_path: Path) -> None:
    daemon.ok("network", "create", "lab", "--subnet", "10.88.0.0/24")
    daemon.ok("plugin", "install", write_plugin(tmp_path, "plain"))
    daemon.ok("policy", "create", "web-in", "--file", write(tmp_path / "p.json", WEB_IN))
    network = {"mode": "bridged", "network": "lab", "policies": ["web-in"]}
    missing = write(tmp_path / "missing.json", {"network": {**network, "policies": ["nope"]}})
    refused = daemon.cli(
        "vm", "create", "web-0", "--plugin", "plain", "--config", missing, "--json"
    )
    assert refused.exit_code == 1
    assert [d["loc"] for d in refused.json()["error"]["details"]] == ["network.policies.0"]

    named = write(tmp_path / "vm.json", {"network": network})
    daemon.ok("vm", "create", "web-1", "--plugin", "plain", "--config", named, "--no-start")
    assert daemon.ok("policy", "show", "web-in")["used_by"] == ["web-1"]
    in_use = daemon.cli("policy", "rm", "web-in", "--json")
    assert (in_use.exit_code, in_use.json()["error"]["code"]) == (4, "policy_in_use")
    assert "web-1" in in_use.json()["error"]["message"]
    assert len(chains_of(daemon.netns, "web-in")) == 6

    daemon.ok("vm", "rm", "web-1")
    daemon.ok("policy", "rm", "web-in")
    assert chains_of(daemon.netns, "web-in") == set()
