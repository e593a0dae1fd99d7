"""No URL is a 500: whatever a manifest names, or a server redirects to, a failed download is a
422 at `<role>.url` saying why. Only loopback is contacted, and no name is looked up."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roost.engine.plugins import Plugins
from roost.errors import InvalidError
from roost.spec import Manifest
from roost.state.artifacts import ArtifactStore
from roost.state.db import Database, sqlite_url

CONTENT = b"downloaded initramfs"


class Server(http.server.BaseHTTPRequestHandler):
    """`/ok` serves CONTENT; `/redirect?<target>` redirects there, `/loop` to itself; anything
    else is a 404."""

    def do_GET(self) -> None:
        if self.path == "/ok":
            self.send_response(200)
            self.send_header("Content-Length", str(len(CONTENT)))
            self.end_headers()
            self.wfile.write(CONTENT)
        elif self.path.startswith("/redirect?") or self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", self.path.partition("?")[2] or "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    instance = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    thread = threading.Thread(target=instance.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield f"http://127.0.0.1:{instance.server_address[1]}"
    finally:
        instance.shutdown()
        thread.join()
        instance.server_close()


@pytest.fixture
def plugins(tmp_path: Path) -> Iterator[Plugins]:
    db = Database(sqlite_url(tmp_path))
    db.migrate()
    try:
        yield Plugins(db, ArtifactStore(tmp_path / "store"))
    finally:
        db.dispose()


def install(plugins: Plugins, url: str) -> dict[str, Any]:
    data = {"name": "p", "version": "1", "initramfs": {"url": url}}
    return plugins.install(Manifest.model_validate(data), force=True, any_path=False)


def refusal(plugins: Plugins, url: str) -> tuple[str, str]:
    with pytest.raises(InvalidError) as caught:
        install(plugins, url)
    [detail] = caught.value.details
    assert list(plugins.store.root.iterdir()) == []
    return detail.loc, detail.msg


def test_a_url_the_server_answers_is_stored(plugins: Plugins, server: str) -> None:
    sha256 = install(plugins, f"{server}/ok")["artifacts"]["initramfs"]["sha256"]
    assert plugins.store.path(sha256).read_bytes() == CONTENT


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/missing", "answered HTTP 404"),
        ("/redirect?http://127.0.0.1:99999/x", "cannot download"),
        ("/redirect?http://[::1/x", "cannot download"),
        ("/redirect?http://[v1.x]/x", "Invalid IPv6 address"),
        ("/redirect?http://xn--/x", "cannot download"),
        ("/redirect?http://" + "a" * 64 + ".test/x", "label empty or too long"),
        ("/redirect?file:///etc/shadow", "cannot download"),
        ("/redirect?ftp://127.0.0.1/x", "cannot download"),
        ("/loop", "Exceeded maximum allowed redirects"),
    ],
)
def test_a_failed_download_is_refused_at_the_url(
    plugins: Plugins, server: str, path: str, text: str
) -> None:
    loc, msg = refusal(plugins, server + path)
    assert loc == "initramfs.url"
    assert text in msg


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/x",
        "http://[::1]:1/x",
        "https://[::ffff:127.0.0.1]:1/x",
        "http://user:password@127.0.0.1:1/x",
        "http://127.0.0.1:1/%00%ff",
    ],
)
def test_a_url_nothing_answers_is_refused_at_the_url(plugins: Plugins, url: str) -> None:
    loc, msg = refusal(plugins, url)
    assert loc == "initramfs.url"
    assert "cannot download" in msg
