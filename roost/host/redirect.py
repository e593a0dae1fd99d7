"""A tap joined to a CNI result's interface by tc redirects, inside the VM's namespace.

What `tc-redirect-tap` does for firecracker-go-sdk, done by roost with netlink: an ingress
qdisc on the veth end a plugin put in the namespace and on a tap beside it, each with a u32
filter matching every frame and a mirred action redirecting it out of the other. The guest
then owns the veth's link: it must use the veth's MAC (and the result's addresses), and the
tap takes the veth's MTU. This kernel has u32 and mirred built in but neither flower nor
matchall (measured: "TC classifier not found"), hence u32 with an empty key.

Every call runs on a thread inside the VM's namespace (a `NetnsWorker` for the call), so the
tap's ioctls and the netlink socket act there.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from roost.errors import HostError
from roost.host.links import add_tap
from roost.host.netns import NetnsWorker, netns_path

IFNAMSIZ = 15
INGRESS_PARENT = 0xFFFF0000  # ffff:, the ingress qdisc's handle
ETH_P_ALL = 0x0003
TCA_EGRESS_REDIR = 1  # mirred's eaction for "egress redirect"
FILTER_PRIORITY = 1
MATCH_ALL = ["0x0/0x0+0"]  # u32: one key, offset 0, mask 0
T = TypeVar("T")


@dataclass(frozen=True)
class Redirect:
    """A made redirect: the guest must use `mac` (the veth's), the tap has `mtu`."""

    netns: str
    interface: str
    tap: str
    mac: str
    mtu: int


@contextmanager
def _namespace(netns: str) -> Iterator[Callable[[Callable[[IPRoute], T]], T]]:
    """A runner for work inside `netns`, each call given a netlink socket opened there."""
    worker = NetnsWorker(netns)
    try:
        ipr: IPRoute = worker.run(IPRoute)
        try:
            yield lambda work: worker.run(work, ipr)
        finally:
            worker.run(ipr.close)
    finally:
        worker.close()


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _redirect(ipr: IPRoute, source: int, target: int) -> None:
    """Every frame arriving on `source` leaves through `target`."""
    ipr.tc("add", "ingress", source, "ffff:")
    ipr.tc(
        "add-filter",
        "u32",
        source,
        parent=INGRESS_PARENT,
        protocol=ETH_P_ALL,
        prio=FILTER_PRIORITY,
        keys=MATCH_ALL,
        target=0x10000,
        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target},
    )


def connect(netns: str, interface: str, tap: str, owner: tuple[int, int] | None = None) -> Redirect:
    """Make tap `tap` in `netns` and redirect all traffic between it and `interface` (the
    CNI result's interface there) both ways. A stale tap or redirect of the same names (a
    crash) is replaced; on failure nothing of it stays."""
    if len(tap.encode()) > IFNAMSIZ:
        raise HostError(f"tap name {tap!r} is longer than {IFNAMSIZ} bytes")
    if not netns_path(netns).exists():
        raise HostError(f"network namespace {netns} does not exist; run the CNI ADD in it first")

    def work(ipr: IPRoute) -> Redirect:
        _remove(ipr, interface, tap)
        veth = _index(ipr, interface)
        if veth is None:
            raise HostError(f"the CNI result's interface {interface} is not in {netns}")
        link = ipr.get_links(veth)[0]
        mac, mtu = link.get_attr("IFLA_ADDRESS"), link.get_attr("IFLA_MTU")
        add_tap(tap, owner)
        tap_index = _index(ipr, tap)
        assert tap_index is not None
        ipr.link("set", index=tap_index, mtu=mtu, state="up")
        _redirect(ipr, veth, tap_index)
        _redirect(ipr, tap_index, veth)
        return Redirect(netns=netns, interface=interface, tap=tap, mac=mac, mtu=mtu)

    what = f"connect tap {tap} to {interface} in {netns}"
    with _namespace(netns) as run:
        try:
            return run(work)
        except (NetlinkError, OSError, HostError) as error:
            run(lambda ipr: _remove(ipr, interface, tap))
            if isinstance(error, HostError):
                raise
            raise HostError(f"cannot {what}: {_reason(error)}") from None


def disconnect(netns: str, interface: str, tap: str) -> None:
    """Remove the tap and the veth's ingress qdisc (its filter goes with it); nothing to do
    when the namespace is gone."""
    if not netns_path(netns).exists():
        return
    with _namespace(netns) as run:
        try:
            run(lambda ipr: _remove(ipr, interface, tap))
        except (NetlinkError, OSError) as error:
            raise HostError(
                f"cannot disconnect tap {tap} from {interface} in {netns}: {_reason(error)}"
            ) from None


def _remove(ipr: IPRoute, interface: str, tap: str) -> None:
    tap_index = _index(ipr, tap)
    if tap_index is not None:
        _ignore_gone(lambda: ipr.link("del", index=tap_index))
    veth = _index(ipr, interface)
    if veth is not None:
        _ignore_gone(lambda: ipr.tc("del", "ingress", veth, "ffff:"))


def _ignore_gone(work: Callable[[], Any]) -> None:
    try:
        work()
    except NetlinkError as error:
        # ENODEV: the link went meanwhile; EINVAL/ENOENT: it had no ingress qdisc
        if error.code not in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
            raise


def check(netns: str, interface: str, tap: str) -> list[str]:
    """What is wrong with the redirect between `interface` and `tap` in `netns` (empty when
    it is whole): each message says what is missing and that a restart rebuilds it."""
    if not netns_path(netns).exists():
        return [f"network namespace {netns} is gone; restart the VM to rebuild it"]

    def work(ipr: IPRoute) -> list[str]:
        indexes = {name: _index(ipr, name) for name in (interface, tap)}
        problems = [
            f"link {name} is missing in {netns}" for name, index in indexes.items() if index is None
        ]
        if problems:
            return problems
        veth, tap_index = indexes[interface], indexes[tap]
        assert veth is not None and tap_index is not None
        if not ipr.get_links(tap_index)[0]["flags"] & 1:
            problems.append(f"tap {tap} in {netns} is down")
        for source, target, source_name, target_name in (
            (veth, tap_index, interface, tap),
            (tap_index, veth, tap, interface),
        ):
            if target not in _redirect_targets(ipr, source):
                problems.append(
                    f"no tc filter redirects frames from {source_name} to {target_name} in "
                    f"{netns}: the guest's traffic is cut that way"
                )
        return problems

    with _namespace(netns) as run:
        try:
            problems = run(work)
        except (NetlinkError, OSError) as error:
            raise HostError(f"cannot check tap {tap} in {netns}: {_reason(error)}") from None
    if problems:
        problems.append("restart the VM to rebuild its redirect")
    return problems


def _redirect_targets(ipr: IPRoute, index: int) -> set[int]:
    """The ifindexes the ingress filters of link `index` redirect to (mirred, egress)."""
    try:
        filters = ipr.get_filters(index=index, parent=INGRESS_PARENT)
    except NetlinkError as error:
        if error.code in (errno.EINVAL, errno.ENOENT):  # no ingress qdisc
            return set()
        raise
    targets = set()
    for message in filters:
        options = message.get_attr("TCA_OPTIONS")
        actions = options.get_attr("TCA_U32_ACT") if options is not None else None
        if actions is None:
            continue
        for _, action in actions["attrs"]:
            if action.get_attr("TCA_ACT_KIND") != "mirred":
                continue
            parms = action.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
            if parms["eaction"] == TCA_EGRESS_REDIR:
                targets.add(parms["ifindex"])
    return targets


def _reason(error: BaseException) -> str:
    if isinstance(error, NetlinkError):
        return str(error.args[-1]) if error.args else str(error)
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)
