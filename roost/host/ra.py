"""Router advertisements on the managed bridges that have an IPv6 prefix, so guests configure
themselves by SLAAC (no DHCPv6, no guest agent).

One dnsmasq per bridge, in RA-only mode (no DNS, DHCPv4 or DHCPv6), started inside the daemon's
namespace in a session of its own. Its files live in `<run>/ra/`: `<bridge>.conf` (everything it
is told, so its command line names only that file), `<bridge>.pid` and `<bridge>.log`. They
outlive the daemon, as the VMs do: a restarted daemon adopts a dnsmasq whose pid file names a
process whose command line names that config, and never signals a PID without that check (a
reused PID is someone else's). The bridge gets `<prefix>::1/64` (no duplicate address detection:
the router's address must be usable at once). IPv6 forwarding is left as it is: dnsmasq
advertises the bridge as a default router without it, and turning it on for the whole
namespace would make the host's own interfaces ignore their routers' advertisements.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from roost.errors import HostError
from roost.host.netns import NetnsWorker
from roost.plan.ipv6 import router_address

log = logging.getLogger(__name__)
DNSMASQ = "dnsmasq"
IFA_F_NODAD = 0x02
START_TIMEOUT = 10.0  # for dnsmasq to write its pid file (it does once it is set up)
STOP_TIMEOUT = 5.0  # for it to end on SIGTERM before it gets SIGKILL
_RANGE = re.compile(r"^dhcp-range=([0-9a-fA-F:]+),ra-only,64$", re.MULTILINE)


def dnsmasq_config(bridge: str, prefix: ipaddress.IPv6Network, pid_file: Path) -> str:
    """What dnsmasq is told: advertise `prefix` on `bridge` only, serve nothing else."""
    return "".join(
        f"{line}\n"
        for line in (
            "port=0",  # no DNS
            f"interface={bridge}",
            "bind-interfaces",
            "enable-ra",
            f"dhcp-range={prefix.network_address},ra-only,64",
            "quiet-ra",  # no log line per advertisement
            "log-facility=-",
            f"pid-file={pid_file}",
        )
    )


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _end(pid: int, child: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it lingers; reaped here when it is this daemon's `child`, else
    waited for until its parent (init, or whoever inherited an earlier daemon's) reaps it."""
    for sent in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sent)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(STOP_TIMEOUT)
                return
            continue
        deadline = time.monotonic() + STOP_TIMEOUT
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        else:
            return
    raise HostError(f"dnsmasq (pid {pid}) did not end on SIGKILL")


class RouterAdverts:
    """The dnsmasq of each managed bridge with an IPv6 prefix (bridge → prefix)."""

    def __init__(self, worker: NetnsWorker, run_dir: Path) -> None:
        self._worker = worker
        self.dir = run_dir / "ra"
        self._lock = threading.Lock()
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # those this daemon started
        self._ipr: IPRoute | None = None

    def close(self) -> None:
        """Let go of the netlink socket; the dnsmasqs keep running (a next daemon adopts
        them)."""
        if self._ipr is not None:
            self._worker.run(self._ipr.close)
            self._ipr = None

    def _files(self, bridge: str) -> tuple[Path, Path, Path]:
        return (self.dir / f"{bridge}.conf", self.dir / f"{bridge}.pid", self.dir / f"{bridge}.log")

    def running(self) -> dict[str, ipaddress.IPv6Network]:
        """The bridges with a live dnsmasq of roost's, and the prefix each advertises."""
        with self._lock:
            return {
                bridge: prefix
                for bridge in self._configured()
                if (prefix := self._prefix_of(bridge)) is not None and self._pid(bridge)
            }

    def start(self, bridge: str, prefix: ipaddress.IPv6Network) -> None:
        """Advertise `prefix` on `bridge` (which must exist): its router address added, a
        dnsmasq started unless one of roost's already advertises that prefix there (one that
        advertises another is replaced)."""
        with self._lock:
            self._start(bridge, prefix)

    def stop(self, bridge: str) -> None:
        """End the bridge's dnsmasq (by PID, once it is known to be roost's), wait for its end,
        remove its files and the router address it advertised, if the bridge is still there."""
        with self._lock:
            self._stop(bridge)

    def reconcile(self, wanted: Mapping[str, ipaddress.IPv6Network]) -> None:
        """Exactly one dnsmasq per bridge of `wanted` (bridge → prefix): those of bridges no
        longer wanted end, missing or dead ones (re)start, running ones are adopted. A bridge
        that fails does not keep the others from being made right; then one error names
        every failure."""
        failures = []
        with self._lock:
            for bridge in sorted(self._configured() - set(wanted)):
                try:
                    self._stop(bridge)
                except HostError as error:
                    failures.append(str(error))
            for bridge, prefix in sorted(wanted.items()):
                try:
                    self._start(bridge, prefix)
                except HostError as error:
                    failures.append(str(error))
        if failures:
            raise HostError("; ".join(failures))

    def _configured(self) -> set[str]:
        try:
            return {path.stem for path in self.dir.glob("*.conf")}
        except OSError:
            return set()

    def _prefix_of(self, bridge: str) -> ipaddress.IPv6Network | None:
        """The prefix the bridge's config file advertises (None without a readable one)."""
        conf, _, _ = self._files(bridge)
        try:
            found = _RANGE.search(conf.read_text())
        except OSError:
            return None
        if found is None:
            return None
        with contextlib.suppress(ValueError):
            return ipaddress.IPv6Network(f"{found[1]}/64")
        return None

    def _pid(self, bridge: str) -> int | None:
        """The PID of the bridge's dnsmasq when it runs and is roost's: its pid file names a
        live process whose command line names the bridge's config file."""
        conf, pid_file, _ = self._files(bridge)
        child = self._children.get(bridge)
        if child is not None and child.poll() is not None:
            del self._children[bridge]  # ended on its own: reaped now
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        if f"--conf-file={conf}\0".encode() not in cmdline or not _pid_alive(pid):
            return None
        return pid

    def _start(self, bridge: str, prefix: ipaddress.IPv6Network) -> None:
        if prefix.prefixlen != 64:
            raise HostError(f"cannot advertise {prefix} on {bridge}: SLAAC needs a /64")
        if self._prefix_of(bridge) == prefix and self._pid(bridge) is not None:
            self._add_router_address(bridge, prefix)  # gone with a bridge made again
            return
        self._stop(bridge)
        self._add_router_address(bridge, prefix)
        conf, pid_file, log_file = self._files(bridge)
        self.dir.mkdir(parents=True, exist_ok=True)
        conf.write_text(dnsmasq_config(bridge, prefix, pid_file))
        try:
            with log_file.open("ab") as output:
                child = self._worker.spawn(
                    [DNSMASQ, "--keep-in-foreground", f"--conf-file={conf}"],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # it outlives the daemon, as the VMs do
                )
        except HostError as error:
            self._stop(bridge)
            raise HostError(
                f"{error}; IPv6 prefixes need dnsmasq for their router advertisements "
                "(Debian: apt-get install dnsmasq-base)"
            ) from None
        self._children[bridge] = child
        deadline = time.monotonic() + START_TIMEOUT
        while self._pid(bridge) != child.pid:
            if child.poll() is not None or time.monotonic() > deadline:
                said = log_file.read_text(errors="replace").strip().splitlines()[-3:]
                self._stop(bridge)
                raise HostError(
                    f"dnsmasq could not advertise {prefix} on {bridge}: "
                    f"{' / '.join(said) or 'it said nothing'}"
                )
            time.sleep(0.02)
        log.info("advertising %s on %s (dnsmasq, pid %d)", prefix, bridge, child.pid)

    def _stop(self, bridge: str) -> None:
        prefix = self._prefix_of(bridge)
        pid = self._pid(bridge)
        child = self._children.pop(bridge, None)
        if pid is not None:
            _end(pid, child)
        elif child is not None:  # started, yet never said its PID: roost's all the same
            _end(child.pid, child)
        for path in self._files(bridge):
            path.unlink(missing_ok=True)
        if prefix is not None:
            self._remove_router_address(bridge, prefix)

    def _netlink(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = self._worker.run(IPRoute)
        return self._ipr

    def _add_router_address(self, bridge: str, prefix: ipaddress.IPv6Network) -> None:
        """`<prefix>::1/64` on the bridge, with IPv6 enabled on it (roost owns the bridge)."""
        ipr = self._netlink()
        router = str(router_address(prefix))

        def work() -> None:
            found = ipr.link_lookup(ifname=bridge)
            if not found:
                raise HostError(f"bridge {bridge} does not exist; cannot advertise {prefix} on it")
            disabled = Path("/proc/sys/net/ipv6/conf", bridge, "disable_ipv6")
            try:
                if disabled.read_text().strip() != "0":
                    disabled.write_text("0")
            except OSError as error:
                raise HostError(
                    f"cannot enable IPv6 on {bridge}: {error.strerror} (is IPv6 disabled in "
                    "this kernel, ipv6.disable=1?)"
                ) from None
            try:
                ipr.addr(
                    "add",
                    index=found[0],
                    address=router,
                    prefixlen=64,
                    family=socket.AF_INET6,
                    IFA_FLAGS=IFA_F_NODAD,
                )
            except NetlinkError as error:
                if error.code != errno.EEXIST:
                    raise HostError(f"cannot add {router}/64 to {bridge}: {error}") from None

        self._worker.run(work)

    def _remove_router_address(self, bridge: str, prefix: ipaddress.IPv6Network) -> None:
        ipr = self._netlink()

        def work() -> None:
            found = ipr.link_lookup(ifname=bridge)
            if found:
                with contextlib.suppress(NetlinkError):
                    ipr.addr(
                        "del",
                        index=found[0],
                        address=str(router_address(prefix)),
                        prefixlen=64,
                        family=socket.AF_INET6,
                    )

        self._worker.run(work)
