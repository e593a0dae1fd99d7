"""The Cloud Hypervisor driver: one process per VM, configured through its REST API.

Cloud Hypervisor starts with nothing but its API socket. `vm.create` hands it the whole VM and
opens none of the host's devices (it makes them at `vm.boot`), so it is sent while the engine
still prepares the host, and `vm.boot` once the disk and the tap exist. Its vsock is
Firecracker's hybrid vsock, so the host reaches its guests as it reaches Firecracker's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from roost.errors import VMMFailedError
from roost.host.netns import NetnsWorker
from roost.vmm.base import (
    ClientPerProcess,
    Early,
    LaunchSpec,
    RunDir,
    VsockBackend,
    check_binary,
    check_namespace,
    check_tap,
    stop_in_steps,
)
from roost.vmm.process import ReadyWhen, VMMProcess

SERVE_TIMEOUT = 5.0  # for a started Cloud Hypervisor to answer on its API socket
CALL_TIMEOUT = 10.0
STOP_CALL_TIMEOUT = 1.0  # a stop's requests: a VMM that does not answer must not hold it up
SHUTDOWN_WAIT = 3.0  # for the VMM to exit once told to (vmm.shutdown)
TERM_WAIT = 3.0


def find_cloud_hypervisor(explicit: str | None) -> Path | None:
    """`--cloud-hypervisor`, else `$ROOST_CLOUD_HYPERVISOR`, else `cloud-hypervisor` on PATH."""
    candidate = (
        explicit or os.environ.get("ROOST_CLOUD_HYPERVISOR") or shutil.which("cloud-hypervisor")
    )
    return Path(candidate) if candidate else None


def guest_cmdline(spec: LaunchSpec) -> str:
    """The spec's command line, plus what Firecracker adds by itself and Cloud Hypervisor does
    not: `root=/dev/vda rw` for a root disk (the first virtio disk)."""
    args = spec.boot_args.split()
    root_disk = spec.rootfs is not None and spec.initrd is None
    if root_disk and not any(arg.startswith("root=") for arg in args):
        args += ["root=/dev/vda", "rw"]
    return " ".join(args)


def vm_config(spec: LaunchSpec) -> dict[str, Any]:
    """The `vm.create` body for `spec` (pure, so tests can check every case): the serial port
    to the console log, the virtio console off."""
    payload = {"kernel": str(spec.kernel), "cmdline": guest_cmdline(spec)}
    if spec.initrd is not None:
        payload["initramfs"] = str(spec.initrd)
    config: dict[str, Any] = {
        "payload": payload,
        "cpus": {"boot_vcpus": spec.vcpus, "max_vcpus": spec.vcpus},
        "memory": {"size": spec.memory_mib << 20},
        "serial": {"mode": "File", "file": str(spec.run_dir.console_log)},
        "console": {"mode": "Off"},
    }
    if spec.rootfs is not None:
        config["disks"] = [{"path": str(spec.rootfs), "readonly": False}]
    if spec.nics:
        config["net"] = [{"tap": nic.tap, "mac": nic.mac} for nic in spec.nics]
    if spec.vsock is not None:
        config["vsock"] = {"cid": spec.vsock.cid, "socket": str(spec.vsock.uds_path)}
    return config


class CloudHypervisorAPI:
    """A client for one VMM's API socket (`/api/v1/<action>`), its connection kept from the
    first call to the last."""

    def __init__(self, api_socket: Path) -> None:
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(api_socket)),
            base_url="http://localhost/api/v1",
        )

    def close(self) -> None:
        self._client.close()

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float = CALL_TIMEOUT,
    ) -> Any:
        """Send the request; the answer's JSON (None when it has no body)."""
        try:
            response = self._client.request(method, path, json=body, timeout=timeout)
        except httpx.HTTPError as error:
            reason = str(error) or type(error).__name__
            raise VMMFailedError(f"Cloud Hypervisor API {method} {path} failed: {reason}") from None
        if response.is_error:
            raise VMMFailedError(
                f"Cloud Hypervisor refused {method} {path} ({response.status_code}): "
                f"{_reason(response)}"
            )
        try:
            return response.json() if response.content else None
        except ValueError:
            raise VMMFailedError(
                f"Cloud Hypervisor answered {method} {path} with something not JSON: "
                f"{response.text[:200]!r}"
            ) from None


def _reason(response: httpx.Response) -> str:
    """Cloud Hypervisor's explanation: a JSON list of its error chain, outermost first."""
    try:
        chain = json.loads(response.text)
    except ValueError:
        return response.text.strip() or "no reason given"
    if isinstance(chain, list):
        return ": ".join(str(message) for message in chain)
    return str(chain)


class CloudHypervisorDriver:
    kind = "cloud-hypervisor"

    def __init__(
        self, binary: Path | None, chroot: Callable[[str], Path | None] = lambda name: None
    ) -> None:
        self.binary = binary
        self._chroot = chroot  # where a VM's files are under `serve --jailer` (not jailed)
        self._apis = ClientPerProcess(
            lambda process: CloudHypervisorAPI(self._run_dir(process).api_socket)
        )

    def check_available(self) -> None:
        check_binary(
            self.binary,
            "Cloud Hypervisor",
            missing="no Cloud Hypervisor binary: pass --cloud-hypervisor PATH to roost serve, "
            "set $ROOST_CLOUD_HYPERVISOR, or put cloud-hypervisor on PATH",
            hint="; pass --cloud-hypervisor PATH to roost serve",
        )

    def api_socket(self, run_dir: RunDir) -> Path:
        return run_dir.api_socket

    def vsock_unavailable(self) -> str | None:
        return None  # hybrid vsock needs no kernel support on the host

    def vsock_backend(self) -> VsockBackend:
        return VsockBackend.CLOUD_HYPERVISOR

    def _run_dir(self, process: VMMProcess) -> RunDir:
        return RunDir(process.run_dir, self._chroot(process.run_dir.name))

    def _wait_until_serving(self, process: VMMProcess) -> None:
        """Until Cloud Hypervisor answers `vmm.ping` (its socket file appears a moment before
        it listens, so the file alone proves nothing)."""
        api = self._apis.of(process)
        vmm_log = self._run_dir(process).vmm_log
        deadline = time.monotonic() + SERVE_TIMEOUT
        pause = 0.0005
        while True:
            try:
                api.call("GET", "/vmm.ping", timeout=STOP_CALL_TIMEOUT)
                return
            except VMMFailedError as error:
                if process.exited():
                    self._apis.close(process)
                    process.wait(TERM_WAIT)
                    raise VMMFailedError(
                        f"Cloud Hypervisor exited before serving its API (exit code "
                        f"{process.exit_code()}); see {vmm_log}"
                    ) from None
                if time.monotonic() > deadline:
                    self._apis.close(process)
                    raise VMMFailedError(
                        f"Cloud Hypervisor did not answer on its API socket within "
                        f"{SERVE_TIMEOUT:g}s ({error}); see {vmm_log}"
                    ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def start_early(
        self, name: str, run_dir: RunDir, worker: NetnsWorker, netns: Path | None = None
    ) -> ReadyWhen:
        """Have the supervisor start Cloud Hypervisor (in `netns` when given), and go on: it
        needs nothing but its API socket until the VM is created, so it comes up while the
        engine allocates and builds the tap. Its own messages go to the VMM log (the serial
        port has the console log)."""
        self.check_available()
        argv = [str(self.binary), "--api-socket", str(run_dir.api_socket)]
        starting = VMMProcess.begin(argv, run_dir.path, worker, output=run_dir.vmm_log, netns=netns)
        return ReadyWhen(starting, self._wait_until_serving)

    def launch(
        self,
        spec: LaunchSpec,
        worker: NetnsWorker,
        *,
        host_ready: Callable[[], object] | None = None,
        early: Early | None = None,
        while_booting: Callable[[VMMProcess], object] | None = None,
    ) -> VMMProcess:
        """Create the VM, let the engine finish the host (disk, tap), then boot. Cloud
        Hypervisor answers `vm.boot` once the vCPUs run, so `while_booting` follows that
        answer."""
        if early is None:
            early = self.start_early(spec.name, spec.run_dir, worker, spec.netns)
        process = early.result()
        try:
            check_namespace(process, spec.netns)
            api = self._apis.of(process)
            api.call("PUT", "/vm.create", vm_config(spec))
            if host_ready is not None:
                host_ready()
            for nic in spec.nics:
                check_tap(nic.tap, worker, spec.netns)
            api.call("PUT", "/vm.boot")
            if while_booting is not None:
                while_booting(process)
        except BaseException:
            self._apis.close(process)
            process.kill()
            raise
        return process

    def stop(self, process: VMMProcess, timeout: float, force: bool) -> int | None:
        """Power button, wait `timeout`; vmm.shutdown, wait; SIGTERM, wait; SIGKILL. Always
        reaped."""
        graceful = [
            (lambda: self._ask(process, "/vm.power-button"), timeout),
            (lambda: self._ask(process, "/vmm.shutdown"), SHUTDOWN_WAIT),
        ]
        try:
            return stop_in_steps(process, graceful, force=force, term_wait=TERM_WAIT)
        finally:
            self._apis.close(process)

    def _ask(self, process: VMMProcess, path: str) -> None:
        self._apis.of(process).call("PUT", path, timeout=STOP_CALL_TIMEOUT)

    def pause(self, process: VMMProcess, meanwhile: Callable[[], object] | None = None) -> None:
        self._apis.of(process).call("PUT", "/vm.pause")
        if meanwhile is not None:
            meanwhile()

    def resume(self, process: VMMProcess, meanwhile: Callable[[], object] | None = None) -> None:
        self._apis.of(process).call("PUT", "/vm.resume")
        if meanwhile is not None:
            meanwhile()
