"""cni networks through the real daemon: `roost network create NAME --cni CONFLIST.json` over
the Unix socket registers the conflist (no bridge made), listed and shown as kind cni; the
same over TCP is 403 `forbidden` (its plugins would run as root); a conflist roost cannot run
is a 422 at its field; `network rm` removes it."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Daemon, links

pytestmark = [pytest.mark.root]

TOKEN = "cni-networks-token"
CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "cninet",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]]},
        }
    ],
}


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def served(netns: str, tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    """A daemon on its Unix socket and a loopback TCP listener (with a token)."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    port = free_loopback_port()
    daemon = Daemon(
        netns,
        "--listen", f"tcp://127.0.0.1:{port}",
        "--token-file", str(token),
        "--cni-conf-dir", str(tmp_path / "net.d"),
        "--cni-bin-dir", "/usr/lib/cni",
        firecracker=None,
    )  # fmt: skip
    try:
        daemon.start()
        yield daemon, port
    finally:
        daemon.close()


def failure(daemon: Daemon, *args: str) -> tuple[int, dict[str, Any]]:
    result = daemon.cli(*args, "--json")
    return result.exit_code, json.loads(result.stdout or result.stderr)["error"]


def test_a_cni_network_is_registered_over_the_unix_socket_only(
    served: tuple[Daemon, int], tmp_path: Path
) -> None:
    daemon, port = served
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps(CONFLIST))
    links_before = set(links(daemon.netns))

    created = daemon.ok("network", "create", "cninet", "--cni", str(conf))
    assert (created["kind"], created["managed"], created["bridge"], created["subnet"]) == (
        "cni",
        False,
        None,
        None,
    )
    assert created["conflist"] == CONFLIST
    assert set(links(daemon.netns)) == links_before  # its plugins make links, at ADD
    listed = {network["name"]: network for network in daemon.ok("network", "list")}
    assert listed["cninet"] == created
    assert daemon.ok("network", "show", "cninet") == created
    shown = daemon.cli("network", "show", "cninet")
    assert shown.exit_code == 0
    assert "bridge" in shown.stdout and "cni" in shown.stdout

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as tcp:
        response = tcp.post(
            "/v1/networks",
            json={"name": "remote", "cni": CONFLIST},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
    assert response.status_code == 403
    error = response.json()["error"]
    assert (error["code"], [d["loc"] for d in error["details"]]) == ("forbidden", ["cni"])
    assert "remote" not in {network["name"] for network in daemon.ok("network", "list")}

    code, error = failure(daemon, "network", "create", "cninet", "--cni", str(conf))
    assert (code, error["code"]) == (4, "conflict")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**CONFLIST, "plugins": [{"type": "/usr/lib/cni/bridge"}]}))
    code, error = failure(daemon, "network", "create", "bad", "--cni", str(bad))
    assert (code, [d["loc"] for d in error["details"]]) == (1, ["cni.plugins.0.type"])
    code, error = failure(
        daemon, "network", "create", "mixed", "--cni", str(conf), "--subnet", "10.89.0.0/24"
    )
    assert (code, [d["loc"] for d in error["details"]]) == (1, ["subnet"])

    daemon.ok("network", "rm", "cninet")
    assert "cninet" not in {network["name"] for network in daemon.ok("network", "list")}
