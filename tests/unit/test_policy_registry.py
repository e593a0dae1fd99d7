"""The policy registry on a real database (SQLite and PostgreSQL) and a fake policy firewall
that plans each transaction for real: what is stored, what the firewall is asked to make, what
a refused transaction leaves (nothing), which VMs hold a policy in use, and the check that the
policies a VM names exist."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from roost.engine.events import EventBus
from roost.engine.networks import policy_lookup_in
from roost.engine.policies import PolicyRegistry, missing_policy_errors
from roost.errors import ConflictError, HostError, InvalidError, NotFoundError
from roost.host.policy import Count
from roost.plan import DefaultNetwork
from roost.plan.interfaces import resolve_interfaces
from roost.plan.registration import parse_network_create
from roost.spec import Manifest, VMConfig, parse
from roost.spec.policy import Direction, Policy, parse_policy
from roost.state import alloc
from roost.state.db import Database
from roost.state.policies import used_by
from tests.engine_fakes import FakePolicyFirewall, World

WEB_IN = {
    "description": "web from the lab",
    "ingress": [
        {"action": "allow", "protocol": "tcp", "destination_port": "80", "source": ["@lab"]},
        {"action": "drop", "protocol": "icmp4"},
    ],
    "egress": [{"action": "reject", "destination": ["192.0.2.0/24"]}],
}
DEFAULT = DefaultNetwork.from_cidr("10.57.0.0/24")


def policy(name: str = "web-in", **fields: Any) -> Policy:
    return parse_policy({**WEB_IN, **fields}, name)


@pytest.fixture
def db(migrated_database_url: str) -> Iterator[Database]:
    database = Database(migrated_database_url)
    database.migrate()
    with database.write() as session:
        alloc.add_network(
            session,
            "lab",
            alloc.MANAGED,
            None,
            ipaddress.IPv4Network("10.80.0.0/24"),
            ipaddress.IPv4Address("10.80.0.1"),
            "fd00:80::/64",
        )
    yield database
    database.dispose()


@pytest.fixture
def firewall() -> FakePolicyFirewall:
    return FakePolicyFirewall()


@pytest.fixture
def registry(db: Database, firewall: FakePolicyFirewall) -> PolicyRegistry:
    return PolicyRegistry(db, firewall, EventBus(), policy_lookup_in)


def events(registry: PolicyRegistry) -> list[tuple[str, Any]]:
    taken, _, _ = registry.events._since(0)
    return [(event.type, event.data.get("policy")) for event in taken]


def stored_names(registry: PolicyRegistry) -> list[str]:
    return [view["name"] for view in registry.list()]


def add_vm(db: Database, name: str, versions: list[dict[str, Any]], running: int | None) -> None:
    """A VM whose config versions' `effective` are `versions` (1, 2, ...)."""
    with db.write() as session:
        run = session.connection().execute
        if run(text("SELECT count(*) FROM plugins")).scalar() == 0:
            run(
                text(
                    "INSERT INTO plugins (id, name, version, manifest, installed_at) "
                    "VALUES (1, 'p', '1', '{}', '2026-01-01')"
                )
            )
        vm_id = run(
            text(
                "INSERT INTO vms (name, plugin_id, status, vmm_kind, network, config_version, "
                "running_version, restart_required, created_at, updated_at) VALUES (:name, 1, "
                "'running', 'qemu', '{}', :latest, :running, false, '2026-01-01', '2026-01-01') "
                "RETURNING id"
            ),
            {"name": name, "latest": len(versions), "running": running},
        ).scalar()
        for number, effective in enumerate(versions, start=1):
            run(
                text(
                    "INSERT INTO vm_configs (vm_id, version, config, manifest, artifacts, "
                    "effective, created_at) VALUES (:vm, :version, '{}', '{}', '{}', "
                    ":effective, '2026-01-01')"
                ),
                {"vm": vm_id, "version": number, "effective": json.dumps(effective)},
            )


def single(*policies: str) -> dict[str, Any]:
    network: dict[str, Any] = {"mode": "bridged"}
    if policies:
        network["policies"] = list(policies)
    return {"network": network, "interfaces": [{"name": "eth0", **network}]}


def interfaces(*policies: list[str]) -> dict[str, Any]:
    return {
        "network": None,
        "interfaces": [{"name": f"eth{i}", "policies": names} for i, names in enumerate(policies)],
    }


# ---- create ---------------------------------------------------------------------------------


def test_a_created_policy_is_stored_made_in_the_firewall_and_announced(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    view = registry.create(policy())
    assert (view["name"], view["description"], view["used_by"]) == (
        "web-in",
        "web from the lab",
        [],
    )
    assert [rule["action"] for rule in view["ingress"]] == ["allow", "drop"]
    assert firewall.policies == {"web-in": policy()}
    assert events(registry) == [("policy.created", "web-in")]
    assert registry.show("web-in")["ingress"] == [
        {**rule, "counters": {"packets": 0, "bytes": 0}} for rule in view["ingress"]
    ]


def test_a_network_reference_is_made_as_its_subnet_and_prefix(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    registry.create(policy())
    [made] = firewall.transactions
    allowed = [line for line in made if "tcp dport 80" in line]
    assert any("10.80.0.0/24" in line for line in allowed)
    assert any("fd00:80::/64" in line for line in allowed)


def test_at_default_is_the_daemons_own_network(
    db: Database, registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    with db.write() as session:
        alloc.ensure_network(
            session, DEFAULT.subnet, DEFAULT.gateway, name="default", bridge="roost0"
        )
    registry.create(policy(ingress=[{"action": "allow", "source": ["@default"]}]))
    [made] = firewall.transactions
    assert any("10.57.0.0/24" in line for line in made)


def test_creating_a_policy_that_exists_is_409_exists_and_changes_nothing(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    registry.create(policy())
    with pytest.raises(ConflictError) as refused:
        registry.create(policy(description="another"))
    assert refused.value.code == "exists"
    assert registry.show("web-in")["description"] == "web from the lab"
    assert len(firewall.transactions) == 1


def test_a_policy_nftables_refuses_is_not_stored(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    firewall.fail = True
    with pytest.raises(HostError, match="nftables refused"):
        registry.create(policy())
    assert stored_names(registry) == []
    assert firewall.policies == {}
    assert events(registry) == []


def test_an_unknown_network_is_422_at_its_loc_and_nothing_is_stored(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    unknown = {"action": "allow", "source": ["10.9.0.0/16", "@nowhere"]}
    with pytest.raises(InvalidError) as refused:
        registry.create(policy(ingress=[unknown]))
    assert [detail.loc for detail in refused.value.details] == ["ingress.0.source.1"]
    assert "'nowhere'" in refused.value.details[0].msg
    assert (stored_names(registry), firewall.transactions) == ([], [])


# ---- apply (PUT) ----------------------------------------------------------------------------


def test_apply_creates_a_missing_policy_then_replaces_it_in_one_transaction(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    _, created = registry.apply(policy())
    assert created
    opened = policy(ingress=[{"action": "allow", "protocol": "icmp4"}])
    view, created = registry.apply(opened)
    assert not created
    assert [rule["protocol"] for rule in view["ingress"]] == ["icmp4"]
    assert len(firewall.transactions) == 2  # the replace is one transaction
    assert firewall.policies["web-in"] == opened
    assert registry.show("web-in")["ingress"][0]["protocol"] == "icmp4"
    assert events(registry) == [("policy.created", "web-in"), ("policy.changed", "web-in")]


def test_applying_the_same_policy_again_changes_nothing(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    registry.apply(policy())
    _, created = registry.apply(policy())
    assert not created
    assert len(firewall.transactions) == 1  # its counters are kept
    assert events(registry) == [("policy.created", "web-in")]


def test_a_refused_replace_keeps_the_stored_policy_and_its_rules(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    registry.apply(policy())
    firewall.fail = True
    with pytest.raises(HostError):
        registry.apply(policy(egress=[]))
    assert len(registry.show("web-in")["egress"]) == 1
    assert firewall.policies["web-in"] == policy()
    assert events(registry) == [("policy.created", "web-in")]


# ---- show, counters, used_by ----------------------------------------------------------------


def test_show_gives_each_rules_counters(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    registry.create(policy())
    firewall.counts[("web-in", Direction.INGRESS, 1)] = Count(7, 588)
    firewall.counts[("web-in", Direction.EGRESS, 0)] = Count(2, 120)
    shown = registry.show("web-in")
    assert [rule["counters"] for rule in shown["ingress"]] == [
        {"packets": 0, "bytes": 0},
        {"packets": 7, "bytes": 588},
    ]
    assert shown["egress"][0]["counters"] == {"packets": 2, "bytes": 120}


def test_showing_a_missing_policy_is_404(registry: PolicyRegistry) -> None:
    with pytest.raises(NotFoundError, match="'gone'"):
        registry.show("gone")


def test_a_policy_is_used_by_vms_whose_latest_or_running_version_names_it(
    db: Database, registry: PolicyRegistry
) -> None:
    registry.create(policy())
    registry.create(policy("other"))
    add_vm(db, "latest", [single(), single("web-in")], running=1)
    add_vm(db, "running", [single("web-in"), single()], running=1)
    add_vm(db, "listed", [interfaces([], ["other", "web-in"])], running=None)
    add_vm(db, "earlier", [single("web-in"), single(), single()], running=3)
    add_vm(db, "none", [single()], running=None)
    with db.read() as session:
        assert used_by(session, "web-in") == ["latest", "listed", "running"]
        assert used_by(session, "other") == ["listed"]
    assert registry.show("web-in")["used_by"] == ["latest", "listed", "running"]
    assert {view["name"]: view["used_by"] for view in registry.list()} == {
        "other": ["listed"],
        "web-in": ["latest", "listed", "running"],
    }


# ---- remove ---------------------------------------------------------------------------------


def test_a_policy_a_vm_names_is_409_policy_in_use_naming_the_vms(
    db: Database, registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    registry.create(policy())
    add_vm(db, "web-1", [single("web-in")], running=1)
    with pytest.raises(ConflictError, match="web-1") as refused:
        registry.remove("web-in")
    assert refused.value.code == "policy_in_use"
    assert stored_names(registry) == ["web-in"]
    assert "web-in" in firewall.policies


def test_removing_a_policy_no_vm_names_deletes_it_and_its_chains(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    registry.create(policy())
    registry.remove("web-in")
    assert (stored_names(registry), firewall.policies) == ([], {})
    assert any("delete chain" in line for line in firewall.transactions[-1])
    assert events(registry) == [("policy.created", "web-in"), ("policy.removed", "web-in")]
    with pytest.raises(NotFoundError):
        registry.remove("web-in")


def test_a_removal_nftables_refuses_keeps_the_policy(
    registry: PolicyRegistry, firewall: FakePolicyFirewall
) -> None:
    registry.create(policy())
    firewall.fail = True
    with pytest.raises(HostError):
        registry.remove("web-in")
    assert stored_names(registry) == ["web-in"]


# ---- a kernel without what policies need ----------------------------------------------------


def test_without_a_firewall_policies_are_stored_and_enforcing_names_the_gaps(
    db: Database,
) -> None:
    gap = "nftables reject in the inet family: reject rules could not answer"
    registry = PolicyRegistry(db, None, EventBus(), policy_lookup_in, gaps=[gap])
    registry.create(policy())
    registry.apply(policy(description="changed"))
    shown = registry.show("web-in")
    assert shown["description"] == "changed"
    assert [rule["counters"] for rule in shown["ingress"]] == [None, None]
    with pytest.raises(InvalidError):  # a reference is judged all the same
        registry.create(policy("x", egress=[{"action": "drop", "destination": ["@nowhere"]}]))
    with pytest.raises(HostError, match="reject rules could not answer"):
        registry.require_firewall()
    registry.remove("web-in")
    assert stored_names(registry) == []


# ---- the policies a VM names ----------------------------------------------------------------


def manifest(network: Any = None) -> Manifest:
    return parse(
        Manifest, {"name": "p", "version": "1", "initramfs": {"path": "i"}, "network": network}
    )


def test_a_vm_naming_missing_policies_gets_each_at_its_loc(
    db: Database, registry: PolicyRegistry
) -> None:
    registry.create(policy())
    bridged = {"mode": "bridged", "subnet": "10.1.0.0/24", "auto_assign": True}
    listed = parse(
        VMConfig,
        {
            "plugin": "p",
            "interfaces": [
                {**bridged, "policies": ["web-in", "nope"]},
                {"mode": "dhcp", "policies": ["gone"]},
            ],
        },
    )
    inherited = manifest({**bridged, "policies": ["web-in", "absent"]})
    with db.read() as session:
        resolved = resolve_interfaces(manifest(), listed, DEFAULT, None, vm_name="v")
        assert [
            (e.loc, "does not exist" in e.msg) for e in missing_policy_errors(session, resolved)
        ] == [
            ("interfaces.0.policies.1", True),
            ("interfaces.1.policies.0", True),
        ]
        resolved = resolve_interfaces(inherited, None, DEFAULT, None, vm_name="v")
        assert [e.loc for e in missing_policy_errors(session, resolved)] == ["network.policies.1"]
        resolved = resolve_interfaces(manifest(bridged), None, DEFAULT, None, vm_name="v")
        assert missing_policy_errors(session, resolved) == []


def test_a_network_a_policy_names_cannot_be_removed_until_the_policy_stops_naming_it(
    world: World,
) -> None:
    world.engine.policies.firewall = FakePolicyFirewall()
    world.engine.networks.create(parse_network_create({"name": "lab", "subnet": "10.81.0.0/24"}))
    world.engine.policies.create(policy())
    with pytest.raises(ConflictError, match="web-in") as refused:
        world.engine.networks.remove("lab")
    assert refused.value.code == "network_in_use"
    world.engine.policies.apply(policy(ingress=[]))
    world.engine.networks.remove("lab")
