"""Schemathesis against roost's own OpenAPI, with the whole daemon inside a throwaway namespace.

The daemon process itself runs under `ip netns exec` in a fresh namespace that has nothing but
loopback, listening on `tcp://127.0.0.1:PORT` with a token (sent as `Authorization: Bearer`),
so nothing a generated request names (a URL to download, an address) can leave that namespace.
Its state dir is throwaway, and `--artifact-dir` confines the paths TCP clients may name to a
directory inside it, where the two installed plugins' artifacts live. Every request is sent from
a thread that entered the namespace (`NetnsWorker`).

For every operation of the schema, positive and negative cases (some aimed at the plugin and
VM that exist) must get: no 500, an answer within the per-request timeout, and for every error
roost's error object (`code` in `CODES` with that code's status, a non-empty `message`). After
the run the daemon must still be alive and answer `/healthz`, with no traceback in its log.

`ROOST_FUZZ_EXAMPLES` sets the examples per operation and generation mode: up to twice that
many cases per operation. The default, 3, is `make test`'s (CI's): enough for roost to answer
cases of every operation, which the test checks, in about 20 s here (8, the old default, took
about 33 s); a longer run is in the README's tests section.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from roost.errors import CODES
from roost.host.netns import NetnsWorker
from tests.harness import FIRECRACKER, INITRAMFS, KERNEL, network_namespace, run, short_tmp

pytestmark = [pytest.mark.root, pytest.mark.firecracker]

EXAMPLES = int(os.environ.get("ROOST_FUZZ_EXAMPLES", "3"))
REQUEST_TIMEOUT = 30.0  # seconds: longer than any honest answer (a stop waits at most 3 s here)
PORT = 8080  # the namespace is the daemon's alone
TOKEN = secrets.token_urlsafe(24)
PLUGIN = "fuzz-base"
SECOND_PLUGIN = "fuzz-other"
VM = "fuzz-vm"
# answers that stream for as long as the client reads: only their status and headers are read
STREAMS = ("/v1/events", "/v1/vms/{name}/console")


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes


@dataclass
class Isolated:
    """A `roost serve` process inside `netns`, reached from a thread inside it."""

    netns: str
    dir: Path
    worker: NetnsWorker
    process: subprocess.Popen[bytes] | None = None
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{PORT}"

    @property
    def artifacts(self) -> Path:
        """Where the plugins' artifacts live, the one directory TCP clients may name paths in."""
        return self.dir / "state" / "artifacts-in"

    @property
    def log(self) -> Path:
        return self.dir / "daemon.log"

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def send(self, stream: bool = False, token: bool = True, **kwargs: Any) -> Answer:
        """One request from inside the namespace, with the token and the per-request timeout;
        a streaming answer's body is left unread."""

        def call() -> Answer:
            headers = dict(kwargs.pop("headers", None) or {})
            if token:
                headers["Authorization"] = f"Bearer {TOKEN}"
            with self.session.request(
                headers=headers, timeout=REQUEST_TIMEOUT, stream=True, **kwargs
            ) as response:
                body = b"" if stream and response.status_code == 200 else response.content
                return Answer(response.status_code, response.headers.get("content-type", ""), body)

        return self.worker.run(call)

    def api(self, method: str, path: str, **kwargs: Any) -> Answer:
        return self.send(method=method, url=self.base_url + path, **kwargs)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def manifest(artifacts: Path, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1.0.0",
        "kernel": {"path": str(artifacts / "vmlinux")},
        "initramfs": {"path": str(artifacts / "initramfs.cpio.gz")},
        "boot_args": "console=ttyS0 reboot=k panic=1",
    }


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon by its PID and reap it (SIGKILL after 30 s)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def isolated() -> Iterator[Isolated]:
    with network_namespace() as netns:  # deleted, with whatever still runs in it, even on failure
        directory = short_tmp()
        daemon = None
        try:
            run("ip", "link", "set", "lo", "up", netns=netns)
            artifacts = directory / "state" / "artifacts-in"
            artifacts.mkdir(parents=True)
            link_or_copy(KERNEL, artifacts / "vmlinux")
            link_or_copy(INITRAMFS, artifacts / "initramfs.cpio.gz")
            daemon = Isolated(netns, directory, NetnsWorker(netns))
            with daemon.log.open("ab") as sink:
                # `ip netns exec` execs the command: the PID is the daemon's own
                daemon.process = subprocess.Popen(
                    [
                        "ip", "netns", "exec", netns,
                        sys.executable, "-m", "roost.cli.main", "serve",
                        "--state-dir", str(directory / "state"),
                        "--run-dir", str(directory / "run"),
                        "--listen", f"tcp://127.0.0.1:{PORT}",
                        "--artifact-dir", str(artifacts),
                        "--default-subnet", "10.99.0.0/24",
                        "--firecracker", str(FIRECRACKER),
                    ],
                    stdout=sink,
                    stderr=sink,
                    start_new_session=True,
                    env={**os.environ, "ROOST_TOKEN": TOKEN},
                )  # fmt: skip
            wait_healthy(daemon)
            for name in (PLUGIN, SECOND_PLUGIN):
                answer = daemon.api("POST", "/v1/plugins", json=manifest(artifacts, name))
                assert answer.status == 201, answer
            yield daemon
        finally:
            if daemon is not None:
                close(daemon)
            shutil.rmtree(directory, ignore_errors=True)


def close(daemon: Isolated) -> None:
    """Remove the VMs through the API (ending their VMMs), then end the daemon by its PID and
    reap it."""
    try:
        if daemon.alive():
            with contextlib.suppress(requests.RequestException, ValueError):
                for vm in json.loads(daemon.api("GET", "/v1/vms").body):
                    daemon.api("DELETE", f"/v1/vms/{quote(vm['name'], safe='')}")
    finally:
        if daemon.process is not None:
            stop_process(daemon.process)
        daemon.session.close()
        daemon.worker.close()


def wait_healthy(daemon: Isolated, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not daemon.alive():
            raise RuntimeError(f"daemon exited:\n{daemon.logs()}")
        with contextlib.suppress(requests.ConnectionError):
            if daemon.api("GET", "/healthz").status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not answer within {timeout}s:\n{daemon.logs()}")
        time.sleep(0.05)


def check_answer(answer: Answer, what: str) -> None:
    """No 500; every error is roost's error object, with a known code, that code's status and a
    message saying what was wrong."""
    assert answer.status != 500, f"500 for {what}: {answer.body[:2000]!r}"
    if answer.status < 400:
        return
    try:
        body = json.loads(answer.body)
    except ValueError:
        raise AssertionError(
            f"{answer.status} without JSON for {what}: {answer.body[:500]!r}"
        ) from None
    assert isinstance(body, dict) and set(body) == {"error"}, f"{what}: {body}"
    error = body["error"]
    assert isinstance(error, dict), f"{what}: {body}"
    assert error.get("code") in CODES, f"unknown code for {what}: {error}"
    assert CODES[error["code"]].http_status == answer.status, f"{answer.status} for {what}: {error}"
    assert isinstance(error.get("message"), str) and error["message"].strip(), f"{what}: {error}"


def ensure_fixtures(daemon: Isolated) -> None:
    """The plugins and the (stopped) VM the named routes aim at, again if a case removed them."""
    for name in (PLUGIN, SECOND_PLUGIN):
        if daemon.api("GET", f"/v1/plugins/{name}").status == 404:
            answer = daemon.api("POST", "/v1/plugins", json=manifest(daemon.artifacts, name))
            assert answer.status == 201, answer
    if daemon.api("GET", f"/v1/vms/{VM}").status == 404:
        body = {"name": VM, "plugin": PLUGIN, "start": False}
        answer = daemon.api("POST", "/v1/vms", json=body)
        assert answer.status == 201, answer


def undo(daemon: Isolated, method: str, path: str, answer: Answer) -> None:
    """Remove what a case created (other than the fixtures), so cases stay independent."""
    if answer.status != 201 or method != "POST" or path not in ("/v1/vms", "/v1/plugins"):
        return
    name = json.loads(answer.body).get("name")
    if isinstance(name, str) and name not in (VM, PLUGIN, SECOND_PLUGIN):
        daemon.api("DELETE", f"{path}/{quote(name, safe='')}")


def aim(daemon: Isolated, operation: Any, case: Any, data: st.DataObject) -> None:
    """Now and then point a generated body at what exists: a create at an installed plugin
    with a usable name, an install at the artifacts it may name; the rest stays generated."""
    if not isinstance(case.body, dict) or not data.draw(st.booleans(), label="aimed"):
        return
    artifacts = [str(daemon.artifacts / "vmlinux"), str(daemon.artifacts / "initramfs.cpio.gz")]
    label = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
    if operation.label not in ("POST /v1/vms", "POST /v1/plugins"):
        return
    keep = data.draw(st.sets(st.sampled_from(sorted(case.body))) if case.body else st.just(set()))
    body = {key: value for key, value in case.body.items() if key in keep}
    body["name"] = data.draw(label)
    if operation.label == "POST /v1/vms":
        body["plugin"] = data.draw(st.sampled_from([PLUGIN, SECOND_PLUGIN]))
    else:
        body.update(schema_version="1", version="1.0")
        body["kernel"] = {"path": artifacts[0]}
        body["initramfs"] = {"path": data.draw(st.sampled_from(artifacts[::-1]))}
    case.body = body


def operation_strategy(operation: Any) -> st.SearchStrategy[Any]:
    """Positive and negative cases; half of those with a `name` aim it at what exists."""
    names = st.sampled_from([VM, PLUGIN, SECOND_PLUGIN])
    named = "{name}" in operation.path
    strategies = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategies.append(operation.as_strategy(generation_mode=mode))
        if named:
            strategies.append(
                names.flatmap(
                    lambda name, mode=mode: operation.as_strategy(
                        generation_mode=mode, path_parameters={"name": name}
                    )
                )
            )
    return st.one_of(strategies)


def fuzz_operation(
    daemon: Isolated, operation: Any, seen: Counter[str], answered: set[str]
) -> None:
    """Up to `EXAMPLES * 2` cases; `answered` gets the operation once roost answers one."""
    streaming = operation.path in STREAMS

    @settings(
        max_examples=EXAMPLES * 2,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=operation_strategy(operation), data=st.data())
    def one(case: Any, data: st.DataObject) -> None:
        aim(daemon, operation, case, data)
        if operation.path == "/v1/vms/{name}/stop" and isinstance(case.query, dict):
            # a graceful stop honestly waits as long as asked (up to an hour): keep it short
            wait = case.query.get("timeout")
            if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 2:
                case.query["timeout"] = 2
        kwargs = case.as_transport_kwargs(base_url=daemon.base_url)
        what = f"{case.method} {case.formatted_path}: {case.as_curl_command()}"
        try:
            answer = daemon.send(stream=streaming, **kwargs)
        except (requests.exceptions.InvalidJSONError, UnicodeEncodeError, ValueError):
            reject()  # a request the client library refuses to send never reaches roost
        except requests.Timeout:
            raise AssertionError(f"no answer within {REQUEST_TIMEOUT}s for {what}") from None
        seen[f"{operation.label} {answer.status}"] += 1
        answered.add(operation.label)
        check_answer(answer, what)
        undo(daemon, case.method, operation.path, answer)

    one()


def test_schemathesis_finds_no_500_hang_or_crash(isolated: Isolated) -> None:
    # the token is in force: without it, roost's own 401
    check_answer(anonymous := isolated.api("GET", "/v1/vms", token=False), "no token")
    assert anonymous.status == 401, anonymous
    spec = json.loads(isolated.api("GET", "/openapi.json").body)
    seen: Counter[str] = Counter()
    answered: set[str] = set()
    schema = schemathesis.openapi.from_dict(spec)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20, [op.label for op in operations]
    # the removals last, so the others see the fixtures more often
    operations.sort(key=lambda op: op.method.upper() == "DELETE")
    for operation in operations:
        ensure_fixtures(isolated)
        try:
            fuzz_operation(isolated, operation, seen, answered)
        except Exception as error:  # every operation gets its run, and all failures are told
            failures.append(f"{operation.label}: {type(error).__name__}: {error}")
        assert isolated.alive(), f"the daemon died during {operation.label}:\n{isolated.logs()}"
    print("answers seen:", *sorted(seen.items()), sep="\n  ")
    assert isolated.api("GET", "/healthz").status == 200
    assert isolated.alive()
    assert not failures, "\n\n".join(failures)
    # however few the examples, roost answered cases of every operation
    unanswered = {operation.label for operation in operations} - answered
    assert not unanswered, unanswered
    assert "Traceback" not in isolated.logs(), isolated.logs()[-5000:]
