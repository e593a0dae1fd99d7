"""`roost serve`'s cluster flags, judged before the daemon touches anything: required with a
PostgreSQL database, refused with SQLite, each value checked saying what to give instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from roost.cli.serve import (
    ClusterFlags,
    _advertised_names,
    cluster_settings,
    default_memory_mib,
    default_vcpus,
    is_postgresql,
)
from roost.engine.settings import ClusterSettings
from roost.errors import InvalidError

PG = "postgresql+psycopg://postgres@/roost?host=/tmp/pg&port=5432"
REQUIRED = {
    "host_name": "host1",
    "vtep_address": "10.251.0.1",
    "advertise_api": "unix:///tmp/host1.sock",
}


def settings(url: str | None = PG, token: str | None = None, **flags: object) -> ClusterSettings:
    given = {**REQUIRED, **flags}
    result = cluster_settings(url, ClusterFlags(**given), token=token)  # type: ignore[arg-type]
    assert result is not None
    return result


def refusal(flags: dict[str, object], url: str | None = PG) -> tuple[str, str]:
    """The flag (loc) and message of the refusal of `flags` with `url`."""
    with pytest.raises(InvalidError) as caught:
        cluster_settings(url, ClusterFlags(**flags), token=None)  # type: ignore[arg-type]
    return caught.value.details[0].loc, caught.value.message


def test_only_a_postgresql_url_makes_a_cluster() -> None:
    assert is_postgresql(PG)
    assert is_postgresql("postgresql://u@h/db")
    assert not is_postgresql(None)
    assert not is_postgresql("sqlite:////var/lib/roost/roost.db")
    assert not is_postgresql("mysql+pymysql://u@h/db")


def test_on_sqlite_there_is_no_cluster_and_every_cluster_flag_is_refused() -> None:
    assert cluster_settings(None, ClusterFlags(), token=None) is None
    assert cluster_settings("sqlite:////x/roost.db", ClusterFlags(), token=None) is None
    loc, message = refusal({"host_labels": ["zone=a"], "lost_after": 30.0}, None)
    assert loc == "host-label"
    assert message.startswith("host-label: --host-label, --lost-after are for an agent of a ")
    assert "add --database-url postgresql+psycopg://" in message
    assert "leave them out to run one host on SQLite" in message
    loc, message = refusal({"capacity_vcpus": 4}, "sqlite:////x/roost.db")
    assert (loc, "--capacity-vcpus is for an agent" in message) == ("capacity-vcpus", True)


def test_on_postgresql_name_vtep_and_advertised_api_are_required_naming_the_missing() -> None:
    loc, message = refusal({"host_name": "host1"})
    assert loc == "vtep-address"
    assert "needs --host-name NAME --vtep-address IP --advertise-api URL" in message
    assert "(missing --vtep-address, --advertise-api)" in message
    assert refusal({"vtep_address": "10.251.0.1", "advertise_api": "unix:///x"})[0] == "host-name"


def test_a_cluster_agents_settings_with_their_defaults() -> None:
    cluster = settings(host_labels=["zone=a", "disk=ssd", "zone=b"])
    assert cluster.host_name == "host1"
    assert cluster.vtep_address == "10.251.0.1"
    assert cluster.advertise_api == "unix:///tmp/host1.sock"
    assert cluster.labels == {"disk": "ssd", "zone": "b"}  # a later one for a key wins
    assert cluster.capacity_vcpus == (os.cpu_count() or 1) * 16 == default_vcpus()
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    assert cluster.capacity_memory_mib == memory_kib // 1024 == default_memory_mib()
    assert (cluster.offline_after, cluster.lost_after) == (20.0, 300.0)
    assert cluster.heartbeat_interval == 5.0


def test_given_capacity_and_thresholds_are_kept_and_the_heartbeat_follows_them() -> None:
    cluster = settings(
        capacity_vcpus=8, capacity_memory_mib=4096, offline_after=2.0, lost_after=6.0
    )
    assert (cluster.capacity_vcpus, cluster.capacity_memory_mib) == (8, 4096)
    assert (cluster.offline_after, cluster.lost_after) == (2.0, 6.0)
    assert cluster.heartbeat_interval == 0.5
    assert settings(offline_after=0.4, lost_after=1.0).heartbeat_interval == 0.2
    assert settings(offline_after=100.0, lost_after=600.0).heartbeat_interval == 5.0


def test_the_settings_hash_and_their_labels_are_a_dict_of_their_own() -> None:
    given = {"zone": "a"}
    cluster = ClusterSettings("h", "10.0.0.1", "unix:///x", given, 1, 16)
    given["zone"] = "b"
    assert cluster.labels == {"zone": "a"}
    assert isinstance(cluster.labels, dict)
    assert hash(cluster) == hash(ClusterSettings("h", "10.0.0.1", "unix:///x", {}, 1, 16))


@pytest.mark.parametrize(
    ("flags", "loc", "said"),
    [
        ({"host_name": "Host_1"}, "host-name", "is not a valid name: use a DNS label"),
        ({"host_name": "-h"}, "host-name", "is not a valid name"),
        ({"vtep_address": "fd00::1"}, "vtep-address", "is not an IPv4 address"),
        ({"vtep_address": "10.251.0"}, "vtep-address", "e.g. 10.251.0.1"),
        ({"vtep_address": "10.251.0.1/24"}, "vtep-address", "is not an IPv4 address"),
        ({"vtep_address": "239.1.1.1"}, "vtep-address", "is a multicast address"),
        ({"vtep_address": "0.0.0.0"}, "vtep-address", "is the unspecified address"),
        ({"vtep_address": "127.0.0.1"}, "vtep-address", "is a loopback address"),
        ({"vtep_address": "255.255.255.255"}, "vtep-address", "is a reserved (or broadcast)"),
        ({"advertise_api": "/run/roost.sock"}, "advertise-api", "use unix:///path/to.sock"),
        ({"advertise_api": "http://h:80"}, "advertise-api", "is not an endpoint"),
        ({"advertise_api": "tcp://h"}, "advertise-api", "needs a host and a port"),
        ({"advertise_api": "tcp://0.0.0.0:8443"}, "advertise-api", "not an address peers"),
        ({"advertise_api": "tcp://[::]:8443"}, "advertise-api", "not an address peers"),
        ({"advertise_api": "tcp://h_1:8443"}, "advertise-api", "is not a host name"),
        ({"advertise_api": "tcp://h1:8443"}, "advertise-api", "with the cluster's token"),
        ({"host_labels": ["zone"]}, "host-label", "'zone': write KEY=VALUE, e.g."),
        ({"host_labels": ["-zone=a"]}, "host-label", "label key '-zone' must be 1-253"),
        ({"host_labels": ["zone=" + "a" * 257]}, "host-label", "limited to 256 characters"),
        ({"host_labels": [f"k{i}=v" for i in range(65)]}, "host-label", "at most 64 are"),
        ({"capacity_vcpus": 0}, "capacity-vcpus", "is 0; give a whole number from 1 to"),
        ({"capacity_vcpus": 2**31}, "capacity-vcpus", "from 1 to 2147483647"),
        ({"capacity_memory_mib": -1}, "capacity-memory-mib", "is -1; give a whole number"),
        ({"offline_after": 0.0}, "offline-after", "give a number of seconds above 0"),
        ({"offline_after": float("nan")}, "offline-after", "above 0 (default 20)"),
        ({"lost_after": float("inf")}, "lost-after", "above 0 (default 300)"),
        ({"offline_after": 30.0, "lost_after": 30.0}, "lost-after", "not longer than"),
        ({"lost_after": 10.0}, "lost-after", "is 10 s, not longer than --offline-after (20 s)"),
    ],
)
def test_a_bad_cluster_flag_is_refused_naming_it_and_what_to_give(
    flags: dict[str, object], loc: str, said: str
) -> None:
    refused_at, message = refusal({**REQUIRED, **flags})
    assert (refused_at, said in message) == (loc, True), message


def test_a_tcp_api_is_advertised_with_a_token_and_its_host_joins_the_accepted_names() -> None:
    for url in ("tcp://host1.cluster.test:8443", "https://10.0.0.1:8443"):
        cluster = settings(advertise_api=url, token="s3cret")
        assert cluster.advertise_api == url
    cluster = settings(advertise_api="https://Host1.Cluster.test:8443", token="s3cret")
    assert _advertised_names(cluster, ()) == ("host1.cluster.test",)
    assert _advertised_names(cluster, ("host1.cluster.test",)) == ()
    assert _advertised_names(settings(), ("roost.test",)) == ()  # a Unix socket has no host


def serve(tmp_path: Path, *args: str) -> tuple[int, str]:
    """`roost serve` with `args` in a process of its own: its exit code and stderr; what it
    refuses, it refuses before it makes its state dir."""
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "roost.cli.main", "serve", "--state-dir", str(state)]
    argv += ["--run-dir", str(tmp_path / "run"), "--listen", f"unix://{tmp_path}/api.sock"]
    done = subprocess.run([*argv, *args], check=False, capture_output=True, text=True, timeout=60)
    assert not state.exists()
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--database-url", PG], "error: host-name: a PostgreSQL database makes this daemon"),
        (["--host-name", "host1"], "error: host-name: --host-name is for an agent of a cluster"),
        (
            [
                *("--database-url", PG, "--host-name", "host1", "--vtep-address", "10.251.0.1"),
                *("--advertise-api", "unix:///x.sock", "--lost-after", "5"),
            ],
            "error: lost-after: is 5 s, not longer than --offline-after (20 s)",
        ),
    ],
)
def test_serve_refuses_cluster_flags_with_exit_1_saying_what_to_do(
    tmp_path: Path, args: list[str], said: str
) -> None:
    code, stderr = serve(tmp_path, *args)
    assert (code, said in stderr) == (1, True), stderr
