"""Listing VMs through a real daemon, on SQLite and on PostgreSQL (`serve --database-url`):
pages read while other clients create and remove VMs (`start: false`, so no VMM boots), and
`roost vm list` with its filters following every page in each of its output forms."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from roost.cli.client import next_link
from tests.harness import Daemon, write_plugin

pytestmark = [pytest.mark.root]

KEPT = [f"vm-{index:03}-k" for index in range(60)]  # there throughout
REMOVED = [f"vm-{index:03}-r" for index in range(0, 60, 2)]  # removed while it pages
CREATED = [f"vm-{index:03}-c" for index in range(1, 60, 2)]  # created while it pages


@pytest.fixture
def vsock_daemon(netns: str, tmp_path: Path, database_url: str) -> Iterator[Daemon]:
    """A daemon with plugin `p` (vsock: a VM of it needs nothing on the host) and `q` (its
    VMs bridged, on the daemon's default network), on SQLite in its state dir (the default)
    and on PostgreSQL."""
    daemon = Daemon(netns)
    if database_url.startswith("postgresql"):  # an agent of a cluster of one host
        daemon.argv += ["--database-url", database_url, "--host-name", "host1"]
        daemon.argv += ["--vtep-address", "10.251.0.1", "--advertise-api", daemon.api]
        # room for every VM the tests make (each holds its vCPUs of the host's capacity)
        daemon.argv += ["--capacity-vcpus", "1000", "--capacity-memory-mib", "1000000"]
    try:
        daemon.start()
        daemon.ok("plugin", "install", write_plugin(tmp_path, "p", network={"mode": "vsock"}))
        daemon.ok("plugin", "install", write_plugin(tmp_path, "q"))
        yield daemon
    finally:
        daemon.close()


def create(http: httpx.Client, name: str, plugin: str = "p", **config: Any) -> None:
    body = {"name": name, "plugin": plugin, "start": False, **config}
    response = http.post("/v1/vms", json=body)
    assert response.status_code == 201, response.text


def page_through(http: httpx.Client, limit: int) -> list[str]:
    """Every name `GET /v1/vms?limit=` and the links it sends give, in the order given."""
    names: list[str] = []
    url: str | None = f"/v1/vms?limit={limit}"
    while url is not None:
        response = http.get(url)
        assert response.status_code == 200, response.text
        names += [vm["name"] for vm in response.json()]
        url = next_link(response.headers.get("link", ""))
    return names


def test_while_vms_come_and_go_each_one_there_throughout_is_paged_through_exactly_once(
    vsock_daemon: Daemon,
) -> None:
    http = vsock_daemon.http
    for name in [*KEPT, *REMOVED]:
        create(http, name)
    failures: list[str] = []

    def churn(work: list[tuple[str, str]]) -> None:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(vsock_daemon.socket)),
            base_url="http://roost",
            timeout=60,
        ) as client:
            for method, name in work:
                if method == "POST":
                    answer = client.post(
                        "/v1/vms", json={"name": name, "plugin": "p", "start": False}
                    )
                else:
                    answer = client.delete(f"/v1/vms/{name}")
                if answer.status_code not in (201, 204):
                    failures.append(f"{method} {name}: {answer.text}")

    workers = [
        threading.Thread(target=churn, args=([("POST", name) for name in CREATED],)),
        threading.Thread(target=churn, args=([("DELETE", name) for name in REMOVED],)),
    ]
    for worker in workers:
        worker.start()
    passes = []
    try:
        while any(worker.is_alive() for worker in workers) or len(passes) < 2:
            passes.append(page_through(http, limit=7))
    finally:
        for worker in workers:
            worker.join()
    assert failures == []
    for names in passes:
        counted = Counter(names)
        assert [name for name, count in counted.items() if count > 1] == []
        assert set(KEPT) <= set(names)
        assert names == sorted(names)
        assert set(names) <= {*KEPT, *REMOVED, *CREATED}
    assert page_through(http, limit=7) == sorted([*KEPT, *CREATED])


def test_vm_list_follows_every_page_with_its_filters_in_each_output_form(
    vsock_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    http = vsock_daemon.http
    for index in range(7):
        labels = {"tier": "web" if index % 2 else "db"}
        create(http, f"v{index}", "p" if index < 5 else "q", labels=labels)
    vsock_daemon.cli("vm", "create", "l1", "--plugin", "p", "--no-start", "--label", "a=b")
    monkeypatch.setattr("roost.cli.remote.LIST_PAGE", 2)  # several pages of a few VMs

    quiet = vsock_daemon.cli("vm", "list", "-q")
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stdout.split("\n") == ["l1", *[f"v{index}" for index in range(7)], ""]
    web = vsock_daemon.cli("vm", "list", "--json", "--label", "tier=web", "--mode", "vsock")
    assert [vm["name"] for vm in json.loads(web.stdout)] == ["v1", "v3"]
    table = vsock_daemon.cli("vm", "list", "--plugin", "q")
    assert [line.split()[0] for line in table.stdout.splitlines()] == ["NAME", "v5", "v6"]
    bridged = vsock_daemon.cli("vm", "list", "-q", "--mode", "bridged", "--status", "created")
    assert bridged.stdout.split() == ["v5", "v6"]
    assert vsock_daemon.cli("vm", "list", "-q", "--label", "a=b").stdout.split() == ["l1"]

    # labels set and removed by a patch, which a stopped VM applies at once
    patched = vsock_daemon.ok(
        "vm", "config", "patch", "l1", "--label", "c=d", "--remove-label", "a"
    )
    assert patched["config"]["labels"] == {"c": "d"}
    assert vsock_daemon.ok("vm", "show", "l1")["labels"] == {"c": "d"}

    wrong = vsock_daemon.cli("vm", "list", "--status", "sleeping")
    assert wrong.exit_code != 0
    assert "status" in wrong.stderr and "sleeping" in wrong.stderr
    both = vsock_daemon.cli("vm", "list", "-q", "--json")
    assert both.exit_code == 2
