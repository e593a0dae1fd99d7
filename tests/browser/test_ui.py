"""The web view in a real browser: Debian's Chromium, driven by Playwright, against a real daemon
in a throwaway namespace (Firecracker VMs made with the CLI), through `roost ui` (the CLI's own
process, its printed URL) and once through the daemon's `/ui/` log-in on a TCP listener.

One daemon, one `roost ui` and one browser serve the whole module (the tests share them, in any
order: each reads what it expects from the API). Every test ends by checking that the page
logged no console error but the 4xx answers it provoked itself (Chromium logs each as "Failed to
load resource"). With ROOST_UI_SCREENSHOTS=DIR the VM table and the network map are saved
there as PNGs (the README's come from `ROOST_UI_SCREENSHOTS=docs`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from tests.harness import ROOT, Daemon, demo_plugin, network_namespace, process_alive, wait_for

CHROMIUM = Path(os.environ.get("ROOST_TEST_CHROMIUM", "/usr/bin/chromium"))
# Playwright adds --headless, --no-sandbox (needed as root) and a fresh --user-data-dir it
# removes at close; these keep Chromium from calling any host of its own (the network is closed)
CHROMIUM_FLAGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KVM = Path("/dev/kvm")
SCREENSHOTS = os.environ.get("ROOST_UI_SCREENSHOTS")
VIEWPORT: ViewportSize = {"width": 1280, "height": 720}
TOKEN = "browser-test-token"
BRIDGED = {"mode": "bridged", "subnet": "10.70.0.0/24", "auto_assign": True}
# were it put in the page as markup, the image would fail to load and rename the tab
MARKUP = "<img src=x onerror=document.title='xss'>"
WAIT_MS = 20_000

pytestmark = [
    pytest.mark.root,
    pytest.mark.firecracker,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs {CHROMIUM}; run make setup"),
    pytest.mark.xdist_group("browser"),  # one daemon and one browser for the module
]


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Roost:
    """The daemon, with the origin of its TCP listener (whose `/ui/` takes TOKEN)."""

    daemon: Daemon
    tcp_origin: str

    def vms(self) -> list[dict[str, Any]]:
        return list(self.daemon.http.get("/v1/vms").json())

    def networks(self) -> list[dict[str, Any]]:
        return list(self.daemon.http.get("/v1/networks").json())


@pytest.fixture(scope="module")
def roost() -> Iterator[Roost]:
    """A daemon with plugin `demo` (bridged on 10.70.0.0/24), network `lab`, and VMs made with
    the CLI: web-1 running (where KVM is), worker-2 bridged, two-nics on both networks and
    isolated with vsock only (the three not started, so their status stays put)."""
    port = free_loopback_port()
    with network_namespace() as netns:
        daemon = Daemon(netns, "--listen", f"tcp://127.0.0.1:{port}")
        try:
            token = daemon.dir / "token"  # the daemon's dir, removed with it
            token.write_text(TOKEN)
            daemon.start("--token-file", str(token))
            daemon.ok("plugin", "install", demo_plugin(daemon.dir, "demo", network=BRIDGED))
            daemon.ok("network", "create", "lab", "--subnet", "10.77.0.0/24")
            boot = [] if KVM.exists() else ["--no-start"]  # the Stop test is skipped then
            daemon.ok("vm", "create", "web-1", "--plugin", "demo", *boot)
            daemon.ok("vm", "create", "worker-2", "--plugin", "demo", "--no-start")
            daemon.ok(
                "vm", "create", "two-nics", "--plugin", "demo", "--no-start",
                "--interface", "mode=bridged", "--interface", "mode=bridged,network=lab",
            )  # fmt: skip
            daemon.ok(
                "vm", "create", "isolated", "--plugin", "demo", "--network-mode", "vsock",
                "--no-start",
            )  # fmt: skip
            yield Roost(daemon, f"http://127.0.0.1:{port}")
        finally:
            daemon.close()


@pytest.fixture(scope="module")
def roost_ui(roost: Roost) -> Iterator[str]:
    """`roost ui` as its own process against the daemon's Unix socket: the URL it printed. It
    must end with exit 0 on Ctrl-C."""
    env = {name: value for name, value in os.environ.items() if name != "ROOST_TOKEN"}
    process = subprocess.Popen(
        [sys.executable, "-m", "roost.cli.main", "--api", roost.daemon.api, "ui"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            process.kill()
            pytest.fail(f"roost ui printed {url!r}: {process.communicate()[1]}")
        yield url
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids = [int(child) for child in children.read_text().split()]
        except OSError:
            continue
        for child in pids:
            found += [child, *descendants(child)]
    return found


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium (Debian's, never a downloaded one); once closed, none of its
    processes runs and its profile directory is gone."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        expect.set_options(timeout=WAIT_MS)  # a page's first load may wait on a busy machine
        processes = [
            pid for pid in descendants(os.getpid()) if "chromium" in " ".join(command_line(pid))
        ]
        profiles = {
            Path(argument.partition("=")[2])
            for pid in processes
            for argument in command_line(pid)
            if argument.startswith("--user-data-dir=")
        }
        try:
            yield launched
        finally:
            launched.close()
    assert processes and not [pid for pid in processes if process_alive(pid)]
    assert profiles and not [profile for profile in profiles if profile.exists()]


@dataclass
class Logged:
    """A console error or warning of a page, or an uncaught exception."""

    kind: str
    text: str
    url: str


@dataclass
class View:
    """A browser tab on the web view of the server at `origin`, mounted at `mount` ("" under
    `roost ui`, "/ui" on the daemon) with its API at `api` ("/api" and ""), and what the tab
    logged."""

    page: Page
    origin: str
    mount: str
    api: str
    logged: list[Logged] = field(default_factory=list)

    def watch(self) -> View:
        def console(message: ConsoleMessage) -> None:
            if message.type in ("error", "warning", "assert"):
                self.logged.append(Logged(message.type, message.text, message.location["url"]))

        self.page.on("console", console)
        self.page.on(
            "pageerror", lambda error: self.logged.append(Logged("uncaught", str(error), ""))
        )
        return self

    def open(self, path: str) -> Page:
        """Load a page (path under the view's mount) and wait for its event stream."""
        self.page.goto(self.origin + self.mount + path)
        expect(self.page.locator("#live")).to_have_text("● live")
        return self.page

    def console_errors(self, *provoked: tuple[int, str]) -> list[Logged]:
        """What the page logged but Chromium's line for each answer (status, path on the
        server) the test provoked on purpose."""
        expected = {
            (f"Failed to load resource: the server responded with a status of {status} ",
             self.origin + path)
            for status, path in provoked
        }  # fmt: skip
        return [
            entry
            for entry in self.logged
            if not any(entry.text.startswith(text) and entry.url == url for text, url in expected)
        ]


@pytest.fixture(scope="module")
def session(browser: Browser, roost_ui: str) -> Iterator[View]:
    """A tab that opened `roost ui`'s URL once (its one-time token, exchanged for the
    cookie)."""
    context = browser.new_context(viewport=VIEWPORT, color_scheme="light")
    try:
        view = View(context.new_page(), roost_ui.split("/?", 1)[0], "", "/api").watch()
        view.page.goto(roost_ui)
        expect(view.page).to_have_url(view.origin + "/")
        expect(view.page.locator("#live")).to_have_text("● live")
        yield view
    finally:
        context.close()


@pytest.fixture
def view(session: View) -> View:
    """The shared tab, with nothing logged yet for this test."""
    session.logged.clear()
    return session


def table(page: Page) -> dict[str, str]:
    """The VM table's rows: status by name."""
    rows = page.eval_on_selector_all(
        "#vms tbody tr", "rows => rows.map(row => [row.dataset.name, row.dataset.status])"
    )
    return dict(rows)


def shows_every_vm(page: Page, roost: Roost) -> bool:
    return table(page) == {vm["name"]: vm["status"] for vm in roost.vms()}


def screenshot(page: Page, name: str) -> None:
    """The page down to the end of its content, as DIR/`name` when ROOST_UI_SCREENSHOTS=DIR."""
    if not SCREENSHOTS:
        return
    directory = ROOT / SCREENSHOTS
    directory.mkdir(parents=True, exist_ok=True)
    bottom = page.evaluate(
        "Math.ceil(document.querySelector('main').getBoundingClientRect().bottom)"
    )
    height = min(int(bottom) + 16, VIEWPORT["height"])
    page.screenshot(
        path=directory / name, clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height}
    )


def test_the_vm_table_shows_every_vm_with_its_status_and_addresses(
    roost: Roost, view: View
) -> None:
    page = view.open("/")
    wait_for(
        lambda: shows_every_vm(page, roost),
        timeout=WAIT_MS / 1000,
        what="the table to show the VMs",
    )
    web = page.locator('#vms tbody tr[data-name="web-1"]')
    address = roost.daemon.ok("vm", "show", "web-1")["network"]["ip"]
    expect(web.locator('td[data-label="Addresses"]')).to_contain_text(address)
    expect(web.locator('td[data-label="Plugin"]')).to_have_text("demo")
    screenshot(page, "ui-vm-table.png")
    assert view.console_errors() == []


def test_a_vm_created_with_the_cli_appears_without_a_reload(roost: Roost, view: View) -> None:
    page = view.open("/")
    page.evaluate("window.sameDocument = true")
    roost.daemon.ok("vm", "create", "cli-made", "--plugin", "demo", "--no-start")
    try:
        row = page.locator('#vms tbody tr[data-name="cli-made"]')
        expect(row).to_have_attribute("data-status", "created")
        assert page.evaluate("window.sameDocument") is True
    finally:
        roost.daemon.ok("vm", "rm", "cli-made")
    expect(row).to_have_count(0)
    assert page.evaluate("window.sameDocument") is True
    assert view.console_errors() == []


@pytest.mark.kvm
def test_stop_on_a_vm_s_page_stops_it_in_the_page_and_in_vm_show(roost: Roost, view: View) -> None:
    if roost.daemon.ok("vm", "show", "web-1")["status"] != "running":
        roost.daemon.ok("vm", "start", "web-1")
    page = view.open("/vms/web-1")
    status = page.locator("#vm-status .status")
    expect(status).to_have_attribute("data-status", "running")
    page.locator('#actions button[data-action="stop"]').click()
    expect(status).to_have_attribute("data-status", "stopped", timeout=60_000)
    assert roost.daemon.ok("vm", "show", "web-1")["status"] == "stopped"
    assert view.console_errors() == []


def test_a_gateway_outside_its_subnet_is_refused_at_the_gateway_field_and_changes_nothing(
    roost: Roost, view: View
) -> None:
    history = roost.daemon.ok("vm", "config", "history", "worker-2")
    page = view.open("/vms/worker-2")
    expect(page.locator("#versions details[data-version]")).to_have_count(len(history))
    expect(page.locator("#f-mode")).to_have_value("bridged")
    page.locator("#f-subnet").fill("10.70.0.0/24")
    page.locator("#f-gateway").fill("10.99.0.1")
    page.locator('form#patch button[type="submit"]').click()
    error = page.locator('.field:has(#f-gateway) p.field-error[data-loc="network.gateway"]')
    expect(error).to_be_visible()
    expect(error).to_contain_text("10.99.0.1")
    expect(page.locator("#f-gateway")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("p.field-error")).to_have_count(1)
    expect(page.locator("#patch-error")).to_be_hidden()
    assert roost.daemon.ok("vm", "config", "history", "worker-2") == history
    expect(page.locator("#versions details[data-version]")).to_have_count(len(history))
    assert view.console_errors((422, "/api/v1/vms/worker-2/config")) == []


def test_a_label_holding_markup_is_shown_as_text_and_runs_nothing(roost: Roost, view: View) -> None:
    roost.daemon.ok(
        "vm", "create", "labelled", "--plugin", "demo", "--no-start", "--label", f"note={MARKUP}"
    )
    try:
        page = view.open("/")
        label = page.locator('#vms tbody tr[data-name="labelled"] ul.labels li')
        expect(label).to_have_text(f"note={MARKUP}")
        assert page.locator("#vms img").count() == 0
        assert page.title() == "VMs · roost"
        page = view.open("/vms/labelled")
        expect(page.locator("#vm-name")).to_have_text("labelled")
        expect(page.locator("#summary")).to_contain_text(MARKUP)
        assert page.locator("main img").count() == 0
        assert page.title() == "labelled · roost"
    finally:
        roost.daemon.ok("vm", "rm", "labelled")
    assert view.console_errors() == []


def test_the_network_map_draws_one_node_per_vm_and_per_bridge(roost: Roost, view: View) -> None:
    page = view.open("/map")
    vms, networks = roost.vms(), roost.networks()
    expect(page.locator("svg.map g.vm")).to_have_count(len(vms))
    drawn_vms = page.eval_on_selector_all("svg.map g.vm", "nodes => nodes.map(n => n.dataset.name)")
    assert sorted(drawn_vms) == sorted(vm["name"] for vm in vms)
    interfaces = [nic for vm in vms for nic in vm["interfaces"]]
    bridges = {network["bridge"] for network in networks} | {nic["bridge"] for nic in interfaces}
    drawn_networks = page.eval_on_selector_all(
        "svg.map g.network", "nodes => nodes.map(n => [n.dataset.name, n.dataset.bridge])"
    )
    assert sorted(bridge for _, bridge in drawn_networks) == sorted(bridges)
    assert {network["name"] for network in networks} <= {name for name, _ in drawn_networks}
    expect(page.locator("svg.map g.edge")).to_have_count(len(interfaces))
    expect(page.locator('svg.map g.vm.isolated[data-name="isolated"]')).to_have_count(1)
    screenshot(page, "ui-network-map.png")
    assert view.console_errors() == []


def test_the_networks_plugins_hosts_and_events_pages_show_what_the_daemon_holds(
    roost: Roost, view: View
) -> None:
    page = view.open("/networks")
    names = sorted(network["name"] for network in roost.networks())
    rows = page.locator("#networks tbody tr[data-name]")
    expect(rows).to_have_count(len(names))
    assert sorted(row.get_attribute("data-name") or "" for row in rows.all()) == names
    page = view.open("/plugins")
    expect(page.locator('#plugins tbody tr[data-name="demo"]')).to_have_count(1)
    page = view.open("/hosts")
    expect(page.locator("#not-cluster")).to_be_visible()
    page = view.open("/events")
    roost.daemon.ok("network", "create", "feed-lab", "--subnet", "10.78.0.0/24")
    try:
        expect(page.locator('#feed li[data-type="network.created"]')).to_have_count(1)
    finally:
        roost.daemon.ok("network", "rm", "feed-lab")
    expect(page.locator('#feed li[data-type="network.removed"]')).to_have_count(1)
    assert view.console_errors() == []


def test_a_request_without_the_session_cookie_is_refused(
    browser: Browser, roost_ui: str, view: View
) -> None:
    page = view.open("/")
    without = page.evaluate(
        "async api => (await fetch(api + '/v1/vms', {credentials: 'omit'})).status", view.api
    )
    assert without == 401
    assert view.console_errors((401, "/api/v1/vms")) == []
    stranger = browser.new_context()
    try:
        tab = stranger.new_page()
        for path in ("/", "/map", "/vms/web-1", "/static/index.js", "/api/v1/vms"):
            answer = tab.goto(view.origin + path)
            assert answer is not None and answer.status == 401, path
        reused = tab.goto(roost_ui)  # the printed URL: its token worked once
        assert reused is not None and reused.status == 401
    finally:
        stranger.close()


def test_the_daemon_s_own_view_logs_in_with_the_api_token_and_out_again(
    browser: Browser, roost: Roost
) -> None:
    context = browser.new_context(viewport=VIEWPORT, color_scheme="light")
    try:
        view = View(context.new_page(), roost.tcp_origin, "/ui", "").watch()
        page = view.page
        first = page.goto(view.origin + "/ui/")
        assert first is not None and first.status == 401
        page.locator('input[name="token"]').fill(TOKEN)
        page.locator('form button[type="submit"]').click()
        expect(page).to_have_url(view.origin + "/ui/")
        expect(page.locator("#live")).to_have_text("● live")
        wait_for(
            lambda: shows_every_vm(page, roost),
            timeout=WAIT_MS / 1000,
            what="the table to show the VMs",
        )
        page.locator("#logout").click()
        expect(page).to_have_url(view.origin + "/ui/login")
        refused = page.evaluate("async () => (await fetch('/v1/vms')).status")
        assert refused == 401
        again = page.goto(view.origin + "/ui/")
        assert again is not None and again.status == 401
        expect(page.locator('input[name="token"]')).to_be_visible()
        assert view.console_errors((401, "/ui/"), (401, "/v1/vms")) == []
    finally:
        context.close()
