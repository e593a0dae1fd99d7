"""The Firecracker driver: one process per VM, configured through its API socket."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import socket
import ssl
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from roost.errors import VMMFailedError, VMMUnavailableError
from roost.host.netns import NetnsWorker
from roost.vmm.base import LaunchSpec, RunDir
from roost.vmm.process import VMMProcess

log = logging.getLogger(__name__)
SOCKET_TIMEOUT = 5.0
TERM_WAIT = 3.0
Request = tuple[str, str, dict[str, Any]]
# httpx builds an SSL context per transport unless given one (~20 ms); a Unix socket never uses it.
_NO_TLS = ssl.create_default_context()


def find_firecracker(explicit: str | None) -> Path | None:
    """`--firecracker`, else `$ROOST_FIRECRACKER`, else `firecracker` on PATH."""
    candidate = explicit or os.environ.get("ROOST_FIRECRACKER") or shutil.which("firecracker")
    return Path(candidate) if candidate else None


def logger_request(run_dir: RunDir) -> Request:
    body = {
        "log_path": str(run_dir.vmm_log),
        "level": "Info",
        "show_level": True,
        "show_log_origin": False,
    }
    return ("PUT", "/logger", body)


def boot_requests(spec: LaunchSpec) -> list[Request]:
    """Every API request that configures and boots `spec`, in Firecracker's required order
    (pure, so contract tests can check each body against Firecracker's swagger file)."""
    requests: list[Request] = [
        logger_request(spec.run_dir),
        ("PUT", "/machine-config", {"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib}),
    ]
    boot: dict[str, Any] = {"kernel_image_path": str(spec.kernel), "boot_args": spec.boot_args}
    if spec.initrd is not None:
        boot["initrd_path"] = str(spec.initrd)
    requests.append(("PUT", "/boot-source", boot))
    if spec.rootfs is not None:
        requests.append(
            (
                "PUT",
                "/drives/rootfs",
                {
                    "drive_id": "rootfs",
                    "path_on_host": str(spec.rootfs),
                    "is_root_device": spec.initrd is None,
                    "is_read_only": False,
                },
            )
        )
    if spec.nic is not None:
        requests.append(
            (
                "PUT",
                "/network-interfaces/eth0",
                {"iface_id": "eth0", "host_dev_name": spec.nic.tap, "guest_mac": spec.nic.mac},
            )
        )
    if spec.vsock is not None:
        requests.append(
            ("PUT", "/vsock", {"guest_cid": spec.vsock.cid, "uds_path": str(spec.vsock.uds_path)})
        )
    requests.append(("PUT", "/actions", {"action_type": "InstanceStart"}))
    return requests


@functools.cache
def _url(path: str) -> httpx.URL:
    """The URL of an API path, parsed once (httpx parses URLs in Python)."""
    return httpx.URL(f"http://localhost{path}")


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class FirecrackerAPI:
    """A small client for one VM's API socket: an httpx transport whose one connection is kept
    open from the VMM's first call to its last (Firecracker serves few connections). Requests go
    to the transport directly: nothing of the Client layer (base URL, auth, redirects, cookies,
    hooks) applies to Firecracker, and it cost a third of each call here."""

    def __init__(self, api_socket: Path, timeout: float = 10.0) -> None:
        self._transport = httpx.HTTPTransport(uds=str(api_socket), verify=_NO_TLS)
        self._timeout = httpx.Timeout(timeout).as_dict()

    def close(self) -> None:
        self._transport.close()

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        limits = self._timeout if timeout is None else httpx.Timeout(timeout).as_dict()
        request = httpx.Request(method, _url(path), json=body, extensions={"timeout": limits})
        try:
            response = self._transport.handle_request(request)
            try:
                response.read()
            finally:
                response.close()
        except httpx.HTTPError as error:
            raise VMMFailedError(f"Firecracker API {method} {path} failed: {error}") from None
        if response.status_code >= 300:
            try:
                fault = response.json().get("fault_message", response.text)
            except ValueError:
                fault = response.text
            raise VMMFailedError(f"Firecracker refused {method} {path}: {fault}")
        return response.json() if response.content else None


class FirecrackerDriver:
    kind = "firecracker"

    def __init__(self, binary: Path | None) -> None:
        self.binary = binary
        self._early = ThreadPoolExecutor(max_workers=4, thread_name_prefix="roost-fc-early")
        # one API client per VMM, from its logger call on; closed when the driver stops the VMM,
        # or when the engine lets go of the process (it ended on its own, or never booted)
        self._apis: weakref.WeakKeyDictionary[VMMProcess, FirecrackerAPI] = (
            weakref.WeakKeyDictionary()
        )

    def check_available(self) -> None:
        if self.binary is None:
            raise VMMUnavailableError(
                "no Firecracker binary: pass --firecracker PATH to roost serve, set "
                "$ROOST_FIRECRACKER, or put firecracker on PATH"
            )
        if not os.access(self.binary, os.X_OK) or not self.binary.is_file():
            raise VMMUnavailableError(
                f"Firecracker binary {self.binary} does not exist or is not executable"
            )

    def api_socket(self, run_dir: RunDir) -> Path:
        return run_dir.api_socket

    def vsock_unavailable(self) -> str | None:
        return None  # hybrid vsock needs no kernel support on the host

    def vsock_path(self, run_dir: RunDir) -> Path | None:
        return run_dir.vsock_socket

    def _api(self, process: VMMProcess) -> FirecrackerAPI:
        api = self._apis.get(process)
        if api is None:
            api = self._apis[process] = FirecrackerAPI(process.run_dir / "api.sock")
            weakref.finalize(process, api.close)
        return api

    def _close_api(self, process: VMMProcess) -> None:
        api = self._apis.pop(process, None)
        if api is not None:
            api.close()

    def start_early(self, name: str, run_dir: RunDir, worker: NetnsWorker) -> Future[VMMProcess]:
        """Start Firecracker (up to its logger) in the background, while the engine allocates
        and builds the tap: none of that is needed before the VM's own configuration."""
        self.check_available()
        return self._early.submit(self._spawn, name, run_dir, worker)

    def _spawn(self, name: str, run_dir: RunDir, worker: NetnsWorker) -> VMMProcess:
        assert self.binary is not None
        run_dir.vmm_log.touch()  # Firecracker opens, but never creates, its log and metrics
        run_dir.metrics.touch()
        # metrics go to the run dir from the start (a flag saves an API round trip)
        argv = [
            str(self.binary),
            "--api-sock",
            str(run_dir.api_socket),
            "--id",
            name,
            "--metrics-path",
            str(run_dir.metrics),
        ]
        process = VMMProcess.start(argv, run_dir.path, worker, output=run_dir.console_log)
        try:
            self._wait_for_socket(process, run_dir.api_socket)
            self._api(process).call(*logger_request(run_dir))
        except BaseException:
            self._close_api(process)
            process.kill()
            raise
        return process

    def launch(
        self,
        spec: LaunchSpec,
        worker: NetnsWorker,
        *,
        before_boot: Callable[[], object] | None = None,
        early: Future[VMMProcess] | None = None,
    ) -> VMMProcess:
        if early is None:
            early = self.start_early(spec.name, spec.run_dir, worker)
        process = early.result()
        try:
            api = self._api(process)
            _logger, *configure, boot = boot_requests(spec)
            for method, path, body in configure:
                api.call(method, path, body)
            if before_boot is not None:
                before_boot()
            api.call(*boot)
        except BaseException:
            self._close_api(process)
            process.kill()
            raise
        return process

    def _wait_for_socket(self, process: VMMProcess, path: Path) -> None:
        """Until Firecracker accepts connections (the file appears at bind(), a moment before
        listen(), so existence alone is not enough)."""
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while not _accepts(path):
            if process.exited():
                raise VMMFailedError(
                    f"Firecracker exited before opening its API socket "
                    f"(exit code {process.exit_code()}); see {process.run_dir / 'console.log'}"
                )
            if time.monotonic() > deadline:
                raise VMMFailedError(f"Firecracker did not open {path} within {SOCKET_TIMEOUT}s")
            time.sleep(0.0005)

    def stop(self, process: VMMProcess, timeout: float, force: bool) -> int | None:
        """Ctrl-Alt-Del, wait `timeout`; SIGTERM, wait; SIGKILL. Always reaped."""
        try:
            if not force and not process.exited():
                try:
                    self._api(process).call(
                        "PUT", "/actions", {"action_type": "SendCtrlAltDel"}, timeout=1.0
                    )
                except VMMFailedError as error:
                    log.info("graceful stop of VMM %d not possible: %s", process.pid, error)
                if process.wait(timeout):
                    return process.exit_code()
                process.signal(signal.SIGTERM)
                if process.wait(TERM_WAIT):
                    return process.exit_code()
            return process.kill()
        finally:
            self._close_api(process)

    def pause(self, process: VMMProcess) -> None:
        self._api(process).call("PATCH", "/vm", {"state": "Paused"})

    def resume(self, process: VMMProcess) -> None:
        self._api(process).call("PATCH", "/vm", {"state": "Resumed"})
