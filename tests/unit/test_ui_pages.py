"""The web view's pages and static files (roost.ui), without a browser: every page renders with
its bases, the files keep the rules the CSP and the XSS promise rest on, and the scripts parse."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from roost import ui

NODE = shutil.which("node")
SCRIPTS = sorted(ui.STATIC_DIR.glob("*.js"))
HTML = sorted(ui.PAGES_DIR.glob("*.html"))
MOUNTS = [("", "/ui/"), ("/api", "/")]
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


@pytest.mark.parametrize(("api_base", "base_href"), MOUNTS)
@pytest.mark.parametrize("page", sorted(ui.PAGES))
def test_every_page_renders_with_its_bases_filled(page: str, api_base: str, base_href: str) -> None:
    html = ui.render(page, api_base=api_base, base_href=base_href)
    assert (
        f'<html lang="en" data-api="{api_base}" data-base="{base_href}" data-page="{page}">' in html
    )
    assert f'<base href="{base_href}">' in html
    assert f'<script type="module" src="static/{page}.js"></script>' in html
    assert (ui.STATIC_DIR / f"{page}.js").is_file()
    assert "@" not in re.sub(r"[\w.+-]+@[\w.-]+", "", html).replace("@media", "")
    assert "<main" in html
    assert "</html>" in html


def test_the_bases_are_escaped_as_attribute_values() -> None:
    html = ui.render("index", api_base='"><script>', base_href="/a&b/")
    assert 'data-api="&quot;&gt;&lt;script&gt;"' in html
    assert '<base href="/a&amp;b/">' in html


def test_an_unknown_page_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        ui.render("nope", api_base="", base_href="/")


@pytest.mark.parametrize(
    ("path", "page"),
    [
        ("", "index"),
        ("index.html", "index"),
        ("vms/web-1", "vm"),
        ("map", "map"),
        ("networks", "networks"),
        ("plugins", "plugins"),
        ("hosts", "hosts"),
        ("events", "events"),
        ("login", "login"),
        ("vms/", None),
        ("vms/a/b", None),
        ("vm", None),
        ("static/app.js", None),
        ("layout", None),
    ],
)
def test_page_for_names_the_page_a_path_shows(path: str, page: str | None) -> None:
    assert ui.page_for(path) == page


def test_the_layout_links_every_page_relative_to_the_base() -> None:
    html = ui.render("index", api_base="", base_href="/ui/")
    for page in ("map", "networks", "plugins", "hosts", "events"):
        assert f'<a href="{page}" data-page="{page}">' in html
    assert 'href="static/style.css"' in html
    assert 'href="static/icon.svg"' in html
    assert (ui.STATIC_DIR / "style.css").is_file()
    assert (ui.STATIC_DIR / "icon.svg").is_file()


# what would put data into the DOM as markup, or run text as code
MARKUP_SINKS = re.compile(
    r"\.innerHTML|\.outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function\(|"
    r"setAttribute\(\s*[\"']on|\.on\w+\s*=|srcdoc"
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_no_script_puts_markup_into_the_page_or_runs_text(script: Path) -> None:
    assert MARKUP_SINKS.findall(script.read_text()) == []


@pytest.mark.parametrize("page", HTML, ids=lambda path: path.name)
def test_no_page_has_inline_script_handlers_or_styles(page: Path) -> None:
    text = page.read_text()
    assert re.findall(r"<script(?![^>]*\ssrc=)[^>]*>", text) == []
    assert re.findall(r"\son\w+\s*=", text) == []
    assert re.findall(r"\sstyle\s*=", text) == []
    assert "javascript:" not in text
    assert "<style" not in text


def test_every_labelled_input_has_its_label() -> None:
    for page in HTML:
        text = page.read_text()
        ids = set(re.findall(r'<(?:input|select|textarea)[^>]*\sid="([^"]+)"', text))
        labelled = set(re.findall(r'<label[^>]*\sfor="([^"]+)"', text))
        assert ids <= labelled, f"{page.name}: inputs without a label: {ids - labelled}"


def test_every_call_goes_to_the_api_base_or_the_mount() -> None:
    for script in SCRIPTS:
        for call in re.findall(r"(?:fetch|EventSource)\(([^,)]*)", script.read_text()):
            assert re.match(r"\s*(`\$\{API\}|API \+|pageUrl\()", call), f"{script.name}: {call}"


def test_every_request_sends_the_session_and_names_the_ui() -> None:
    for script in SCRIPTS:
        text = script.read_text()
        for call in re.finditer(r"\bfetch\(", text):
            # the options are in the call, or the object built just before it
            options = text[max(0, call.start() - 500) : call.start() + 300]
            assert 'credentials: "same-origin"' in options, f"{script.name}: {options}"
            assert '"X-Roost-UI": "1"' in options, f"{script.name}: {options}"


def test_every_import_names_an_export_of_an_existing_module() -> None:
    for script in SCRIPTS:
        for names, module in re.findall(
            r"import\s*\{([^}]*)\}\s*from\s*\"\./([\w.]+)\"", script.read_text()
        ):
            target = ui.STATIC_DIR / module
            assert target.is_file(), f"{script.name} imports {module}"
            exported = set(
                re.findall(
                    r"export\s+(?:async\s+)?(?:function|const|class|let)\s+(\w+)",
                    target.read_text(),
                )
            )
            for name in (part.strip() for part in names.split(",")):
                if name:
                    assert name in exported, f"{script.name} imports {name} from {module}"


@needs_node
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_script_parses_as_a_module(script: Path) -> None:
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--input-type=module", "--check"],
        input=script.read_bytes(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()


def _node_json(code: str) -> object:
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--input-type=module", "-e", code],
        capture_output=True,
        timeout=60,
        check=False,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@needs_node
def test_the_version_diff_names_each_changed_path_with_before_and_after() -> None:
    diff = (ui.STATIC_DIR / "diff.js").as_uri()
    before = {
        "config": {"plugin": "p"},
        "effective": {"network": {"ip": "10.0.0.2", "mode": "bridged"}},
    }
    after = {
        "config": {"plugin": "p", "network": {"ip": "10.0.0.7"}},
        "effective": {"network": {"ip": "10.0.0.7", "mode": "bridged"}},
    }
    lines = _node_json(
        f"import {{ diffLines }} from {json.dumps(diff)};"
        f"console.log(JSON.stringify(diffLines({json.dumps(before)}, {json.dumps(after)})))"
    )
    assert lines == [
        "config.network.ip     - -> 10.0.0.7",
        "effective.network.ip  10.0.0.2 -> 10.0.0.7",
    ]


@needs_node
def test_a_vm_shows_every_interface_address_once_per_kind() -> None:
    model = (ui.STATIC_DIR / "model.js").as_uri()
    vm = {
        "interfaces": [
            {"name": "eth0", "mode": "bridged", "ip": "10.0.0.2", "observed_ip": "10.0.0.2"},
            {
                "name": "eth1",
                "mode": "dhcp",
                "ip": None,
                "observed_ip": "192.0.2.9",
                "ipv6": "fd00::9",
            },
        ]
    }
    shown = _node_json(
        f"import {{ addressLines, modeOf }} from {json.dumps(model)};"
        f"const vm = {json.dumps(vm)};"
        "console.log(JSON.stringify([addressLines(vm).map((l) => `${l.nic} ${l.kind} ${l.text}`),"
        " modeOf(vm), modeOf({interfaces: []})]))"
    )
    assert shown == [
        ["eth0 ip 10.0.0.2", "eth1 observed 192.0.2.9", "eth1 ipv6 fd00::9"],
        "bridged, dhcp",
        "vsock",
    ]
