"""How `vm config patch` builds a patch from --file and flags, and tells what changed."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from roost.cli.configs import changes, patch_body
from roost.cli.options import NetworkFlags
from roost.errors import InvalidError
from roost.spec import VMConfig, VMConfigPatch

NO_FLAGS = NetworkFlags(None, None, None, None, None)
STORED = {"mode": "bridged", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1", "ip": "10.1.0.5"}


def flags(**given: Any) -> NetworkFlags:
    return NetworkFlags(
        given.get("mode"),
        given.get("subnet"),
        given.get("gateway"),
        given.get("auto_assign"),
        given.get("ip"),
    )


def test_network_flags_change_the_stored_override_field_by_field() -> None:
    body = patch_body(STORED, None, flags(ip="10.1.0.9"), reset_network=False)
    assert body == {"network": {**STORED, "ip": "10.1.0.9"}}


def test_a_mode_flag_starts_a_fresh_override() -> None:
    assert patch_body(STORED, None, flags(mode="vsock"), reset_network=False) == {
        "network": {"mode": "vsock"}
    }


def test_flags_start_from_the_files_network_when_it_has_one() -> None:
    document = {"network": {"mode": "bridged", "subnet": "10.2.0.0/24", "auto_assign": True}}
    body = patch_body(STORED, document, flags(subnet="10.3.0.0/24"), reset_network=False)
    assert body["network"] == {"mode": "bridged", "subnet": "10.3.0.0/24", "auto_assign": True}


def test_without_network_flags_the_network_is_left_alone() -> None:
    assert patch_body(STORED, {"labels": {"a": "b"}}, NO_FLAGS, reset_network=False) == {
        "labels": {"a": "b"}
    }


def test_reset_sends_null_and_resources_merge_with_the_file() -> None:
    body = patch_body(
        STORED, {"resources": {"vcpus": 2}}, NO_FLAGS, reset_network=True, memory_mib=512
    )
    assert body == {"network": None, "resources": {"vcpus": 2, "memory_mib": 512}}


def test_a_bad_flag_is_refused_before_any_request() -> None:
    with pytest.raises(InvalidError) as refused:
        patch_body(STORED, None, NO_FLAGS, reset_network=False, vcpus=0)
    assert [d.loc for d in refused.value.details] == ["resources.vcpus"]


def test_changes_name_each_field_that_changed() -> None:
    before = {"config": {"resources": {}, "labels": {}}, "effective": {"network": {"ip": "a"}}}
    after = {
        "config": {"resources": {"memory_mib": 512}, "labels": {}},
        "effective": {"network": {"ip": "b"}},
    }
    assert changes(before, after) == [
        ("config.resources.memory_mib", "- -> 512"),
        ("effective.network.ip", "a -> b"),
    ]


def test_label_flags_send_only_the_labels_they_change_on_top_of_the_documents() -> None:
    def labels(document: dict[str, Any] | None, given: dict[str, str], removed: list[str]) -> Any:
        body = patch_body(
            STORED,
            document,
            NO_FLAGS,
            reset_network=False,
            labels=given,
            removed_labels=removed,
        )
        return body.get("labels")

    # a merge: only these keys change, so a concurrent patch of other labels is kept
    assert labels(None, {"tier": "db"}, ["team"]) == {"tier": "db", "team": None}
    assert labels(None, {}, ["nothing"]) == {"nothing": None}
    assert labels({"labels": {"x": "y"}}, {"z": ""}, []) == {"x": "y", "z": ""}
    assert labels(None, {}, []) is None  # no label flag: the patch leaves them as they are
    with pytest.raises(InvalidError):
        labels(None, {"-bad": "x"}, [])


def test_a_patch_merges_labels_per_key_and_null_removes_one_or_all() -> None:
    config = VMConfig.model_validate({"plugin": "p", "labels": {"tier": "web", "team": "a"}})

    def patched(labels: Any) -> dict[str, str]:
        return VMConfigPatch.model_validate({"labels": labels}).apply(config).labels

    assert patched({"tier": "db", "team": None}) == {"tier": "db"}
    assert patched({"zone": "b"}) == {"team": "a", "tier": "web", "zone": "b"}
    assert patched(None) == {}
    with pytest.raises(ValidationError):
        patched({"-bad": None})
