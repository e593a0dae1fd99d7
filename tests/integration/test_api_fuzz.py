"""A fuzz of the two bodies clients write most, a VM to create and a plugin to install, against
a real daemon: whatever comes in, the answer is a success or the error object with its code's
status, and never a 500.

Bodies are mostly near-valid (the real field names with wrong types, odd nesting, huge
numbers, unicode, NUL, paths to directories, sockets and /proc files), some raw JSON texts that
strain the parser, and some random JSON. Nothing in them makes the daemon reach beyond this
machine: URLs come from a fixed list of loopback and unusable ones, and no other string holds
"://". What a body manages to create is removed at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from roost.errors import CODES
from tests.harness import INITRAMFS, Daemon, write_plugin

pytestmark = [pytest.mark.root, pytest.mark.firecracker]

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
JSON_TYPE = {"content-type": "application/json"}

# ---- strategies -------------------------------------------------------------------------


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` about four times in five: a body wrong everywhere stops at its first field."""
    return st.integers(0, 4).flatmap(lambda pick: bad if pick == 4 else good)


# any text but a URL: the daemon downloads what a body names, and must reach nothing but this
# machine
text = st.text(max_size=40).filter(lambda value: "://" not in value)
odd_text = st.one_of(
    text,
    st.sampled_from(["", " ", "\x00", "a\x00b", "é", "😀", "\u202e", "\ufeff", "x" * 5000]),
)
huge_ints = st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**100, 10**299, -(10**200)])
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    huge_ints,
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, odd_text)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(text, children, max_size=4)
    ),
    max_leaves=20,
)
names = mostly(
    st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True),
    st.one_of(st.sampled_from(["Base", "a" * 64, "-a", "a_b", "", "a.b", "x\x00"]), json_values),
)
subnets = st.sampled_from(
    [
        "10.77.0.0/24",
        "10.77.0.0/30",
        "10.78.0.0/16",
        "127.0.0.0/8",
        "0.0.0.0/0",
        "0.0.0.0/8",
        "224.0.0.0/4",
        "169.254.0.0/16",
        "255.255.255.255/32",
        "10.77.0.0/33",
        "10.77.0.0/024",
        "10.77.0.1/24",
        "::1/128",
        "fd00::/64",
        "10.77.0.0",
        "10.77.0.0/",
    ]
)
addresses = st.sampled_from(
    ["10.77.0.1", "10.77.0.2", "10.77.0.255", "10.77.0.0", "127.0.0.1", "::1", "10.77.0.02", "x"]
)
fuzzy_network = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.one_of(
            st.sampled_from(["vsock", "bridged", "dhcp", " Bridged ", "VSOCK", "tap"]), scalars
        ),
        "subnet": st.one_of(subnets, scalars),
        "gateway": st.one_of(addresses, scalars),
        "ip": st.one_of(addresses, scalars),
        "auto_assign": st.one_of(st.booleans(), scalars),
    },
)
network = st.one_of(
    st.sampled_from([{"mode": "vsock"}, {"mode": "dhcp"}, {"mode": "bridged"}]),
    st.fixed_dictionaries(
        {"mode": st.just("bridged"), "subnet": subnets, "auto_assign": st.just(True)}
    ),
    st.fixed_dictionaries(
        {"mode": st.just("bridged"), "subnet": subnets, "gateway": addresses, "ip": addresses}
    ),
    fuzzy_network,
    fuzzy_network,
    json_values,
)
resources = st.fixed_dictionaries(
    {},
    optional={
        "vcpus": mostly(st.integers(-2, 40), st.one_of(numbers, scalars)),
        "memory_mib": mostly(st.integers(-1, 2**21), st.one_of(numbers, scalars)),
    },
)
labels = mostly(
    st.dictionaries(
        mostly(st.from_regex(r"[a-z][a-z0-9./_-]{0,20}", fullmatch=True), odd_text),
        mostly(text, scalars),
        max_size=80,
    ),
    json_values,
)
boot_args = mostly(
    st.sampled_from(["console=ttyS0", "ip=10.0.0.1", "roost.name=x", "a\x00b", "x " * 600]),
    st.one_of(odd_text, json_values),
)


def vm_bodies() -> st.SearchStrategy[Any]:
    """Create bodies: near-valid ones (never `"start": true`, so nothing boots), and others."""
    near_valid = st.fixed_dictionaries(
        {
            "name": names,
            "plugin": mostly(st.just("base"), names),
            "start": mostly(st.just(False), st.sampled_from(["false", 0, None, [], "no"])),
        },
        optional={
            "resources": mostly(resources, json_values),
            "boot_args": boot_args,
            "network": network,
            "labels": labels,
            "vmm": mostly(st.sampled_from(["firecracker", "qemu"]), st.one_of(text, scalars)),
            "kernel": json_values,
        },
    )
    anything = st.dictionaries(text, json_values, max_size=6).map(
        lambda body: {**body, "start": False}
    )
    return mostly(near_valid, st.one_of(anything, json_values))


def artifact_paths(scratch: Path, api_socket: Path) -> st.SearchStrategy[Any]:
    return mostly(
        st.sampled_from(
            [
                str(INITRAMFS),
                str(scratch),  # a directory
                str(scratch / "loop"),  # a symlink loop
                str(scratch / "dangling"),
                str(scratch / "empty"),
                str(scratch / ("x" * 300)),
                str(api_socket),  # a socket
                "/proc/self/status",
                "/proc/version",
                "/sys/kernel/mm/transparent_hugepage/enabled",
                "/dev/null",
                "/etc/hostname",
                "/nonexistent/initramfs",
                f"{INITRAMFS}\x00.png",
                "relative/initramfs",
                "",
                " ",
                "/" + "a" * 5000,
                "/tmp/../" * 200 + "etc/hostname",
            ]
        ),
        st.one_of(odd_text, json_values),
    )


urls = st.sampled_from(
    [
        f"file://{INITRAMFS}",
        "file:///proc/self/status",
        "file:///nonexistent",
        "file:///etc/hostname",
        "file://localhost/etc/hostname",
        "file://",
        "http://127.0.0.1:1/initramfs",
        "https://127.0.0.1:1/initramfs",
        "http://[::1]:1/initramfs",
        "http://127.0.0.1:1/" + "a" * 3000,
        "http://",
        "http://[::1",
        "ftp://127.0.0.1/x",
        "javascript:alert(1)",
        "data:,hello",
    ]
)
sha256s = st.one_of(
    st.text("0123456789abcdef", min_size=64, max_size=64),
    st.sampled_from(["", "0" * 63, "g" * 64, "0" * 65, " " + "0" * 64]),
    scalars,
)


def plugin_bodies(scratch: Path, api_socket: Path) -> st.SearchStrategy[Any]:
    paths = artifact_paths(scratch, api_socket)
    artifact = st.one_of(
        st.fixed_dictionaries({"path": paths}),
        st.fixed_dictionaries({"path": paths}),
        st.fixed_dictionaries({"path": paths}, optional={"sha256": sha256s}),
        st.fixed_dictionaries({"url": urls}, optional={"sha256": sha256s}),
        st.fixed_dictionaries({"path": paths, "url": urls}),
        json_values,
    )
    near_valid = st.fixed_dictionaries(
        {
            "name": names,
            "version": mostly(st.just("1.0"), st.one_of(odd_text, scalars)),
            "initramfs": artifact,
        },
        optional={
            "schema_version": mostly(st.just("1"), scalars),
            "description": odd_text,
            "rootfs": artifact,
            "boot_args": boot_args,
            "resources": mostly(resources, json_values),
            "network": network,
            "allowed_network_modes": mostly(
                st.lists(st.sampled_from(["vsock", "bridged", "dhcp", "x"]), max_size=4),
                json_values,
            ),
            "labels": labels,
        },
    )
    anything = st.dictionaries(text, json_values, max_size=6)
    return mostly(near_valid, st.one_of(anything, json_values))


raw_texts = st.one_of(
    st.sampled_from(
        [
            b"[" * 100_000,
            b'{"name": ' * 50_000,
            b'{"name": "x", "plugin": "base", "start": false, "resources": {"vcpus": '
            + b"9" * 5000
            + b"}}",
            b'{"name": "x", "name": "y", "plugin": "base", "start": false}',
            b'{"name": "x", "plugin": "base", "start": false, "labels": {"a": NaN}}',
            b'{"name": "x", "plugin": "base", "start": false, "resources": {"vcpus": 1e999}}',
            b'{"name": "\\ud800", "plugin": "base", "start": false}',
            b"\xff\xfe{\x00}\x00",
            b"",
            b"null",
            b"{" + b'"a": 1, ' * 30_000 + b'"start": false}',
        ]
    ),
    st.binary(max_size=200),
)

# ---- the checks -------------------------------------------------------------------------


def check_answer(response: httpx.Response, body: Any) -> Any:
    """A success (its JSON), or the error object with a known code and that code's status;
    never a 500."""
    assert response.status_code != 500, f"500 for {body!r:.2000}: {response.text:.2000}"
    answer = response.json()
    event(f"{response.status_code} {answer['error']['code'] if 'error' in answer else ''}")
    if response.is_success:
        assert isinstance(answer, dict) and isinstance(answer.get("name"), str), answer
        return answer
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    error = answer["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] in CODES, error
    assert CODES[error["code"]].http_status == response.status_code, (error, body)
    assert isinstance(error["message"], str) and error["message"]
    assert all(set(detail) == {"loc", "msg"} for detail in error["details"]), error
    return None


def post(daemon: Daemon, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return daemon.http.post(path, content=body, headers=JSON_TYPE)
    return daemon.http.post(path, json=body)


@pytest.fixture
def based(daemon: Daemon, tmp_path: Path) -> Iterator[Daemon]:
    """The daemon with plugin `base` installed, for create bodies to reach allocation."""
    daemon.ok("plugin", "install", write_plugin(tmp_path, "base"))
    yield daemon


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A directory with the odd files artifact paths name."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "empty").touch()
    return tmp_path


def test_no_create_body_is_an_internal_error(based: Daemon) -> None:
    @FUZZ
    @given(body=mostly(vm_bodies(), raw_texts))
    def create(body: Any) -> None:
        created = check_answer(post(based, "/v1/vms", body), body)
        if created is not None:
            assert based.http.delete(f"/v1/vms/{created['name']}").status_code == 204

    create()
    assert based.http.get("/v1/vms").json() == []
    assert "Traceback" not in based.logs()


def test_no_install_body_is_an_internal_error(daemon: Daemon, scratch: Path) -> None:
    @FUZZ
    @given(body=mostly(plugin_bodies(scratch, daemon.socket), raw_texts))
    def install(body: Any) -> None:
        installed = check_answer(post(daemon, "/v1/plugins", body), body)
        if installed is not None:
            assert daemon.http.delete(f"/v1/plugins/{installed['name']}").status_code == 204

    install()
    assert daemon.http.get("/v1/plugins").json() == []
    assert "Traceback" not in daemon.logs()
