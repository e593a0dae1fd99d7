"""roost as a CNI runtime (spec 1.0): it runs a conflist's plugins for a VM's namespace.

Plugins run from the daemon's namespace (the worker's), so the bridges, veth host ends and
forwarding they make land where roost's other networks live, while their container side goes
into the VM's own namespace `roost-vm-<vm name>`, made and removed here too.

Who removes what: `CniRuntime.add` undoes its own work when a plugin fails (DEL of the
plugins it ran, in reverse) and raises; the namespace is the caller's, made before ADD and
removed after DEL (or after a failed ADD), since the VMM and the tap live in it too. DEL is
idempotent and works without the namespace (plugins then release what they hold on the host:
host-local's lease, the veth's host end is gone with the namespace). The caller stores the
`Attachment` before ADD and the result after it, so a DEL after a crash has what it needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roost.errors import HostError, InvalidError
from roost.host.netns import NETNS_DIR, NetnsWorker, netns_path
from roost.spec.cni import (
    CHECK_SINCE,
    CniResult,
    Conflist,
    check_container_id,
    cni_args,
    parse_conflist,
    parse_error,
    parse_result,
)

CONF_SUFFIXES = (".conflist", ".conf", ".json")
VM_NAMESPACE_PREFIX = "roost-vm-"
PLUGIN_TIMEOUT = 30.0  # seconds per plugin call
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STDERR_TAIL = 400

CLONE_NEWNET = 0x40000000
MS_BIND, MS_REC, MS_SHARED = 0x1000, 0x4000, 0x100000
MNT_DETACH = 2
_LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Attachment:
    """One VM interface's attachment to a CNI network: all that ADD, CHECK and DEL need,
    stored by the caller before ADD so a DEL after a crash runs the same list."""

    conflist: Conflist
    container_id: str
    netns: str  # the VM namespace's path (CNI_NETNS)
    ifname: str
    args: dict[str, str] = field(default_factory=dict)
    capability_args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "conflist": self.conflist.to_json(),
            "container_id": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "args": dict(self.args),
            "capability_args": dict(self.capability_args),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attachment:
        return cls(
            conflist=parse_conflist(data["conflist"]),
            container_id=data["container_id"],
            netns=data["netns"],
            ifname=data["ifname"],
            args=dict(data.get("args") or {}),
            capability_args=dict(data.get("capability_args") or {}),
        )


class CniRuntime:
    """Runs conflists from `conf_dir` (or given inline) with plugins from `bin_dirs`, each
    plugin started inside `worker`'s namespace and given `timeout` seconds."""

    def __init__(
        self,
        conf_dir: Path,
        bin_dirs: Sequence[Path],
        worker: NetnsWorker,
        timeout: float = PLUGIN_TIMEOUT,
    ) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = tuple(bin_dirs)
        self._worker = worker
        self._timeout = timeout

    def find(self, name: str, loc: str = "cni.network") -> Conflist:
        """The conflist in the conf dir whose `name` is `name` (the dir read afresh; the
        first file in name order wins, as in libcni). Files that are not JSON objects are
        skipped (they may belong to another runtime); a matching one that is invalid is a 422
        naming the file."""
        try:
            paths = sorted(p for p in self.conf_dir.iterdir() if p.suffix in CONF_SUFFIXES)
        except FileNotFoundError:
            paths = []
        except OSError as error:
            raise HostError(f"cannot read CNI conf dir {self.conf_dir}: {error.strerror}") from None
        for path in paths:
            try:
                data = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("name") == name:
                try:
                    return parse_conflist(data, loc="-")
                except InvalidError as error:
                    raise InvalidError.at(loc, f"conflist {path}: {error.message}") from None
        raise InvalidError.at(
            loc,
            f"no CNI conflist named {name!r} in {self.conf_dir}; add one there (or give "
            "roost serve --cni-conf-dir) or create a roost network with an inline conflist",
        )

    def attachment(
        self,
        *,
        container_id: str,
        netns: str,
        ifname: str,
        network: str | None = None,
        conflist: Conflist | None = None,
        args: dict[str, str] | None = None,
        capability_args: dict[str, Any] | None = None,
        loc: str = "cni.network",
    ) -> Attachment:
        """An attachment to the inline `conflist`, else to the conf dir's conflist named
        `network`, for the namespace file `netns`; `loc` is where the VM's config names the
        network (a 422's field)."""
        if conflist is None:
            if network is None:
                raise InvalidError.at(loc, "is required: name a CNI network")
            conflist = self.find(network, loc)
        try:
            check_container_id(container_id)
        except ValueError as error:
            raise HostError(str(error)) from None
        cni_args(args or {})
        return Attachment(
            conflist=conflist,
            container_id=container_id,
            netns=netns,
            ifname=ifname,
            args=dict(args or {}),
            capability_args=dict(capability_args or {}),
        )

    def add(self, attachment: Attachment) -> CniResult:
        """ADD through the list in order, each plugin given the previous one's result; on a
        failure the plugins already run (and the failing one) get DEL in reverse: when that
        undo succeeds the error is an `AddUndoneError` (the attachment holds nothing, so its
        record may go), else a HostError saying what the undo could not do too."""
        previous: dict[str, Any] | None = None
        ran = 0
        plugins = attachment.conflist.plugins
        try:
            for ran, _ in enumerate(plugins, start=1):
                previous = self._call("ADD", attachment, ran - 1, previous)
        except HostError as error:
            missing = isinstance(error, MissingPluginError)
            undo = self._delete(attachment, previous, plugins_run=ran - 1 if missing else ran)
            if undo:
                raise HostError(
                    f"{error.message}; undoing it failed too: {'; '.join(undo)}"
                ) from None
            raise AddUndoneError(error.message) from None
        assert previous is not None
        try:
            return parse_result(previous)
        except ValueError as error:
            message = (
                f"CNI network {attachment.conflist.name!r} answered ADD with a result roost "
                f"cannot read: {error}"
            )
            undo = self._delete(attachment, None, plugins_run=len(plugins))
            if undo:
                raise HostError(f"{message}; undoing it failed too: {'; '.join(undo)}") from None
            raise AddUndoneError(message) from None

    def delete(self, attachment: Attachment, result: CniResult | None) -> None:
        """DEL through the list in reverse with the cached `result` (None when ADD never
        finished); safe to repeat, and with the VM's namespace already gone."""
        failures = self._delete(attachment, _raw(result), len(attachment.conflist.plugins))
        if failures:
            raise HostError("; ".join(failures))

    def check(self, attachment: Attachment, result: CniResult) -> None:
        """CHECK through the list in order with the cached `result`; HostError with the
        plugin's message when one finds the attachment broken. A list with `disableCheck`,
        or older than CNI 0.4.0 (which has no CHECK), is not checked."""
        conflist = attachment.conflist
        if conflist.disable_check or conflist.cni_version not in CHECK_SINCE:
            return
        for index in range(len(conflist.plugins)):
            self._call("CHECK", attachment, index, _raw(result))

    def _delete(
        self, attachment: Attachment, result: dict[str, Any] | None, plugins_run: int
    ) -> list[str]:
        failures = []
        for index in reversed(range(plugins_run)):
            try:
                self._call("DEL", attachment, index, result)
            except HostError as error:
                failures.append(error.message)
        return failures

    def _binary(self, plugin_type: str, network: str) -> Path:
        for directory in self.bin_dirs:
            path = directory / plugin_type
            if os.access(path, os.X_OK) and path.is_file():
                return path
        raise MissingPluginError(
            f"CNI plugin {plugin_type!r} of network {network!r} is not in "
            f"{', '.join(map(str, self.bin_dirs))}; install it or name its directory with "
            "roost serve --cni-bin-dir"
        )

    def _call(
        self,
        command: str,
        attachment: Attachment,
        index: int,
        previous: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Run plugin `index` for `command`; its result (ADD) or `previous` (DEL, CHECK)."""
        conflist = attachment.conflist
        plugin = conflist.plugins[index]
        binary = self._binary(plugin.type, conflist.name)
        config = plugin.fields()
        config["name"] = conflist.name
        config["cniVersion"] = conflist.cni_version
        if previous is not None:
            config["prevResult"] = previous
        runtime_config = {
            key: attachment.capability_args[key]
            for key, wanted in plugin.capabilities.items()
            if wanted and key in attachment.capability_args
        }
        if runtime_config:
            config["runtimeConfig"] = runtime_config
        env = {
            "PATH": os.environ.get("PATH", DEFAULT_PATH),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": attachment.container_id,
            "CNI_NETNS": attachment.netns,
            "CNI_IFNAME": attachment.ifname,
            "CNI_PATH": os.pathsep.join(map(str, self.bin_dirs)),
        }
        if attachment.args:
            env["CNI_ARGS"] = cni_args(attachment.args)
        what = f"CNI plugin {plugin.type!r} ({command} on network {conflist.name!r})"
        output, errors, status = self._run(binary, env, json.dumps(config).encode(), what)
        if status != 0:
            raise HostError(f"{what} failed: {_failure(output, errors, status)}")
        if command != "ADD":
            return previous or {}
        try:
            answer = json.loads(output)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise HostError(f"{what} printed no JSON result: {_tail(output or errors)!r}")
        return answer

    def _run(
        self, binary: Path, env: dict[str, str], stdin: bytes, what: str
    ) -> tuple[bytes, bytes, int]:
        process = self._worker.spawn(
            [str(binary)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own group: a hung plugin goes with what it started
        )
        try:
            output, errors = process.communicate(stdin, timeout=self._timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise HostError(
                f"{what} did not finish within {self._timeout:g} s and was killed"
            ) from None
        return output, errors, process.returncode


class MissingPluginError(HostError):
    """A conflist names a plugin no bin dir has."""


class AddUndoneError(HostError):
    """ADD failed and DEL undid every plugin it ran: the attachment holds nothing."""


def _raw(result: CniResult | None) -> dict[str, Any] | None:
    return None if result is None else result.to_json()


def _tail(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return text[-STDERR_TAIL:]


def _failure(output: bytes, errors: bytes, status: int) -> str:
    """A failed plugin's own words: its error object, else its stderr, else its status."""
    try:
        error = parse_error(json.loads(output))
    except ValueError:
        error = None
    if error is not None:
        return error.text()
    text = _tail(errors) or _tail(output)
    return f"{text} (exit status {status})" if text else f"exit status {status}"


def vm_namespace(vm_name: str) -> str:
    """The name of the network namespace a cni VM runs in."""
    return f"{VM_NAMESPACE_PREFIX}{vm_name}"


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _share_netns_dir() -> None:
    """/run/netns as a shared mount, as `ip netns add` makes it, so a namespace mounted there
    is seen from every mount namespace (a jailer's too)."""
    directory = str(NETNS_DIR).encode()
    if _LIBC.mount(b"none", directory, None, MS_SHARED | MS_REC, None) == 0:
        return
    _check(_LIBC.mount(directory, directory, b"none", MS_BIND | MS_REC, None), "bind /run/netns")
    _check(_LIBC.mount(b"none", directory, None, MS_SHARED | MS_REC, None), "share /run/netns")


def _on_fresh_thread(work: Callable[[], None]) -> None:
    """Run `work` on a thread of its own (which it may leave in another namespace)."""
    failure: list[BaseException] = []

    def body() -> None:
        try:
            work()
        except BaseException as error:  # handed to the caller
            failure.append(error)

    thread = threading.Thread(target=body, name="roost-netns-create")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


class NamespaceExistsError(HostError):
    """The namespace to create is there already: whoever made it owns it."""


def create_namespace(name: str) -> Path:
    """The network namespace `name`, made as `ip netns add` makes it (a bind mount under
    /run/netns); its path. /run/netns is the host's, shared by every daemon: a name that is
    there already (a namespace, or a file a crash left) is a `NamespaceExistsError`, decided
    by an exclusive create, so of two daemons making one name only one gets it."""
    path = netns_path(name)

    def unshare_and_mount() -> None:
        _check(_LIBC.unshare(CLONE_NEWNET), "unshare")
        _check(
            _LIBC.mount(b"/proc/thread-self/ns/net", str(path).encode(), b"none", MS_BIND, None),
            f"mount {path}",
        )

    try:
        NETNS_DIR.mkdir(exist_ok=True)
        _share_netns_dir()
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    except FileExistsError:
        raise NamespaceExistsError(f"network namespace {name} exists already") from None
    except OSError as error:
        raise HostError(f"cannot create network namespace {name}: {error.strerror}") from None
    try:
        _on_fresh_thread(unshare_and_mount)
    except OSError as error:
        with contextlib.suppress(OSError):
            path.unlink()
        raise HostError(f"cannot create network namespace {name}: {error.strerror}") from None
    return path


def delete_namespace(name: str) -> bool:
    """Remove the namespace `name` (unmount, unlink) if it exists; True when it did. Links
    inside go with it once no process holds it."""
    path = netns_path(name)
    if not path.exists():
        return False
    if _LIBC.umount2(str(path).encode(), MNT_DETACH) != 0:
        error = ctypes.get_errno()
        if error != errno.EINVAL:  # EINVAL: a plain file left by a crash, not mounted
            raise HostError(f"cannot unmount network namespace {name}: {os.strerror(error)}")
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as error:
        raise HostError(f"cannot remove network namespace {name}: {error.strerror}") from None
    return True
