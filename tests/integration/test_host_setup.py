"""`roost host setup --netns`: the real command against a throwaway namespace and a temporary
unit dir; the host's own sysctls and /etc are never touched."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roost.cli.main import app
from roost.host.setup import SYSCTL_FILE
from tests.harness import CLIResult, run

pytestmark = pytest.mark.root

HOST_FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")  # read in this (the host's) namespace


def setup(*args: str | Path) -> CLIResult:
    result = CliRunner().invoke(app, ["host", "setup", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CLIResult(result.exit_code, result.stdout, result.stderr)


def forwarding(netns: str) -> str:
    return run("cat", "/proc/sys/net/ipv4/ip_forward", netns=netns).stdout.strip()


@pytest.fixture
def host_untouched() -> Iterator[None]:
    """Fail if the host's forwarding or its sysctl.d file changed during the test."""
    before = (HOST_FORWARDING.read_text(), SYSCTL_FILE.exists())
    yield
    assert (HOST_FORWARDING.read_text(), SYSCTL_FILE.exists()) == before


@pytest.mark.usefixtures("host_untouched")
def test_setup_in_a_namespace_changes_once_then_nothing(netns: str, tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    unit = units / "roost.service"
    args = ("--netns", netns, "--unit-dir", units)
    assert forwarding(netns) == "0"

    dry = setup(*args, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert f"would set net.ipv4.ip_forward = 1 in network namespace {netns} (now 0)" in dry.stdout
    assert f"would write {unit}" in dry.stdout
    assert "dry run: 2 change(s) would be made; nothing changed" in dry.stdout
    assert forwarding(netns) == "0"
    assert not unit.exists()

    first = setup(*args)
    assert first.exit_code == 0, first.stderr
    assert f"set net.ipv4.ip_forward = 1 in network namespace {netns} (was 0)" in first.stdout
    assert f"wrote {unit}" in first.stdout
    assert forwarding(netns) == "1"
    text = unit.read_text()
    assert f" serve --netns {netns}\n" in text
    assert "KillMode=process\n" in text
    assert list(units.iterdir()) == [unit]  # no staging file left

    second = setup(*args)
    assert second.exit_code == 0, second.stderr
    assert "nothing changed: this host is already set up" in second.stdout
    assert f"ok: net.ipv4.ip_forward is already 1 in network namespace {netns}" in second.stdout
    report = setup(*args, "--json")
    assert report.exit_code == 0, report.stderr
    assert json.loads(report.stdout)["changed"] is False
    assert not any(action["changed"] for action in json.loads(report.stdout)["actions"])
    again = setup(*args, "--dry-run")
    assert again.stdout.splitlines()[-1] == "dry run; nothing changed"


@pytest.mark.usefixtures("host_untouched")
def test_the_unit_passes_systemd_analyze_verify(netns: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    result = setup("--netns", netns, "--unit-dir", tmp_path)
    assert result.exit_code == 0, result.stderr
    verify = run("systemd-analyze", "verify", str(tmp_path / "roost.service"), check=False)
    assert verify.returncode == 0, verify.stderr
    assert "roost.service" not in verify.stdout + verify.stderr  # no complaint about it


@pytest.mark.usefixtures("host_untouched")
def test_a_missing_namespace_or_unit_dir_is_refused(netns: str, tmp_path: Path) -> None:
    missing = setup("--netns", "roost-t-missing", "--unit-dir", tmp_path)
    assert missing.exit_code == 1
    assert "network namespace 'roost-t-missing' does not exist" in missing.stderr
    no_dir = setup("--netns", netns, "--unit-dir", tmp_path / "nowhere")
    assert no_dir.exit_code == 1
    assert "pass --unit-dir DIR" in no_dir.stderr
    assert forwarding(netns) == "0"
    assert list(tmp_path.iterdir()) == []
