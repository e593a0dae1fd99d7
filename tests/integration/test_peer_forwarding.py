"""Forwarding between two real `roost serve` agents on SQLite: agent A, given a test router
(`PeerTestRouter`), sends each VM-scoped request for a VM of host B to B's API, over its Unix
socket or over TCP with A's token; the answers, streams, WebSockets and refusals come back
as B gave them. A peer out of reach is 502 `host_error` naming it, one the router calls
offline 503 `host_offline`, and a forwarded request A would forward again 421 `misdirected`.

Run as a module, this file is `roost` with A's router (`python -m
tests.integration.test_peer_forwarding serve ...`), its routes from $ROOST_TEST_ROUTES."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost.api.peers import Peer, Router
from tests.certs import CA
from tests.harness import (
    READY,
    Daemon,
    demo_plugin,
    network_namespace,
    write_plugin,
)

pytestmark = [pytest.mark.root]

TOKEN = "cluster-token"
ROUTES = "ROOST_TEST_ROUTES"
HOST = "ROOST_TEST_HOST"


class PeerTestRouter(Router):
    """Sends a VM to the host its name's first word names (`b-one` to host `b`), as
    $ROOST_TEST_ROUTES lists them: `{"b": {"api": URL, "offline": false}, ...}`; other VMs
    stay here."""

    def __init__(self, host_name: str, routes: dict[str, dict[str, Any]]) -> None:
        super().__init__(host_name)
        self.routes = routes

    def host_of(self, vm: str) -> Peer | None:
        host = vm.split("-", 1)[0]
        route = self.routes.get(host)
        return Peer(host, route["api"], route.get("offline", False)) if route else None


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Hosts:
    a: Daemon
    b: Daemon
    a_tcp: str  # A's TCP listener
    b_tcp: str  # B's TCP listener
    nowhere: str  # an API nobody serves
    c_port: int  # where a test may start host C, serving HTTPS with a certificate of `ca`
    ca: CA  # the CA A trusts (serve --ca)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    ca = CA.make(tmp_path)
    with network_namespace() as netns_a, network_namespace() as netns_b:
        a_tcp, b_tcp = (f"tcp://127.0.0.1:{free_loopback_port()}" for _ in "ab")
        c_port = free_loopback_port()
        b = Daemon(netns_b, "--listen", b_tcp, env={"ROOST_TOKEN": TOKEN, HOST: "b", ROUTES: "{}"})
        a = Daemon(
            netns_a,
            *("--listen", a_tcp, "--ca", str(ca.cert)),
            env={"ROOST_TOKEN": TOKEN, HOST: "a"},
        )
        nowhere = f"unix://{a.dir}/nobody.sock"
        a.env[ROUTES] = json.dumps(
            {
                "b": {"api": b.api},
                "tcp": {"api": b_tcp},
                "off": {"api": b.api, "offline": True},
                "gone": {"api": nowhere},
                "tls": {"api": f"https://127.0.0.1:{c_port}"},
                "untrusted": {"api": f"https://localhost:{c_port}"},  # not in C's certificate
            }
        )
        for daemon in (a, b):  # each with its router, as in a cluster
            daemon.argv[daemon.argv.index("roost.cli.main")] = __name__
        try:
            b.start()
            a.start()
            yield Hosts(a, b, a_tcp, b_tcp, nowhere, c_port, ca)
        finally:
            a.close()
            b.close()


def error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()["error"]
    return response.status_code, body["code"], body["message"]


@pytest.fixture
def plugin_on_b(hosts: Hosts, tmp_path: Path) -> str:
    hosts.b.ok("plugin", "install", write_plugin(tmp_path, "p", network={"mode": "vsock"}))
    return "p"


@pytest.mark.firecracker
@pytest.mark.kvm
def test_a_vms_lifecycle_config_console_and_removal_through_a_reach_its_host(
    hosts: Hosts, plugin_on_b: str
) -> None:
    hosts.b.ok("vm", "create", "b-one", "--plugin", plugin_on_b, "--no-start")
    a, b = hosts.a.http, hosts.b.http
    assert a.get("/v1/vms").json() == []  # A's own database has no VM: each answer is B's
    started = a.post("/v1/vms/b-one/start")
    assert started.status_code == 200, started.text
    assert started.json()["status"] == "running"
    assert b.get("/v1/vms/b-one").json()["status"] == "running"
    assert a.post("/v1/vms/b-one/pause").json()["status"] == "paused"
    assert a.post("/v1/vms/b-one/resume").json()["status"] == "running"
    patched = a.patch("/v1/vms/b-one/config", json={"labels": {"team": "blue"}})
    assert patched.status_code == 200, patched.text
    assert a.get("/v1/vms/b-one/config").json() == b.get("/v1/vms/b-one/config").json()
    assert "blue" in json.dumps(b.get("/v1/vms/b-one/config").json())
    history = a.get("/v1/vms/b-one/config/history")
    assert history.status_code == 200 and len(history.json()) == 2
    console = a.get("/v1/vms/b-one/console")
    assert console.status_code == 200
    assert console.headers["content-type"].startswith("text/plain")
    stopped = a.post("/v1/vms/b-one/stop", params={"force": "true"})
    assert stopped.json()["status"] == "stopped"
    assert b.get("/v1/vms/b-one").json()["status"] == "stopped"
    # B's refusals come back as B gave them
    assert error(a.post("/v1/vms/b-one/pause"))[:2] == (409, "conflict")
    status, code, message = error(a.post("/v1/vms/b-ghost/start"))
    assert (status, code) == (404, "not_found") and "b-ghost" in message
    assert error(a.get("/v1/vms/b-one/console", params={"nope": "1"}))[:2] == (422, "invalid")
    removed = a.delete("/v1/vms/b-one")
    assert removed.status_code == 204
    assert b.get("/v1/vms").json() == []
    assert "Traceback" not in hosts.a.logs()


@pytest.mark.firecracker
@pytest.mark.kvm
def test_forwards_of_a_vm_are_held_by_its_host(hosts: Hosts, plugin_on_b: str) -> None:
    hosts.b.ok("vm", "create", "b-one", "--plugin", plugin_on_b)
    listen = f"127.0.0.1:{free_loopback_port()}"
    added = hosts.a.http.post("/v1/vms/b-one/forwards", json={"listen": listen, "guest_port": 1024})
    assert added.status_code == 201, added.text
    assert hosts.b.http.get("/v1/vms/b-one/forwards").json() == [added.json()]
    listed = hosts.a.http.get("/v1/vms/b-one/forwards").json()
    assert listed == [added.json()]
    gone = hosts.a.http.delete(f"/v1/vms/b-one/forwards/{added.json()['id']}")
    assert gone.status_code == 204
    assert hosts.b.http.get("/v1/vms/b-one/forwards").json() == []


@pytest.mark.e2e
def test_a_followed_console_and_a_vsock_websocket_through_a_reach_a_qemu_guest_on_b(
    hosts: Hosts, tmp_path: Path
) -> None:
    hosts.b.ok("plugin", "install", demo_plugin(tmp_path, "demo", network={"mode": "vsock"}))
    hosts.b.ok("vm", "create", "b-demo", "--plugin", "demo", "--vmm", "qemu")
    follow = {"follow": "true"}
    with hosts.a.http.stream("GET", "/v1/vms/b-demo/console", params=follow) as stream:
        assert stream.status_code == 200
        chunks = stream.iter_raw()
        seen = b""
        while READY.encode() not in seen:  # the boot as B sends it, while the VM runs
            seen += next(chunks)
        path = "/v1/vms/b-demo/vsock/1024"
        echoed, code, reason = asyncio.run(
            _websocket(hosts.a.api, path, [b"through ", b"host a", b""])
        )
        assert b"".join(echoed) == b"through host a"
        direct = asyncio.run(_websocket(hosts.b.api, path, [b"through ", b"host a", b""]))
        assert (b"".join(direct[0]), *direct[1:]) == (b"through host a", code, reason)
        assert code == 1000
        refused, code, reason = asyncio.run(_websocket(hosts.a.api, path, ["text"]))
        assert (refused, code) == ([], 1003) and "binary" in reason
        stopped = hosts.a.http.post("/v1/vms/b-demo/stop", params={"force": "true"})
        assert stopped.json()["status"] == "stopped"
        seen += b"".join(chunks)  # the stream ends once the VM stopped
    assert (hosts.b.run_dir / "vms" / "b-demo" / "console.log").read_bytes().startswith(seen)


def test_a_forwarded_request_this_host_would_forward_again_is_misdirected(
    hosts: Hosts,
) -> None:
    forwarded = {"x-roost-forwarded": "c"}
    status, code, message = error(hosts.a.http.post("/v1/vms/b-one/start", headers=forwarded))
    assert (status, code) == (421, "misdirected")
    assert "host c forwarded" in message and "b" in message
    # one answered here is answered
    assert hosts.a.http.get("/v1/vms", headers=forwarded).json() == []
    status, code, _ = error(hosts.a.http.post("/v1/vms/here/start", headers=forwarded))
    assert (status, code) == (404, "not_found")


def test_a_host_out_of_reach_is_host_error_naming_it_and_an_offline_one_host_offline(
    hosts: Hosts,
) -> None:
    status, code, message = error(hosts.a.http.post("/v1/vms/gone-one/start"))
    assert (status, code) == (502, "host_error")
    assert "gone" in message and hosts.nowhere in message
    status, code, message = error(hosts.a.http.get("/v1/vms/off-one/console"))
    assert (status, code) == (503, "host_offline")
    assert "off" in message
    # reads of a VM's record stay local
    assert error(hosts.a.http.get("/v1/vms/gone-one"))[:2] == (404, "not_found")
    assert "Traceback" not in hosts.a.logs()


async def _websocket(api: str, path: str, messages: list[bytes | str]) -> Any:
    """What a WebSocket client at `api` meets: the refusal (status, body), or the messages
    received after sending `messages`, and the close code and reason."""
    from websockets.asyncio.client import unix_connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    try:
        async with unix_connect(api.removeprefix("unix://"), f"ws://roost{path}") as ws:
            for message in messages:
                await ws.send(message)
            received = []
            try:
                async for message in ws:
                    received.append(message)
            except ConnectionClosed:
                pass
            return received, ws.close_code, ws.close_reason
    except InvalidStatus as refusal:
        return refusal.response.status_code, json.loads(refusal.response.body)


def test_websocket_refusals_through_a_are_its_hosts_or_name_the_host_out_of_reach(
    hosts: Hosts,
) -> None:
    status, body = asyncio.run(_websocket(hosts.a.api, "/v1/vms/b-ghost/vsock/1024", []))
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert "b-ghost" in body["error"]["message"]
    status, body = asyncio.run(_websocket(hosts.a.api, "/v1/vms/b-ghost/vsock/0", []))
    assert (status, body["error"]["code"]) == (422, "invalid")
    status, body = asyncio.run(_websocket(hosts.a.api, "/v1/vms/gone-one/vsock/1024", []))
    assert (status, body["error"]["code"]) == (502, "host_error")
    assert "gone" in body["error"]["message"]
    status, body = asyncio.run(_websocket(hosts.a.api, "/v1/vms/off-one/vsock/1024", []))
    assert (status, body["error"]["code"]) == (503, "host_offline")


@pytest.mark.firecracker
@pytest.mark.kvm
def test_a_tcp_peer_is_called_with_this_agents_token(hosts: Hosts, plugin_on_b: str) -> None:
    hosts.b.ok("vm", "create", "tcp-one", "--plugin", plugin_on_b, "--no-start")
    # the client reaches A on its Unix socket with no token; B's TCP listener takes A's
    config = hosts.a.http.get("/v1/vms/tcp-one/config")
    assert config.status_code == 200, config.text
    assert config.json() == hosts.b.http.get("/v1/vms/tcp-one/config").json()
    started = hosts.a.http.post("/v1/vms/tcp-one/start")
    assert started.json()["status"] == "running"
    status, body = asyncio.run(
        _websocket(hosts.a.api, "/v1/vms/tcp-one/vsock/1024?timeout=1", [])
    )  # the guest does not answer within the timeout: B's own refusal
    assert (status, body["error"]["code"]) == (502, "vmm_failed")
    assert hosts.a.http.delete("/v1/vms/tcp-one").status_code == 204
    assert hosts.b.http.get("/v1/vms").json() == []


@pytest.mark.firecracker
@pytest.mark.kvm
def test_a_tcp_clients_request_is_a_tcp_clients_on_the_peer_it_reaches_by_unix_socket(
    hosts: Hosts, plugin_on_b: str
) -> None:
    hosts.b.ok("vm", "create", "b-one", "--plugin", plugin_on_b, "--no-start")
    services = {"vsock_services": {"1100": "tcp://127.0.0.1:9"}}  # the Unix socket's to set
    port = hosts.a_tcp.rpartition(":")[2]
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {TOKEN}"}
    ) as tcp:
        status, code, message = error(tcp.patch("/v1/vms/b-one/config", json=services))
    assert (status, code) == (403, "forbidden")
    assert "TCP service" in message
    assert hosts.a.http.patch("/v1/vms/b-one/config", json=services).status_code == 200


def test_an_https_peer_is_verified_against_the_agents_ca(hosts: Hosts) -> None:
    server = hosts.ca.issue("c", "IP:127.0.0.1")
    with network_namespace() as netns_c:
        c = Daemon(
            netns_c,
            "--listen", f"tcp://127.0.0.1:{hosts.c_port}",
            "--tls-cert", str(server.cert),
            "--tls-key", str(server.key),
            firecracker=None,
            env={"ROOST_TOKEN": TOKEN},
        )  # fmt: skip
        try:
            c.start()
            status, code, message = error(hosts.a.http.post("/v1/vms/tls-one/start"))
            assert (status, code) == (404, "not_found") and "tls-one" in message  # C's answer
            path = "/v1/vms/tls-one/vsock/1024"
            status, body = asyncio.run(_websocket(hosts.a.api, path, []))
            assert (status, body["error"]["code"]) == (404, "not_found")
            status, code, message = error(hosts.a.http.post("/v1/vms/untrusted-one/start"))
            assert (status, code) == (502, "host_error"), message
            assert "untrusted" in message and "certificate" in message
        finally:
            c.close()


def _serve_with_test_router() -> None:
    """`roost` whose `serve` gives create_app a `PeerTestRouter` of $ROOST_TEST_ROUTES (on
    SQLite, serve gives it none)."""
    import roost.api.server
    from roost.cli.main import main

    test_router = PeerTestRouter(os.environ[HOST], json.loads(os.environ[ROUTES]))
    create_app = roost.api.server.create_app

    def with_test_router(*args: Any, router: Router | None = None, **kwargs: Any) -> Any:
        return create_app(*args, router=router or test_router, **kwargs)

    roost.api.server.create_app = with_test_router
    sys.argv[0] = "roost"
    main()


if __name__ == "__main__":
    _serve_with_test_router()
