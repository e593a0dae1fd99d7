"""The Cloud Hypervisor driver against a FAKE Cloud Hypervisor (tests/fake_cloud_hypervisor.py,
started by the real supervisor; no real one runs here): every request the driver sends, as the
fake recorded it, is an operation of Cloud Hypervisor's OpenAPI spec with a body its schema
accepts (no unknown fields); boots with and without NIC, root disk, initramfs and vsock; pause
and resume; each step of a stop; launches that fail leave no process."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft4Validator

from roost.errors import VMMFailedError, VMMUnavailableError
from roost.host.netns import NetnsWorker
from roost.vmm import cloud_hypervisor
from roost.vmm.base import NIC, LaunchSpec, RunDir, Vsock, VsockBackend
from roost.vmm.cloud_hypervisor import (
    CloudHypervisorAPI,
    CloudHypervisorDriver,
    find_cloud_hypervisor,
)
from roost.vmm.process import VMMProcess
from tests.fake_cloud_hypervisor import install
from tests.harness import serve_unix
from tests.unit.test_firecracker_contract import closed

SPEC = Path(__file__).resolve().parents[1] / "data" / "cloud-hypervisor.yaml"  # see its README
BASE = "/api/v1"  # the spec's server URL's path


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    assert spec["servers"] == [{"url": f"http://localhost{BASE}"}]
    return spec


def contract_errors(openapi: dict[str, Any], method: str, path: str, body: Any) -> list[str]:
    """What is wrong with the request for Cloud Hypervisor: an operation its spec lacks, a body
    its schema refuses, or a body where it takes none."""
    operation = openapi["paths"].get(path.removeprefix(BASE), {}).get(method.lower())
    if not path.startswith(f"{BASE}/") or operation is None:
        return [f"{method} {path} is not in Cloud Hypervisor's API"]
    if "requestBody" not in operation:
        return [] if body is None else [f"{method} {path} takes no body"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    components = {"schemas": closed(openapi["components"]["schemas"])}
    validator = Draft4Validator({**closed(schema), "components": components})
    return [error.message for error in validator.iter_errors(body)]


class Rig:
    """The driver, a fake binary with `flags`, and the run dir of one VM, in a short directory
    (Unix socket paths are short); every VMM it launched is ended when it closes."""

    def __init__(self, *flags: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rch-", dir="/tmp"))
        self.record = self.dir / "requests.jsonl"
        self.driver = CloudHypervisorDriver(install(self.dir, "--record", str(self.record), *flags))
        self.run_dir = RunDir(self.dir / "vms" / "vm-1")
        self.run_dir.prepare()
        self.worker = NetnsWorker(None)
        self.processes: list[VMMProcess] = []

    def spec(
        self, *, nics: int = 1, rootfs: bool = True, initrd: bool = True, vsock: bool = True
    ) -> LaunchSpec:
        return LaunchSpec(
            name="vm-1",
            run_dir=self.run_dir,
            kernel=Path("/k/vmlinux"),
            initrd=Path("/k/initrd") if initrd else None,
            rootfs=Path("/d/vm-1.ext4") if rootfs else None,
            boot_args="console=ttyS0 roost.name=vm-1",
            vcpus=2,
            memory_mib=256,
            # "lo" is a tap to the driver's check (it exists everywhere); the fake opens nothing
            nics=tuple(NIC("lo", f"02:00:00:00:00:0{7 + index}") for index in range(nics)),
            vsock=(
                Vsock(3, self.run_dir.vsock_socket, VsockBackend.CLOUD_HYPERVISOR)
                if vsock
                else None
            ),
        )

    def launch(self, spec: LaunchSpec, **hooks: Any) -> VMMProcess:
        early = self.driver.start_early(spec.name, spec.run_dir, self.worker)
        self.processes.append(early.result())
        return self.driver.launch(spec, self.worker, early=early, **hooks)

    def requests(self) -> list[dict[str, Any]]:
        lines = self.record.read_text().splitlines() if self.record.exists() else []
        return [json.loads(line) for line in lines]

    def actions(self) -> list[str]:
        """The recorded PUTs: the driver's only GET is `vmm.ping` while the VMM starts (and the
        test's, `vm.info`)."""
        return [
            f"PUT {r['path'].removeprefix(BASE)}" for r in self.requests() if r["method"] == "PUT"
        ]

    def info(self) -> dict[str, Any]:
        api = CloudHypervisorAPI(self.run_dir.api_socket)
        try:
            info: dict[str, Any] = api.call("GET", "/vm.info")
            return info
        finally:
            api.close()

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        self.worker.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    rig = Rig(*getattr(request, "param", ()))
    yield rig
    rig.close()


def assert_all_valid(openapi: dict[str, Any], rig: Rig) -> None:
    requests = rig.requests()
    assert requests
    for r in requests:
        assert contract_errors(openapi, r["method"], r["path"], r["body"]) == [], r


BOOTS = {
    "vsock only, initramfs": dict(nics=0, rootfs=False),
    "bridged, root disk beside an initramfs": dict(),
    "bridged, root disk and no initramfs": dict(initrd=False),
    "no vsock, no NIC": dict(nics=0, vsock=False),
    "two NICs": dict(nics=2),
}


@pytest.mark.parametrize("case", list(BOOTS))
def test_every_boot_request_matches_the_openapi_spec(
    openapi: dict[str, Any], rig: Rig, case: str
) -> None:
    spec = rig.spec(**BOOTS[case])
    seen_at_host_ready: list[list[str]] = []
    booting: list[VMMProcess] = []
    try:
        process = rig.launch(
            spec,
            host_ready=lambda: seen_at_host_ready.append(rig.actions()),
            while_booting=booting.append,
        )
    finally:  # a request the fake could not take is reported as what it is
        assert_all_valid(openapi, rig)
    assert rig.actions() == ["PUT /vm.create", "PUT /vm.boot"]
    assert seen_at_host_ready == [["PUT /vm.create"]]  # the disk and tap are ready before boot
    assert booting == [process]
    [create] = [r["body"] for r in rig.requests() if r["path"] == f"{BASE}/vm.create"]
    payload = {"kernel": "/k/vmlinux", "cmdline": "console=ttyS0 roost.name=vm-1"}
    if spec.initrd is not None:
        payload["initramfs"] = "/k/initrd"
    elif spec.rootfs is not None:
        payload["cmdline"] += " root=/dev/vda rw"
    expected: dict[str, Any] = {
        "payload": payload,
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256 << 20},
        "serial": {"mode": "File", "file": str(rig.run_dir.console_log)},
        "console": {"mode": "Off"},
    }
    if spec.rootfs is not None:
        expected["disks"] = [{"path": "/d/vm-1.ext4", "readonly": False}]
    if spec.nics:
        expected["net"] = [
            {"tap": "lo", "mac": f"02:00:00:00:00:0{7 + i}"} for i in range(len(spec.nics))
        ]
    if spec.vsock is not None:
        expected["vsock"] = {"cid": 3, "socket": str(rig.run_dir.vsock_socket)}
    assert create == expected
    assert rig.info()["state"] == "Running"
    assert rig.run_dir.vsock_socket.exists() == (spec.vsock is not None)


def test_pause_and_resume_match_the_spec_and_run_meanwhile_once(
    openapi: dict[str, Any], rig: Rig
) -> None:
    process = rig.launch(rig.spec())
    done: list[str] = []
    rig.driver.pause(process, lambda: done.append("paused"))
    assert rig.info()["state"] == "Paused"
    rig.driver.resume(process, lambda: done.append("resumed"))
    assert rig.info()["state"] == "Running"
    assert done == ["paused", "resumed"]
    assert rig.actions()[2:] == ["PUT /vm.pause", "PUT /vm.resume"]
    assert_all_valid(openapi, rig)


def test_a_refused_pause_says_cloud_hypervisors_reason(rig: Rig) -> None:
    process = rig.launch(rig.spec())
    rig.driver.pause(process)
    with pytest.raises(VMMFailedError, match=r"refused PUT /vm.pause \(405\): VM is Paused"):
        rig.driver.pause(process, lambda: pytest.fail("ran for a pause that failed"))


STOPS = {
    "the guest powers off": ((), ["PUT /vm.power-button"], 0),
    "the guest ignores the power button": (
        ("--ignore", "power-button"),
        ["PUT /vm.power-button", "PUT /vmm.shutdown"],
        0,
    ),
    "the VMM ignores vmm.shutdown": (
        ("--ignore", "power-button", "--ignore", "shutdown"),
        ["PUT /vm.power-button", "PUT /vmm.shutdown"],
        -15,
    ),
    "the VMM ignores SIGTERM too": (
        ("--ignore", "power-button", "--ignore", "shutdown", "--ignore", "sigterm"),
        ["PUT /vm.power-button", "PUT /vmm.shutdown"],
        -9,
    ),
}


@pytest.mark.parametrize(
    ("rig", "sent", "code"), list(STOPS.values()), ids=list(STOPS), indirect=["rig"]
)
def test_each_step_of_a_stop(
    openapi: dict[str, Any],
    rig: Rig,
    sent: list[str],
    code: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cloud_hypervisor, "SHUTDOWN_WAIT", 0.3)
    monkeypatch.setattr(cloud_hypervisor, "TERM_WAIT", 0.3)
    process = rig.launch(rig.spec())
    assert rig.driver.stop(process, 0.2, force=False) == code
    assert process.exit_file.exists()  # reaped
    assert rig.actions()[2:] == sent
    assert_all_valid(openapi, rig)


def test_a_forced_stop_asks_nothing_and_kills(rig: Rig) -> None:
    process = rig.launch(rig.spec())
    assert rig.driver.stop(process, 30, force=True) == -9
    assert process.exit_file.exists()
    assert rig.actions() == ["PUT /vm.create", "PUT /vm.boot"]


def test_stopping_a_vmm_that_has_ended_asks_nothing(rig: Rig) -> None:
    process = rig.launch(rig.spec())
    process.kill()
    assert rig.driver.stop(process, 30, force=False) == -9
    assert rig.actions() == ["PUT /vm.create", "PUT /vm.boot"]


@pytest.mark.parametrize("rig", [("--refuse", "vm.boot")], indirect=True)
def test_a_refused_boot_fails_the_launch_with_the_reason_and_leaves_no_process(rig: Rig) -> None:
    booting: list[VMMProcess] = []
    with pytest.raises(
        VMMFailedError,
        match=r"refused PUT /vm.boot \(500\): Error handling vm.boot: refused by the fake",
    ):
        rig.launch(rig.spec(), while_booting=booting.append)
    assert booting == []
    assert rig.processes[0].exit_file.exists()


def test_a_missing_tap_fails_before_the_boot_and_leaves_no_process(rig: Rig) -> None:
    spec = rig.spec()
    missing = replace(spec, nics=(*spec.nics, NIC("rtap-none", "02:00:00:00:00:08")))
    with pytest.raises(VMMFailedError, match="tap rtap-none does not exist"):
        rig.launch(missing)
    assert rig.actions() == ["PUT /vm.create"]
    assert rig.processes[0].exit_file.exists()


def test_a_vmm_that_exits_at_once_is_an_error_naming_its_log(rig: Rig) -> None:
    binary = rig.dir / "exits"
    binary.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    binary.chmod(0o755)
    driver = CloudHypervisorDriver(binary)
    early = driver.start_early("vm-1", rig.run_dir, rig.worker)
    with pytest.raises(VMMFailedError, match="exited before serving its API") as raised:
        early.result()
    assert f"(exit code 3); see {rig.run_dir.vmm_log}" in str(raised.value)
    assert rig.run_dir.vmm_log.read_text() == "cannot start\n"
    with pytest.raises(VMMFailedError):  # the same error every time, no second process
        driver.launch(rig.spec(), rig.worker, early=early)


def test_without_a_binary_cloud_hypervisor_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(VMMUnavailableError, match="no Cloud Hypervisor binary: pass"):
        CloudHypervisorDriver(None).check_available()
    not_executable = tmp_path / "cloud-hypervisor"
    not_executable.write_text("")
    for path in (not_executable, tmp_path / "missing"):
        with pytest.raises(VMMUnavailableError, match=f"Cloud Hypervisor binary {path} does"):
            CloudHypervisorDriver(path).check_available()


def test_the_binary_is_found_by_flag_then_environment_then_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_path = install(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ROOST_CLOUD_HYPERVISOR", raising=False)
    assert find_cloud_hypervisor(None) == on_path
    monkeypatch.setenv("ROOST_CLOUD_HYPERVISOR", "/opt/ch/cloud-hypervisor")
    assert find_cloud_hypervisor(None) == Path("/opt/ch/cloud-hypervisor")
    assert find_cloud_hypervisor("/x/ch") == Path("/x/ch")
    monkeypatch.delenv("ROOST_CLOUD_HYPERVISOR")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_cloud_hypervisor(None) is None


def test_the_contract_check_catches_what_cloud_hypervisor_would_refuse(
    openapi: dict[str, Any],
) -> None:
    create = f"{BASE}/vm.create"
    good = {"payload": {"kernel": "/k"}, "memory": {"size": 1 << 27}}
    assert contract_errors(openapi, "PUT", create, good) == []
    assert contract_errors(openapi, "PUT", create, {**good, "memory": {"size_mib": 128}})
    assert contract_errors(openapi, "PUT", create, {**good, "vsock": {"cid": 2, "socket": "/v"}})
    assert contract_errors(openapi, "PUT", f"{BASE}/vm.boot", {"now": True})
    assert contract_errors(openapi, "PUT", f"{BASE}/vm.start", None)
    assert contract_errors(openapi, "GET", f"{BASE}/vm.create", None)


def test_an_answer_that_is_not_json_is_the_vmms_failure(tmp_path: Path) -> None:
    def serve(listener: socket.socket) -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")

    path = tmp_path / "api.sock"
    listener, thread = serve_unix(path, serve)
    api = CloudHypervisorAPI(path)
    try:
        with pytest.raises(VMMFailedError, match=r"answered GET /vm\.info with something not JSON"):
            api.call("GET", "/vm.info")
    finally:
        api.close()
        listener.close()
        thread.join(5)
