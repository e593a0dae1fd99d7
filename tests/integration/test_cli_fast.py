"""`roost vm show` against a real daemon prints the same, and exits the same, whether it takes
the fast path (no command tree) or goes through Typer; `roost vm list` through the stdlib
client over the Unix socket lists what the daemon holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Daemon, write_plugin

pytestmark = [pytest.mark.root]

ROOST = Path(sys.executable).parent / "roost"


@pytest.fixture
def daemon(netns: str) -> Iterator[Daemon]:
    instance = Daemon(netns)
    try:
        instance.start()
        manifest = write_plugin(instance.dir, "fast")
        body = manifest.read_bytes()
        headers = {"content-type": "application/json"}
        assert instance.http.post("/v1/plugins", content=body, headers=headers).status_code == 201
        vm = {"name": "web", "plugin": "fast", "start": False}
        assert instance.http.post("/v1/vms", json=vm).status_code == 201
        yield instance
    finally:
        instance.close()


def roost(*args: str) -> tuple[int, str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "ROOST_API"}
    finished = subprocess.run(
        [str(ROOST), *args], check=False, capture_output=True, text=True, env=environment
    )
    return finished.returncode, finished.stdout, finished.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["vm", "show", "web"],
        ["vm", "show", "web", "--json"],
        ["vm", "show", "--json", "missing"],
        ["vm", "show", "missing"],
    ],
)
def test_vm_show_is_the_same_with_and_without_the_command_tree(
    daemon: Daemon, args: list[str]
) -> None:
    fast = roost("--api", daemon.api, *args)
    tree = roost(f"--api={daemon.api}", *args)  # `--api=` is Typer's to read
    assert fast == tree
    code, stdout, stderr = fast
    if "missing" in args:
        assert code == 3 and "missing" in stderr  # not_found
    else:
        assert code == 0 and "web" in stdout


def test_vm_show_json_is_the_vm_the_api_gives(daemon: Daemon) -> None:
    code, stdout, _ = roost("--api", daemon.api, "vm", "show", "web", "--json")
    assert code == 0
    assert json.loads(stdout) == daemon.http.get("/v1/vms/web").json()


def test_vm_list_over_the_unix_socket_lists_the_vms(daemon: Daemon) -> None:
    code, stdout, stderr = roost("--api", daemon.api, "vm", "list", "--json")
    assert (code, stderr) == (0, "")
    assert [vm["name"] for vm in json.loads(stdout)] == ["web"]


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_a_closed_stdout_ends_vm_show_alike_with_and_without_the_tree(
    daemon: Daemon, as_json: list[str]
) -> None:
    def closed_stdout(*api: str) -> tuple[int, str]:
        read_end, write_end = os.pipe()
        os.close(read_end)  # whatever is written now is EPIPE
        try:
            finished = subprocess.run(
                [str(ROOST), *api, "vm", "show", "web", *as_json],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                check=False,
            )
        finally:
            os.close(write_end)
        return finished.returncode, finished.stderr

    assert closed_stdout("--api", daemon.api) == closed_stdout(f"--api={daemon.api}") == (1, "")
