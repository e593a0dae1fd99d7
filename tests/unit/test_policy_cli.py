"""The policy commands' own part, without a daemon: the file (or stdin) judged before it is
sent and named NAME, and policy events as `roost events` prints them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from roost.cli.events import _human
from roost.cli.policies import policy_body
from roost.errors import InvalidError

RULES = {"ingress": [{"action": "allow", "protocol": "tcp", "destination_port": "22"}]}


def test_a_file_without_a_name_is_sent_named_name(tmp_path: Path) -> None:
    file = tmp_path / "p.json"
    file.write_text(json.dumps(RULES))
    assert policy_body("ssh-in", str(file)) == {"name": "ssh-in", **RULES}


def test_stdin_is_read_for_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(json.dumps({"name": "ssh-in", **RULES}).encode()))
    monkeypatch.setattr("sys.stdin", stdin)
    assert policy_body("ssh-in", "-")["ingress"] == RULES["ingress"]


def test_a_file_naming_another_policy_or_breaking_a_rule_is_refused_before_sending(
    tmp_path: Path,
) -> None:
    file = tmp_path / "p.json"
    file.write_text(json.dumps({"name": "other", **RULES}))
    with pytest.raises(InvalidError, match="make them equal"):
        policy_body("ssh-in", str(file))
    file.write_text(json.dumps({"egress": [{"action": "allow", "source_port": "1"}]}))
    with pytest.raises(InvalidError) as refused:
        policy_body("ssh-in", str(file))
    assert {d.loc for d in refused.value.details} == {"egress.0.source_port"}


def test_a_policy_event_names_its_policy() -> None:
    event = {"id": 1, "type": "policy.changed", "time": "2026-01-01T12:00:00.000Z"}
    assert _human({**event, "policy": "web-in"}).split()[1:] == ["policy.changed", "web-in"]
