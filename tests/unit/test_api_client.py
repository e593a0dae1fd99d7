"""The CLI's client of the API: it sends the token, asks a busy or recovering daemon again as
told, rebuilds a streamed error with its own code, and reports a bad address as input."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from roost.cli.client import Client
from roost.cli.main import app
from roost.errors import RoostError

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, api: str = "unix:///run/roost/roost.sock", **kwargs: Any) -> Client:
    return Client(api, transport=httpx.MockTransport(handler), **kwargs)


def refusal(code: str, retry_after: str | None = "0") -> httpx.Response:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    body = {"error": {"code": code, "message": f"the daemon says {code}", "details": []}}
    return httpx.Response(503, json=body, headers=headers)


def test_roost_token_goes_out_as_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json=[])

    monkeypatch.setenv("ROOST_TOKEN", "s3cret")
    client(handler, "tcp://127.0.0.1:8000").call("GET", "/v1/vms")
    monkeypatch.delenv("ROOST_TOKEN")
    client(handler, "tcp://127.0.0.1:8000").call("GET", "/v1/vms")
    assert seen == ["Bearer s3cret", None]


def test_an_ipv6_daemon_is_asked_with_its_address_in_brackets() -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.headers["host"])
        return httpx.Response(200, json=[])

    client(handler, "tcp://[::1]:8000").call("GET", "/v1/vms")
    assert hosts == ["[::1]:8000"]


@pytest.mark.parametrize("code", ["busy", "recovering"])
def test_busy_and_recovering_are_asked_again_until_an_answer(code: str) -> None:
    answers = [refusal(code), refusal(code), httpx.Response(201, json={"name": "x"})]
    asked: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.content)
        return answers.pop(0)

    assert client(handler).call("POST", "/v1/vms", body={"name": "x"}) == {"name": "x"}
    assert len(asked) == 3 and len(set(asked)) == 1


def test_retry_after_is_waited_for() -> None:
    answers = [refusal("busy", "1"), httpx.Response(200, json=[])]
    began = time.monotonic()
    assert client(lambda _: answers.pop(0)).call("GET", "/v1/vms") == []
    assert time.monotonic() - began >= 1


def test_a_daemon_busy_past_the_clients_timeout_is_a_timeout_exit_6() -> None:
    with pytest.raises(RoostError) as caught:
        client(lambda _: refusal("busy", "1"), timeout=0.5).call("POST", "/v1/vms/x/stop")
    assert (caught.value.code, caught.value.exit_code) == ("timeout", 6)
    assert "busy" in caught.value.message


@pytest.mark.parametrize("code", ["vmm_unavailable", "database_gone", "internal"])
def test_other_503s_are_not_asked_again(code: str) -> None:
    answers = [refusal(code)]
    with pytest.raises(RoostError) as caught:
        client(lambda _: answers.pop(0)).call("POST", "/v1/vms/x/start")
    assert caught.value.code == code


def test_unauthorized_exits_5() -> None:
    body = {"error": {"code": "unauthorized", "message": "no token", "details": []}}
    with pytest.raises(RoostError) as caught:
        client(lambda _: httpx.Response(401, json=body)).call("GET", "/v1/vms")
    assert (caught.value.code, caught.value.exit_code) == ("unauthorized", 5)


def ndjson(*lines: dict[str, Any]) -> httpx.Response:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    return httpx.Response(201, text=text, headers={"content-type": "application/x-ndjson"})


@pytest.mark.parametrize(
    ("code", "rebuilt", "exit_code"),
    [
        ("no_space", "no_space", 6),
        ("internal", "internal", 6),
        ("invalid", "invalid", 1),
        ("not_found", "not_found", 3),
        ("a_code_from_a_newer_daemon", "internal", 6),
    ],
)
def test_a_streamed_error_is_rebuilt_with_its_own_code(
    code: str, rebuilt: str, exit_code: int
) -> None:
    events: list[dict[str, Any]] = []
    answer = ndjson(
        {"event": "artifact", "role": "kernel", "source": "/k"},
        {"error": {"code": code, "message": "it went wrong", "details": []}},
    )
    with pytest.raises(RoostError) as caught:
        client(lambda _: answer).stream("POST", "/v1/plugins", body={}, on_event=events.append)
    assert (caught.value.code, caught.value.exit_code) == (rebuilt, exit_code)
    assert events == [{"event": "artifact", "role": "kernel", "source": "/k"}]


def test_a_busy_install_is_asked_again_before_it_streams() -> None:
    answers = [refusal("busy"), ndjson({"event": "artifact"}, {"name": "p"})]
    events: list[dict[str, Any]] = []
    result = client(lambda _: answers.pop(0)).stream(
        "POST", "/v1/plugins", body={}, on_event=events.append
    )
    assert result == {"name": "p"}
    assert events == [{"event": "artifact"}]


@pytest.mark.parametrize(
    "api",
    [
        "tcp://127.0.0.1:99999",
        "tcp://127.0.0.1:port",
        "tcp://[::1",
        "unix://host/run/roost.sock",
        "http://127.0.0.1:8000",
        "unix://",
    ],
)
def test_a_bad_roost_api_is_invalid_input_not_a_traceback(
    api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROOST_API", api)
    result = CliRunner().invoke(app, ["vm", "list"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr
    assert "ROOST_API" in result.stderr or "api:" in result.stderr


def test_a_token_of_any_letters_goes_out_as_its_utf8_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.headers.raw)[b"authorization"])
        return httpx.Response(200, json=[])

    monkeypatch.setenv("ROOST_TOKEN", "clé-été")
    client(handler, "tcp://127.0.0.1:8000").call("GET", "/v1/vms")
    assert seen == [b"Bearer " + "clé-été".encode()]


@pytest.mark.parametrize("token", ["two words", "line\n", "tab\there", "bell\x07"])
def test_a_token_with_spaces_or_control_characters_is_invalid_input(
    token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROOST_TOKEN", token)
    monkeypatch.setenv("ROOST_API", "tcp://127.0.0.1:8000")
    result = CliRunner().invoke(app, ["vm", "list"])
    assert result.exit_code == 1, result.output
    assert "ROOST_TOKEN" in result.stderr
