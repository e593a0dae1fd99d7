"""`roost host setup`'s plan on fake sysctls and temporary dirs: what a host without --netns
gets (runtime sysctl, sysctl.d file, unit, daemon-reload where systemd runs), idempotence and
dry runs, without touching this machine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from roost.errors import InvalidError
from roost.host.setup import HostSetup, sysctl_file_text, unit_text


class FakeSysctls:
    where = "the host"

    def __init__(self) -> None:
        self.values = {"net.ipv4.ip_forward": "0"}

    def read(self, name: str) -> str:
        return self.values[name]

    def write(self, name: str, value: str) -> None:
        self.values[name] = value


def setup_on(
    tmp_path: Path, sysctls: FakeSysctls, ran: list[list[str]], **fields: Any
) -> HostSetup:
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    base = HostSetup(
        sysctls=sysctls,
        sysctl_file=tmp_path / "sysctl.d" / "90-roost.conf",
        unit_dir=units,
        unit=unit_text("/opt/roost/bin/roost", None),
        systemd_running=True,
        run=ran.append,
    )
    return replace(base, **fields)


def test_a_host_gets_forwarding_a_sysctl_file_and_a_unit_then_nothing_more(
    tmp_path: Path,
) -> None:
    sysctls, ran = FakeSysctls(), []
    first = setup_on(tmp_path, sysctls, ran).apply()
    assert [(a.kind, a.changed) for a in first] == [
        ("sysctl", True),
        ("file", True),
        ("file", True),
        ("daemon-reload", True),
    ]
    assert sysctls.values["net.ipv4.ip_forward"] == "1"
    assert (tmp_path / "sysctl.d" / "90-roost.conf").read_text() == sysctl_file_text()
    unit = (tmp_path / "units" / "roost.service").read_text()
    assert "ExecStart=/opt/roost/bin/roost serve\n" in unit
    assert "KillMode=process\n" in unit
    assert ran == [["systemctl", "daemon-reload"]]

    second = setup_on(tmp_path, sysctls, ran).apply()
    assert not any(action.changed for action in second)
    assert [a.message.split(":")[0] for a in second] == ["ok", "ok", "ok"]
    assert ran == [["systemctl", "daemon-reload"]]  # no unit changed: no reload


def test_a_dry_run_changes_nothing_and_says_what_it_would(tmp_path: Path) -> None:
    sysctls, ran = FakeSysctls(), []
    actions = setup_on(tmp_path, sysctls, ran, dry_run=True).apply()
    assert [a.message.split()[0] for a in actions] == ["would"] * 4
    assert sysctls.values["net.ipv4.ip_forward"] == "0"
    assert not (tmp_path / "sysctl.d").exists()
    assert list((tmp_path / "units").iterdir()) == []
    assert ran == []


def test_an_edited_unit_is_replaced_and_reload_skipped_without_systemd(tmp_path: Path) -> None:
    sysctls, ran = FakeSysctls(), []
    setup_on(tmp_path, sysctls, ran, systemd_running=False).apply()
    unit = tmp_path / "units" / "roost.service"
    unit.write_text(unit.read_text().replace("KillMode=process", "KillMode=control-group"))
    actions = setup_on(tmp_path, sysctls, ran, systemd_running=False).apply()
    assert [a.message for a in actions][1:] == [
        f"ok: {tmp_path}/sysctl.d/90-roost.conf is already up to date",
        f"replaced {unit}",
        "skipped systemctl daemon-reload: systemd does not run here "
        "(/run/systemd/system is missing)",
    ]
    assert "KillMode=process\n" in unit.read_text()
    assert ran == []


def test_a_namespace_gets_no_sysctl_file_and_its_unit_serves_it(tmp_path: Path) -> None:
    sysctls, ran = FakeSysctls(), []
    unit = unit_text("/opt/roost/bin/roost", "roost-ns")
    actions = setup_on(tmp_path, sysctls, ran, sysctl_file=None, unit=unit).apply()
    assert [a.kind for a in actions] == ["sysctl", "file", "daemon-reload"]
    assert "ExecStart=/opt/roost/bin/roost serve --netns roost-ns\n" in unit


def test_a_missing_unit_dir_is_refused_before_anything_changes(tmp_path: Path) -> None:
    sysctls, ran = FakeSysctls(), []
    with pytest.raises(InvalidError, match="pass --unit-dir DIR"):
        setup_on(tmp_path, sysctls, ran, unit_dir=tmp_path / "missing").apply()
    assert sysctls.values["net.ipv4.ip_forward"] == "0"
    assert not (tmp_path / "sysctl.d").exists()
