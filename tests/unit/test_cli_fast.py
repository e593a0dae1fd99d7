"""The CLI's fast start changes nothing a person or a script sees: `roost --version` prints the
installed version, the lazy paths (plain output, values that skip Typer's pydantic coercion,
the stdlib client's requests, `vm show` without the command tree) give the same output,
errors and exit codes as the paths they stand in for."""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from rich.console import Console
from typer._coercion import build_runtime_param
from typer.core import _TyperParameter
from typer.testing import CliRunner

from roost.cli.client import Client
from roost.cli.fast import VMShow, vm_show_args
from roost.cli.main import app
from roost.cli.output import plain_lines
from roost.cli.plain_values import PlainValues, PlainValuesGroup
from roost.cli.unix_http import json_body, target

ROOST = Path(sys.executable).parent / "roost"
MISSING_SOCKET = "unix:///nonexistent/roost.sock"


def roost(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "ROOST_API"}
    environment.update(env or {})
    return subprocess.run(
        [str(ROOST), *args], check=False, capture_output=True, text=True, env=environment
    )


def test_roost_version_prints_the_installed_version_and_exits_0() -> None:
    finished = roost("--version")
    assert (finished.returncode, finished.stderr) == (0, "")
    assert finished.stdout == f"roost {importlib.metadata.version('roost')}\n"


def test_the_version_option_of_the_tree_prints_the_same_line() -> None:
    # with another option before it, `roost --version` goes through Typer
    result = CliRunner().invoke(app, ["--api", MISSING_SOCKET, "--version"])
    assert (result.exit_code, result.stdout) == (0, roost("--version").stdout)
    assert "--version" in CliRunner().invoke(app, ["--help"]).stdout


@pytest.mark.parametrize(
    ("args", "fast"),
    [
        (["vm", "show", "web"], VMShow(None, "web", as_json=False)),
        (["vm", "show", "web", "--json"], VMShow(None, "web", as_json=True)),
        (["vm", "show", "--json", "web"], VMShow(None, "web", as_json=True)),
        (
            ["--api", "unix:///a", "--api", "unix:///b", "vm", "show", "x"],
            VMShow("unix:///b", "x", as_json=False),
        ),
        (["--api=unix:///a", "vm", "show", "x"], None),
        (["--api", "--json", "vm", "show", "x"], None),
        (["--api"], None),
        (["--token-file", "t", "vm", "show", "x"], None),
        (["vm", "show"], None),
        (["vm", "show", "x", "y"], None),
        (["vm", "show", "x", "--help"], None),
        (["vm", "show", "x", "--json", "--json"], None),
        (["vm", "show", "-"], None),
        (["vm", "show", ""], None),
        (["vm", "list"], None),
        (["show", "vm", "x"], None),
    ],
)
def test_only_a_plain_vm_show_takes_the_fast_path(args: list[str], fast: VMShow | None) -> None:
    assert vm_show_args(args) == fast


def test_shell_completion_never_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_ROOST_COMPLETE", "bash_complete")
    assert vm_show_args(["vm", "show", "x"]) is None


@pytest.mark.parametrize(
    "args",
    [
        ["vm", "show", "web"],
        ["vm", "show", "web", "--json"],
        ["vm", "show", "Not_A_Name"],
        ["vm", "show", "--json", "Not_A_Name"],
    ],
)
def test_vm_show_of_a_daemon_not_running_fails_alike_with_and_without_the_tree(
    args: list[str],
) -> None:
    fast = roost("--api", MISSING_SOCKET, *args)
    tree = roost(f"--api={MISSING_SOCKET}", *args)  # `--api=` is Typer's to read
    assert (fast.returncode, fast.stdout) == (tree.returncode, tree.stdout)
    assert fast.stderr == tree.stderr
    assert fast.returncode in (1, 5)  # invalid name, or unreachable
    assert fast.stderr.startswith("error: ")


def test_the_fast_path_reads_roost_api_as_the_tree_does() -> None:
    fast = roost("vm", "show", "web", env={"ROOST_API": MISSING_SOCKET})
    tree = roost("vm", "show", "web", "--json", "--json", env={"ROOST_API": MISSING_SOCKET})
    assert fast.returncode == tree.returncode == 5
    assert MISSING_SOCKET in fast.stderr
    assert fast.stderr == tree.stderr


def test_a_daemon_not_running_is_the_same_message_and_exit_5_for_the_lazy_client() -> None:
    result = CliRunner().invoke(app, ["--api", MISSING_SOCKET, "vm", "list"])
    assert result.exit_code == 5
    assert result.stderr == (
        f"error: cannot reach the roost daemon at {MISSING_SOCKET} ([Errno 2] No such file or "
        "directory); is `roost serve` running there? (--api or $ROOST_API choose another "
        "address)\n"
    )


LINES = [
    "vm-1  02:2e:f4:ab:5b:92",
    "[bold]x[/bold] :ab: :smile:",
    "plain",
    "",
    "wide 漢字 and emoji 🆎",
    "tab\there",
    "bell\a and cr\r",
    "trailing space " + "x" * 100 + "   ",
    "two\nlines",
    "ends in a newline\n",
]


@pytest.mark.parametrize("line", LINES)
def test_plain_lines_are_what_rich_prints(line: str, capsys: pytest.CaptureFixture[str]) -> None:
    rich_out = io.StringIO()
    Console(file=rich_out, highlight=False, soft_wrap=True, emoji=False).print(
        line, markup=False, highlight=False
    )
    plain_lines([line])
    assert capsys.readouterr().out == rich_out.getvalue()


def every_parameter() -> list[Any]:
    root = typer.main.get_command(app)
    assert isinstance(root, PlainValuesGroup)
    ctx = root.make_context("roost", ["--version"], resilient_parsing=True)
    found: list[Any] = []

    def walk(command: Any) -> None:
        help_option = command.get_help_option(ctx)
        found.extend(p for p in [*command.params, help_option] if isinstance(p, _TyperParameter))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(root)
    return found


def test_every_parameter_skips_pydantic_for_values_that_need_no_conversion() -> None:
    parameters = every_parameter()
    assert len(parameters) > 100
    assert all(isinstance(p.get_runtime_param(), PlainValues) for p in parameters)


@pytest.mark.parametrize("value", [None, "web", "", "12", "unix:///x", "yes", ["a", "b"], ()])
def test_plain_values_convert_as_typer_does(value: Any) -> None:
    ctx = typer.main.get_command(app).make_context("roost", ["--version"], resilient_parsing=True)
    checked = 0
    for parameter in every_parameter():
        ours = parameter.get_runtime_param()
        typers = build_runtime_param(parameter.type_descriptor)
        try:
            expected: Any = typers.coerce(value, param=parameter, ctx=ctx)
        except Exception as error:  # the same refusal is expected
            with pytest.raises(type(error)) as caught:
                ours.coerce(value, param=parameter, ctx=ctx)
            assert str(caught.value) == str(error)
            continue
        assert ours.coerce(value, param=parameter, ctx=ctx) == expected
        checked += 1
    assert checked


@pytest.mark.parametrize(
    ("url", "params"),
    [
        ("/v1/vms", {}),
        ("/v1/vms/web/stop", {"force": True, "timeout": 2.5}),
        ("/v1/vms", {"status": ["running", "paused"], "label": ["tier=web", "a b"], "q": "é&/"}),
        ("/v1/vms?limit=2&after=b", {}),
        ("http://roost/v1/vms?limit=2&after=b", {}),
    ],
)
def test_the_unix_client_asks_for_what_httpx_would(url: str, params: dict[str, Any]) -> None:
    request = httpx.Request("GET", httpx.URL("http://roost").join(url), params=params or None)
    expected = request.url.raw_path.decode()
    sent = target(url, params)
    assert httpx.URL(f"http://roost{sent}").params == httpx.URL(f"http://roost{expected}").params
    assert sent.split("?")[0] == expected.split("?")[0]


def test_a_link_with_a_query_keeps_it_beside_more_params() -> None:
    assert target("/v1/vms?limit=2", {"plugin": "p"}) == "/v1/vms?limit=2&plugin=p"


def test_a_next_link_is_followed_with_its_query_over_tcp_too() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        if "after" in request.url.params:
            return httpx.Response(200, json=["b"])
        link = '</v1/vms?limit=1&after=a>; rel="next"'
        return httpx.Response(200, json=["a"], headers={"link": link})

    client = Client("tcp://127.0.0.1:8000", transport=httpx.MockTransport(handler))
    assert list(client.pages("/v1/vms", limit=1)) == [["a"], ["b"]]
    assert asked == [
        "http://127.0.0.1:8000/v1/vms?limit=1",
        "http://127.0.0.1:8000/v1/vms?limit=1&after=a",
    ]


def test_the_unix_client_sends_json_as_httpx_does() -> None:
    document = {"name": "web", "labels": {"tier": "é"}, "n": [1, 2.5, None, True]}
    assert json_body(document) == httpx.Request("POST", "http://roost", json=document).content
