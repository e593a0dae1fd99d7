"""The web view's serving and sessions with the real daemon, and `roost ui` as a real process
(no browser here: the requests say what Chromium and Firefox say): the daemon's `/ui/` log-in
and its HttpOnly, SameSite=Strict, Secure cookie, accepted on the API from the view's own origin
only; `roost ui`'s one-time token, its 401s, its forwarding (events streamed), log-out, and
Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from roost.api.sessions import CSP
from tests.certs import CA
from tests.harness import ROOT, Daemon, demo_plugin, process_alive, wait_for

pytestmark = [pytest.mark.root]

TOKEN = "ui-server-token"
SAME_ORIGIN = {"sec-fetch-site": "same-origin"}  # a page's own reads, EventSource included
EVIL = "https://evil.example"


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cookie_of(response: httpx.Response, name: str) -> tuple[str, set[str]]:
    """The value `Set-Cookie` gives cookie `name`, and its attributes in lower case."""
    for header in response.headers.get_list("set-cookie"):
        first, *attributes = (part.strip() for part in header.split(";"))
        key, _, value = first.partition("=")
        if key == name:
            return value, {attribute.lower() for attribute in attributes}
    raise AssertionError(f"no cookie {name} in {response.headers}")


@dataclass
class View:
    """The daemon's HTTPS listener, as a browser on its `/ui/` reaches it."""

    daemon: Daemon
    origin: str
    ca: Path
    token_file: Path

    def browser(self) -> httpx.Client:
        """A client that keeps no cookies of its own: each test says which it sends."""
        return httpx.Client(
            base_url=self.origin,
            verify=ssl.create_default_context(cafile=self.ca),
            timeout=30,
            cookies=None,
        )

    def log_in(self, browser: httpx.Client) -> str:
        answer = browser.post(
            "/ui/login",
            data={"token": TOKEN},
            headers={"origin": self.origin, "sec-fetch-site": "same-origin"},
        )
        assert answer.status_code == 303, answer.text
        browser.cookies.clear()
        return cookie_of(answer, "roost_session")[0]


@pytest.fixture
def view(netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[View]:
    monkeypatch.delenv("ROOST_TOKEN", raising=False)
    ca = CA.make(tmp_path)
    server = ca.issue("daemon", "IP:127.0.0.1")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    port = free_loopback_port()
    daemon = Daemon(
        netns,
        "--listen", f"tcp://127.0.0.1:{port}",
        "--tls-cert", str(server.cert),
        "--tls-key", str(server.key),
        "--token-file", str(token),
        firecracker=None,
    )  # fmt: skip
    try:
        daemon.start()
        yield View(daemon, f"https://127.0.0.1:{port}", ca.cert, token)
    finally:
        daemon.close()


def test_the_daemon_view_asks_for_the_token_and_hands_out_a_strict_secure_cookie(
    view: View,
) -> None:
    with view.browser() as browser:
        anonymous = browser.get("/ui/", headers={"sec-fetch-site": "none"})
        assert anonymous.status_code == 401
        assert 'name="token"' in anonymous.text
        assert anonymous.headers["content-security-policy"] == CSP
        assert browser.get("/ui/map", headers=SAME_ORIGIN).status_code == 401
        bare = browser.get("/ui")
        assert (bare.status_code, urlsplit(bare.headers["location"]).path) == (307, "/ui/")
        script = browser.get("/ui/static/common.js")  # the project's code, no data: open
        assert script.status_code == 200
        media_type = script.headers["content-type"].split(";")[0]
        assert media_type in ("text/javascript", "application/javascript")  # module scripts
        assert script.headers["x-content-type-options"] == "nosniff"
        assert script.headers["cache-control"] == "no-cache"
        form = browser.get("/ui/login")
        assert form.status_code == 200
        assert 'id="login-failed" class="form-error" role="alert" hidden>' in form.text
        same_page = {"origin": view.origin, "sec-fetch-site": "same-origin"}
        wrong = browser.post("/ui/login", data={"token": "not-it"}, headers=same_page)
        assert wrong.status_code == 401
        assert "set-cookie" not in wrong.headers
        assert 'id="login-failed" class="form-error" role="alert">' in wrong.text
        answer = browser.post("/ui/login", data={"token": TOKEN}, headers=same_page)
        assert (answer.status_code, answer.headers["location"]) == (303, "/ui/")
        session, attributes = cookie_of(answer, "roost_session")
        assert len(session) >= 43  # 256 bits, base64
        assert attributes == {"path=/", "httponly", "samesite=strict", "secure"}
        browser.cookies.clear()
        page = browser.get(
            "/ui/", headers={"cookie": f"roost_session={session}", "sec-fetch-site": "none"}
        )
        assert page.status_code == 200
        assert '<html lang="en" data-api="" data-base="/ui/"' in page.text
        assert '<base href="/ui/">' in page.text
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "same-origin"
        assert page.headers["cache-control"] == "no-store"


def test_a_log_in_posted_from_another_site_is_refused(view: View) -> None:
    with view.browser() as browser:
        answer = browser.post(
            "/ui/login",
            data={"token": TOKEN},
            headers={"origin": EVIL, "sec-fetch-site": "cross-site"},
        )
        assert answer.status_code == 403
        assert "set-cookie" not in answer.headers


def test_the_session_reaches_the_api_only_from_the_view_s_own_pages(view: View) -> None:
    with view.browser() as browser:
        session = {"cookie": f"roost_session={view.log_in(browser)}"}
        listed = browser.get("/v1/vms", headers={**session, **SAME_ORIGIN})
        assert (listed.status_code, listed.json()) == (200, [])
        own = {**session, "origin": view.origin}
        assert browser.get("/v1/vms", headers=own).status_code == 200
        for refused in (
            session,  # no sign of where it comes from: not a browser's page of the view
            {**session, "sec-fetch-site": "same-site"},
            {**session, "sec-fetch-site": "cross-site"},
            {**session, "origin": EVIL},
        ):
            answer = browser.get("/v1/vms", headers=refused)
            assert (answer.status_code, answer.json()["error"]["code"]) == (403, "forbidden")
        stop = "/v1/vms/nothing-here/stop"
        no_header = browser.post(stop, headers={**own, **SAME_ORIGIN})
        assert (no_header.status_code, no_header.json()["error"]["code"]) == (403, "forbidden")
        assert "X-Roost-UI" in no_header.json()["error"]["message"]
        cross = browser.post(stop, headers={**session, "origin": EVIL, "x-roost-ui": "1"})
        assert cross.status_code == 403
        reached = browser.post(stop, headers={**own, "x-roost-ui": "1"})
        assert (reached.status_code, reached.json()["error"]["code"]) == (404, "not_found")
        forged = browser.get("/v1/vms", headers={"cookie": "roost_session=made-up", **SAME_ORIGIN})
        assert (forged.status_code, forged.json()["error"]["code"]) == (401, "unauthorized")
        bearer = browser.get("/v1/vms", headers={"authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200
        for elsewhere in ("/docs", "/redoc", "/openapi.json"):  # the API's routes only
            answer = browser.get(elsewhere, headers={**session, "sec-fetch-site": "none"})
            assert (answer.status_code, answer.json()["error"]["code"]) == (401, "unauthorized")


def test_the_session_streams_events_to_an_event_source(view: View) -> None:
    with view.browser() as browser:
        session = {"cookie": f"roost_session={view.log_in(browser)}"}
        with browser.stream("GET", "/v1/events", headers={**session, **SAME_ORIGIN}) as events:
            assert events.status_code == 200
            assert next(events.iter_raw()).startswith(b"retry:")


def test_log_out_ends_the_session(view: View) -> None:
    with view.browser() as browser:
        session = {"cookie": f"roost_session={view.log_in(browser)}"}
        assert browser.get("/v1/vms", headers={**session, **SAME_ORIGIN}).status_code == 200
        cross = browser.post("/ui/logout", headers={**session, "origin": EVIL})
        assert cross.status_code == 403
        assert browser.get("/v1/vms", headers={**session, **SAME_ORIGIN}).status_code == 200
        out = browser.post("/ui/logout", headers={**session, "origin": view.origin})
        assert (out.status_code, out.headers["location"]) == (303, "/ui/login")
        assert "max-age=0" in cookie_of(out, "roost_session")[1]
        gone = browser.get("/v1/vms", headers={**session, **SAME_ORIGIN})
        assert (gone.status_code, gone.json()["error"]["code"]) == (401, "unauthorized")
        assert browser.get("/ui/", headers={**session, **SAME_ORIGIN}).status_code == 401


class LocalUI:
    """`roost ui` as a process against `daemon`, and the URL it printed."""

    def __init__(
        self,
        daemon: Daemon,
        *args: str,
        env: dict[str, str] | None = None,
        api: tuple[str | Path, ...] = (),
    ) -> None:
        """`api`: the root's options that reach the daemon (its Unix socket by default)."""
        reach = [str(option) for option in api] or ["--api", daemon.api]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "roost.cli.main", *reach, "ui", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), self.process.stderr
        parts = urlsplit(self.url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.http = httpx.Client(base_url=self.origin, timeout=30)

    def log_in(self) -> dict[str, str]:
        """The first load of the URL: the session, as the cookie header that carries it."""
        answer = self.http.get(self.url, headers={"sec-fetch-site": "none"})
        assert (answer.status_code, answer.headers["location"]) == (303, "/"), answer.text
        self.http.cookies.clear()
        return {"cookie": f"roost_ui={cookie_of(answer, 'roost_ui')[0]}"}

    def interrupt(self) -> int:
        """Ctrl-C; its exit code."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.communicate(timeout=20)
        finally:
            self.close()
        return self.process.returncode

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture
def local(netns: str) -> Iterator[LocalUI]:
    daemon = Daemon(netns, firecracker=None)
    try:
        daemon.start()
        ui = LocalUI(daemon)
        try:
            yield ui
        finally:
            ui.close()
    finally:
        daemon.close()


def test_roost_ui_exchanges_its_token_once_for_a_strict_http_only_cookie(
    local: LocalUI,
) -> None:
    http = local.http
    for path in ("/", "/map", "/vms/web-1", "/static/style.css", "/api/v1/vms"):
        answer = http.get(path, headers={"sec-fetch-site": "none"})
        assert answer.status_code == 401, path
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["cache-control"] == "no-store"
    assert http.head(local.url, headers={"sec-fetch-site": "none"}).status_code == 401
    answer = http.get(local.url, headers={"sec-fetch-site": "none"})
    assert (answer.status_code, answer.headers["location"]) == (303, "/")
    session, attributes = cookie_of(answer, "roost_ui")
    assert attributes == {"path=/", "httponly", "samesite=strict"}
    http.cookies.clear()
    again = http.get(local.url, headers={"sec-fetch-site": "none"})
    assert again.status_code == 401
    assert "set-cookie" not in again.headers
    cookie = {"cookie": f"roost_ui={session}"}
    page = http.get("/", headers={**cookie, "sec-fetch-site": "none"})
    assert page.status_code == 200
    assert '<html lang="en" data-api="/api" data-base="/"' in page.text
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["cache-control"] == "no-store"
    reload = http.get(local.url, headers={**cookie, "sec-fetch-site": "none"})
    assert (reload.status_code, reload.headers["location"]) == (303, "/")
    assert "set-cookie" not in reload.headers


def test_roost_ui_forwards_the_api_to_the_page_s_own_requests_only(local: LocalUI) -> None:
    http = local.http
    cookie = local.log_in()
    listed = http.get("/api/v1/vms", headers={**cookie, **SAME_ORIGIN})
    assert (listed.status_code, listed.json()) == (200, [])
    assert listed.headers["content-security-policy"] == CSP
    own = {**cookie, "origin": local.origin}
    stop = "/api/v1/vms/nothing-here/stop"
    assert http.post(stop, headers={**own, **SAME_ORIGIN}).status_code == 403  # no X-Roost-UI
    cross = http.post(stop, headers={**cookie, "origin": EVIL, "x-roost-ui": "1"})
    assert (cross.status_code, cross.json()["error"]["code"]) == (403, "forbidden")
    reached = http.post(stop, headers={**own, "x-roost-ui": "1"})
    assert (reached.status_code, reached.json()["error"]["code"]) == (404, "not_found")
    created = http.post(
        "/api/v1/networks",
        json={"name": "lab", "subnet": "10.77.0.0/24"},
        headers={**own, "x-roost-ui": "1"},
    )
    assert created.status_code == 201, created.text
    rebound = http.get("/", headers={**cookie, **SAME_ORIGIN, "host": "evil.example"})
    assert rebound.status_code == 421
    assert http.get("/api/healthz", headers={**cookie, **SAME_ORIGIN}).status_code == 404


def test_roost_ui_streams_events_as_the_daemon_sends_them(local: LocalUI, netns: str) -> None:
    cookie = local.log_in()
    with local.http.stream("GET", "/api/v1/events", headers={**cookie, **SAME_ORIGIN}) as events:
        assert events.status_code == 200
        assert events.headers["content-type"].startswith("text/event-stream")
        chunks = events.iter_raw()
        assert next(chunks).startswith(b"retry:")
        created = local.http.post(
            "/api/v1/networks",
            json={"name": "lab", "subnet": "10.77.0.0/24"},
            headers={**cookie, "origin": local.origin, "x-roost-ui": "1"},
        )
        assert created.status_code == 201, created.text
        seen = b""
        while b"\n\n" not in seen:
            seen += next(chunks)
        assert b"event: network.created" in seen
        assert b'"network": "lab"' in seen


def test_roost_ui_log_out_ends_the_session(local: LocalUI) -> None:
    cookie = local.log_in()
    assert local.http.get("/api/v1/vms", headers={**cookie, **SAME_ORIGIN}).status_code == 200
    out = local.http.post("/logout", headers={**cookie, "origin": local.origin})
    assert out.status_code == 200
    assert "max-age=0" in cookie_of(out, "roost_ui")[1]
    after = local.http.get("/api/v1/vms", headers={**cookie, **SAME_ORIGIN})
    assert after.status_code == 401


def test_ctrl_c_ends_roost_ui_with_exit_0_even_while_a_stream_is_open(
    local: LocalUI,
) -> None:
    cookie = local.log_in()
    pid = local.process.pid
    children = [
        int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ]
    with local.http.stream("GET", "/api/v1/events", headers={**cookie, **SAME_ORIGIN}) as events:
        assert next(events.iter_raw()).startswith(b"retry:")
        assert local.interrupt() == 0
    assert not any(process_alive(process) for process in [pid, *children])


def test_roost_ui_open_hands_its_url_to_the_web_browser(netns: str, tmp_path: Path) -> None:
    opened = tmp_path / "opened"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    browser.chmod(0o755)
    daemon = Daemon(netns, firecracker=None)
    try:
        daemon.start()
        ui = LocalUI(
            daemon, "--port", str(free_loopback_port()), "--open", env={"BROWSER": str(browser)}
        )
        try:
            given = wait_for(
                lambda: opened.exists() and opened.read_text().strip(), what="the browser's URL"
            )
            # the browser's command line, which any local user can read, never holds the token:
            # it gets a page only this user can read, which moves on to the tokened URL
            assert ui.url.split("?token=")[1] not in given
            page = Path(urlsplit(given).path)
            assert page.stat().st_mode & 0o777 == 0o600
            assert page.parent.stat().st_mode & 0o777 == 0o700
            assert f'http-equiv="refresh" content="0; url={ui.url}"' in page.read_text()
            # arriving from that page is a cross-site navigation: the session is set by a page
            # that moves on to / itself, so the SameSite=Strict cookie goes along
            entered = ui.http.get(ui.url, headers={"sec-fetch-site": "cross-site"})
            assert entered.status_code == 200
            assert 'http-equiv="refresh" content="0; url=/"' in entered.text
            assert cookie_of(entered, "roost_ui")[1] == {"path=/", "httponly", "samesite=strict"}
        finally:
            assert ui.interrupt() == 0
        assert not page.parent.exists()  # removed when roost ui ends
    finally:
        daemon.close()


def test_roost_ui_without_a_daemon_says_so_and_serves_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "roost.cli.main", "--api", f"unix://{tmp_path}/none.sock", "ui"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (5, "")
    assert "cannot reach the roost daemon" in result.stderr


@pytest.mark.firecracker
@pytest.mark.kvm
def test_roost_ui_follows_a_console_until_its_vm_stops(netns: str, tmp_path: Path) -> None:
    daemon = Daemon(netns)
    try:
        daemon.start()
        daemon.ok("plugin", "install", demo_plugin(tmp_path, "demo", network={"mode": "vsock"}))
        vm = daemon.ok("vm", "create", "c1", "--plugin", "demo")
        assert vm["status"] == "running"  # so its console is followed until it stops
        ui = LocalUI(daemon)
        try:
            cookie = ui.log_in()
            follow = {"follow": "true"}
            headers = {**cookie, **SAME_ORIGIN}
            path = "/api/v1/vms/c1/console"
            with ui.http.stream("GET", path, params=follow, headers=headers) as console:
                assert console.status_code == 200
                assert console.headers["content-type"].startswith("text/plain")
                stopped = daemon.http.post("/v1/vms/c1/stop", params={"force": "true"})
                assert stopped.json()["status"] == "stopped"
                followed = console.read()  # the stream ends once the VM stopped
            log = Path(vm["vmm"]["api_socket"]).parent / "console.log"
            assert log.read_bytes().startswith(followed)
        finally:
            assert ui.interrupt() == 0
    finally:
        daemon.close()


def test_roost_ui_reaches_an_https_daemon_with_the_cli_s_ca_and_token(view: View) -> None:
    ui = LocalUI(
        view.daemon, api=("--api", view.origin, "--ca", view.ca, "--token-file", view.token_file)
    )
    try:
        cookie = ui.log_in()
        listed = ui.http.get("/api/v1/vms", headers={**cookie, **SAME_ORIGIN})
        assert (listed.status_code, listed.json()) == (200, [])
    finally:
        assert ui.interrupt() == 0
    stranger = subprocess.run(
        [sys.executable, "-m", "roost.cli.main", "--api", view.origin, "--ca", str(view.ca), "ui"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert stranger.returncode == 5 and "Authorization: Bearer" in stranger.stderr
