"""Network policies on VMs' taps, on an engine over fakes (real SQLite, a policy firewall that
plans each transaction for real): a tap is attached before it is made and detached once it is
gone, a VM naming a policy that does not exist is refused, a patch of policies alone applies at
once to a VM whose taps exist, a refused firewall change leaves nothing, and a daemon's start
re-attaches the live taps and drops every other attachment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from roost.engine.hostnet import HostNetwork
from roost.engine.recovery import Recovery
from roost.engine.settings import Orphans
from roost.errors import HostError, InvalidError
from roost.plan.policy import attachment_name
from roost.spec import VMConfig, VMConfigPatch
from roost.spec.policy import PolicyDefaults, parse_policy
from tests.engine_fakes import SUBNET, FakeLinks, World, failing_commit

WEB = {
    "ingress": [
        {"action": "allow", "protocol": "tcp", "destination_port": "80", "source": [SUBNET]}
    ]
}
PING = {"ingress": [{"action": "allow", "protocol": "icmp4"}]}
DROP_IN = {"ingress": "drop"}


def network(*policies: str, defaults: dict[str, str] | None = None) -> dict[str, Any]:
    """The plugin's bridged network (inherited: same mode, no subnet of its own) with
    policies."""
    data: dict[str, Any] = {"mode": "bridged", "policies": list(policies)}
    if defaults is not None:
        data["policy_defaults"] = defaults
    return data


def config(*policies: str, defaults: dict[str, str] | None = None) -> VMConfig:
    return VMConfig.model_validate(
        {"plugin": "p", "network": network(*policies, defaults=defaults)}
    )


def store(world: World, name: str, body: dict[str, Any]) -> None:
    world.engine.policies.create(parse_policy(body, name))


def patch(world: World, name: str, **fields: Any) -> dict[str, Any]:
    return world.engine.patch_config(name, VMConfigPatch.model_validate(fields))


def tap_of(world: World, name: str) -> str:
    tap = world.engine.show_vm(name)["network"]["tap"]
    assert isinstance(tap, str)
    return tap


def attachment(*policies: str, ingress: str = "allow", egress: str = "allow") -> str:
    return attachment_name(policies, PolicyDefaults(ingress=ingress, egress=egress))


@pytest.fixture
def web(world: World) -> World:
    """The world with policies `web` (tcp/80 in from the subnet) and `ping` stored."""
    store(world, "web", WEB)
    store(world, "ping", PING)
    return world


class WatchedLinks(FakeLinks):
    """Links that note, as each tap is made, what the policy firewall attaches it to then."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        self.attached_when_made: dict[str, str | None] = {}
        self.fail = False

    def create_tap(
        self, name: str, bridge: str, mac: str, *, owned: bool = False, mtu: int | None = None
    ) -> None:
        self.attached_when_made[name] = self.world.policy_firewall.taps.get(name)
        if self.fail:
            raise HostError(f"cannot make tap {name}: a fake failure")
        super().create_tap(name, bridge, mac, owned=owned, mtu=mtu)


def watch_links(world: World) -> WatchedLinks:
    links = WatchedLinks(world)
    world.links = links
    world.engine.host.links = links
    return links


# ---- taps -----------------------------------------------------------------------------------


def test_a_tap_with_policies_is_attached_before_it_is_made(web: World) -> None:
    links = watch_links(web)
    vm = web.engine.create_vm("b", config("web", defaults=DROP_IN))
    tap = vm["network"]["tap"]
    wanted = attachment("web", ingress="drop")
    assert links.attached_when_made == {tap: wanted}
    assert web.policy_firewall.taps == {tap: wanted}
    assert vm["network"]["policies"] == ["web"]
    assert vm["network"]["policy_defaults"] == {"ingress": "drop", "egress": "allow"}


def test_defaults_alone_attach_a_tap(web: World) -> None:
    tap = web.engine.create_vm("a", config(defaults={"egress": "drop"}))["network"]["tap"]
    assert web.policy_firewall.taps == {tap: attachment(egress="drop")}


def test_a_tap_without_policies_is_never_attached(web: World) -> None:
    made = len(web.policy_firewall.transactions)
    web.engine.create_vm("a", VMConfig(plugin="p"))
    web.engine.create_vm("c", config(defaults={"ingress": "allow", "egress": "allow"}))
    web.engine.stop_vm("a")
    web.engine.destroy_vm("a")
    assert web.policy_firewall.taps == {}
    assert len(web.policy_firewall.transactions) == made  # not one firewall transaction


def test_stop_and_remove_detach_the_tap_once_it_is_gone(web: World) -> None:
    tap = web.engine.create_vm("b", config("web"))["network"]["tap"]
    web.engine.stop_vm("b")
    assert tap not in web.links.links and web.policy_firewall.taps == {}
    web.engine.start_vm("b")
    assert web.policy_firewall.taps == {tap: attachment("web")}
    web.engine.destroy_vm("b")
    web.assert_nothing_left("b")


def test_a_vm_whose_vmm_ends_on_its_own_is_detached(web: World) -> None:
    web.engine.create_vm("b", config("web"))
    [process] = web.driver.started
    process.kill()
    web.engine._vmm_exited("b", web.engine.live["b"].process)
    assert web.engine.show_vm("b")["status"] == "crashed"
    assert web.policy_firewall.taps == {}


# ---- names that do not exist ----------------------------------------------------------------


def test_a_create_naming_a_policy_that_does_not_exist_is_refused_where_it_is_named(
    web: World,
) -> None:
    with pytest.raises(InvalidError) as refused:
        web.engine.create_vm("b", config("web", "nope", "gone"))
    assert [(d.loc, "does not exist" in d.msg) for d in refused.value.details] == [
        ("network.policies.1", True),
        ("network.policies.2", True),
    ]
    web.assert_nothing_left("b")
    with pytest.raises(InvalidError, match=r"interfaces\.1\.policies\.0"):
        web.engine.create_vm(
            "m",
            VMConfig.model_validate(
                {
                    "plugin": "p",
                    "interfaces": [
                        {"mode": "bridged", "subnet": SUBNET, "auto_assign": True},
                        {
                            "mode": "bridged",
                            "subnet": "10.67.0.0/24",
                            "auto_assign": True,
                            "policies": ["nope"],
                        },
                    ],
                }
            ),
            start=False,
        )


def test_a_patch_naming_a_policy_that_does_not_exist_is_refused_and_stores_nothing(
    web: World,
) -> None:
    web.engine.create_vm("b", config("web"))
    with pytest.raises(InvalidError, match=r"network\.policies\.0"):
        patch(web, "b", network=network("nope"))
    assert [v["version"] for v in web.engine.config_history("b")] == [1]


# ---- failures at start ----------------------------------------------------------------------


def test_a_firewall_that_refuses_fails_the_create_and_leaves_nothing(web: World) -> None:
    web.policy_firewall.fail = True
    with pytest.raises(HostError, match="nftables refused"):
        web.engine.create_vm("b", config("web"))
    web.assert_nothing_left("b")


def test_a_firewall_that_refuses_fails_the_start_with_no_tap_or_attachment_left(
    web: World,
) -> None:
    web.engine.create_vm("b", config("web"), start=False)
    web.policy_firewall.fail = True
    with pytest.raises(HostError):
        web.engine.start_vm("b")
    vm = web.engine.show_vm("b")
    assert (vm["status"], "nftables refused" in vm["status_reason"]) == ("error", True)
    assert not [link for link in web.links.links if link.startswith("rtap")]
    assert web.policy_firewall.taps == {}
    assert web.engine.start_vm("b")["status"] == "running"  # once the firewall takes it


def test_a_tap_that_cannot_be_made_is_detached_again(web: World) -> None:
    links = watch_links(web)
    links.fail = True
    with pytest.raises(HostError, match="cannot make tap"):
        web.engine.create_vm("b", config("web"))
    assert set(links.attached_when_made.values()) == {attachment("web")}
    assert web.policy_firewall.taps == {}
    assert web.engine.records.names() == set()


def test_without_a_policy_firewall_a_tap_with_policies_names_what_the_kernel_lacks(
    web: World,
) -> None:
    host = web.engine.host
    web.engine.host.policies, host.policy_gaps = None, ("NFLOG is missing",)
    with pytest.raises(HostError, match="cannot be enforced on this host: NFLOG is missing"):
        web.engine.create_vm("b", config("web"))
    web.assert_nothing_left("b")
    assert web.engine.create_vm("a", VMConfig(plugin="p"))["status"] == "running"


# ---- patches --------------------------------------------------------------------------------


@pytest.mark.parametrize("paused", [False, True])
def test_a_patch_of_policies_alone_applies_at_once_without_a_restart(
    web: World, paused: bool
) -> None:
    tap = web.engine.create_vm("b", config("web", defaults=DROP_IN))["network"]["tap"]
    if paused:
        web.engine.pause_vm("b")
    pid = web.engine.show_vm("b")["vmm"]["pid"]
    assert pid is not None
    before = len(web.policy_firewall.transactions)
    new = patch(web, "b", network=network("web", "ping", defaults=DROP_IN))
    assert new["version"] == 2
    assert len(web.policy_firewall.transactions) == before + 1  # one transaction
    assert web.policy_firewall.taps == {tap: attachment("web", "ping", ingress="drop")}
    vm = web.engine.show_vm("b")
    assert (vm["vmm"]["pid"], vm["restart_required"], vm["running_version"]) == (pid, False, 2)
    assert vm["status"] == ("paused" if paused else "running")
    assert vm["network"]["policies"] == ["web", "ping"]
    assert len(web.driver.started) == 1


def test_the_policies_a_running_vm_no_longer_has_are_free_to_remove(web: World) -> None:
    web.engine.create_vm("b", config("web"))
    patch(web, "b", network=network("ping"))
    patch(web, "b", network=network("ping"), resources={"vcpus": 2})  # at the next start
    used = {view["name"]: view["used_by"] for view in web.engine.policies.list()}
    assert used == {"ping": ["b"], "web": []}
    web.engine.policies.remove("web")


def test_a_patch_of_one_interfaces_policies_changes_all_taps_in_one_transaction(
    web: World,
) -> None:
    def interfaces(*policies: list[str]) -> list[dict[str, Any]]:
        return [
            {"mode": "bridged", "subnet": subnet, "auto_assign": True, "policies": names}
            for subnet, names in zip((SUBNET, "10.67.0.0/24"), policies, strict=True)
        ]

    vm = web.engine.create_vm(
        "m", VMConfig.model_validate({"plugin": "p", "interfaces": interfaces(["web"], [])})
    )
    first, second = (interface["tap"] for interface in vm["interfaces"])
    assert [i.get("policies") for i in vm["interfaces"]] == [["web"], None]  # shown where set
    assert web.policy_firewall.taps == {first: attachment("web")}
    before = len(web.policy_firewall.transactions)
    patch(web, "m", interfaces=interfaces(["web"], ["ping"]))
    assert len(web.policy_firewall.transactions) == before + 1
    assert web.policy_firewall.taps == {first: attachment("web"), second: attachment("ping")}
    shown = web.engine.show_vm("m")
    assert shown["restart_required"] is False
    assert [i.get("policies") for i in shown["interfaces"]] == [["web"], ["ping"]]
    [record] = web.engine.records.live()  # what a new daemon re-attaches
    assert record.network is not None
    assert [i.effective.policies for i in record.network.interfaces] == [("web",), ("ping",)]


def test_a_patch_that_drops_every_policy_detaches_the_tap(web: World) -> None:
    web.engine.create_vm("b", config("web", defaults=DROP_IN))
    patch(web, "b", network={"mode": "bridged"})
    assert web.policy_firewall.taps == {}
    vm = web.engine.show_vm("b")
    assert ("policies" in vm["network"], vm["restart_required"]) == (False, False)


def test_a_patch_whose_firewall_change_is_refused_stores_nothing(web: World) -> None:
    tap = web.engine.create_vm("b", config("web"))["network"]["tap"]
    web.policy_firewall.fail = True
    with pytest.raises(HostError, match="nftables refused"):
        patch(web, "b", network=network("ping"))
    assert [v["version"] for v in web.engine.config_history("b")] == [1]
    assert web.engine.show_vm("b")["network"]["policies"] == ["web"]
    assert web.policy_firewall.taps == {tap: attachment("web")}


def test_a_patch_whose_commit_fails_puts_the_taps_back(web: World) -> None:
    tap = web.engine.create_vm("b", config("web"))["network"]["tap"]
    with failing_commit(web.db), pytest.raises(Exception, match="disk I/O error"):
        patch(web, "b", network=network("ping"))
    assert [v["version"] for v in web.engine.config_history("b")] == [1]
    assert web.policy_firewall.taps == {tap: attachment("web")}


def test_a_patch_that_needs_a_restart_applies_its_policies_at_the_restart(web: World) -> None:
    tap = web.engine.create_vm("b", config("web"))["network"]["tap"]
    patch(web, "b", network=network("ping"), resources={"vcpus": 2})
    vm = web.engine.show_vm("b")
    assert (vm["restart_required"], vm["network"]["policies"]) == (True, ["web"])
    assert web.policy_firewall.taps == {tap: attachment("web")}
    web.engine.restart_vm("b")
    assert web.policy_firewall.taps == {tap: attachment("ping")}
    assert web.engine.show_vm("b")["network"]["policies"] == ["ping"]


def test_a_patch_of_a_stopped_vm_attaches_nothing_until_it_starts(web: World) -> None:
    tap = web.engine.create_vm("b", VMConfig(plugin="p"))["network"]["tap"]
    web.engine.stop_vm("b")
    patch(web, "b", network=network("web"))
    assert web.policy_firewall.taps == {}
    web.engine.start_vm("b")
    assert web.policy_firewall.taps == {tap: attachment("web")}


# ---- a daemon's start -----------------------------------------------------------------------


def test_a_new_daemon_makes_every_policy_reattaches_live_taps_and_drops_the_rest(
    tmp_short: Path,
) -> None:
    first = World(tmp_short)
    try:
        store(first, "web", WEB)
        store(first, "ping", PING)
        live = first.engine.create_vm("b", config("web"))["network"]["tap"]
        patch(first, "b", network=network("web", "ping"))  # applied at once, recorded
        first.engine.create_vm("s", config("ping"))
        stopped_tap = tap_of(first, "s")
        first.engine.watcher.close()
        # a restart: what the kernel kept (the policy tables outlive the daemon), plus an
        # attachment a create cut short left for a tap that was never made
        again = World(tmp_short, install=False)
        kernel = again.policy_firewall
        kernel.taps.update(first.policy_firewall.taps)
        kernel.taps["rtapgone"] = attachment("ping")
        kernel.policies.update(first.policy_firewall.policies)
        # ... and the chains of a policy whose create died before it was stored
        kernel.policies["ghost"] = parse_policy({"ingress": [{"action": "drop"}]}, "ghost")
        first.driver.started[1].kill()  # s's VMM ended while no daemon followed it
        recovery = Recovery(again.engine, Orphans.REFUSE)
        recovery.check()
        made = kernel.transactions[-1]
        assert any("p-web-in-allow" in line for line in made)
        assert any("p-ping-in-allow" in line for line in made)
        assert "delete chain bridge roost_policy p-ghost-in-drop" in made
        assert set(kernel.policies) == {"web", "ping"}
        assert kernel.taps == {
            live: attachment("web", "ping"),
            stopped_tap: attachment("ping"),  # until s is settled
        }
        recovery.start().join(10)
        assert recovery.finished.is_set()
        assert again.engine.show_vm("s")["status"] == "crashed"
        assert kernel.taps == {live: attachment("web", "ping")}
        again.close()
    finally:
        first.close()


def test_a_daemon_without_a_policy_firewall_still_recovers_vms_with_policies(
    tmp_short: Path,
) -> None:
    first = World(tmp_short)
    try:
        store(first, "web", WEB)
        first.engine.create_vm("b", config("web"))
        first.engine.watcher.close()
        again = World(tmp_short, install=False)
        host: HostNetwork = again.engine.host
        host.policies, host.policy_gaps = None, ("the bridge family",)
        recovery = Recovery(again.engine, Orphans.REFUSE)
        recovery.check()
        recovery.start().join(10)
        assert set(again.engine.live) == {"b"}
        again.close()
    finally:
        first.close()
