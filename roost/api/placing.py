"""Creates in a cluster: placement inside the API, and the router that sends a VM's requests to
its host.

A `POST /v1/vms` that a client sent to any agent is placed there: what the VM needs
(`roost.plan.needs`) against a snapshot of the hosts (`roost.plan.placement`), then tried on
each eligible host, best first: here (the engine reserves the capacity in the transaction that
records the VM), or on a peer, which gets the request forwarded with `host` set to itself and
creates it without placing it again. A host that refuses for want of room (409 `no_capacity`,
lost to a concurrent create) or fails (5xx, or unreachable: a boot that failed leaves nothing)
moves the create to the next one; any other answer, a contested address or name among them, is
the client's as the host gave it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope

from roost.api.peers import Forwarder, Peer, Router, forwarded_from
from roost.api.replies import error_response, on_unix_socket
from roost.engine.core import Engine
from roost.engine.networks import lookup_in
from roost.engine.settings import ClusterSettings
from roost.errors import InvalidError, RoostError
from roost.plan import plan_vm
from roost.plan.needs import need_of, uses_vsock
from roost.plan.placement import Candidate, Need, chosen
from roost.plan.registry import NetworkKind
from roost.spec import Manifest, VMConfig, load_json, parse
from roost.spec.common import check_name, label_selector
from roost.state import reservations
from roost.state.hosts import Hosts

log = logging.getLogger("roost.api")
# nginx's status for a request whose client went away before the answer (nobody reads it): not
# a refusal, so the create is not tried elsewhere
CLIENT_LEFT = 499


@dataclass(frozen=True)
class CreateRequest:
    """A create's body: the VM's `name`, whether to `start` it, its config, and in a cluster
    where it may go (`host`, `host_labels`); `body` is the JSON as the client sent it."""

    name: str
    start: bool
    config: VMConfig
    host: str | None = None
    host_labels: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=dict)

    def on(self, host: str) -> bytes:
        """The body that asks host `host` to create the VM there."""
        return json.dumps({**self.body, "host": host}).encode()


def create_request(body: Any, *, cluster: bool) -> CreateRequest:
    """A create's body parsed: `name`, `start`, and in a `cluster` `host` and `host_labels`
    (create-only, like `start`: none of them is stored with the config)."""
    if not isinstance(body, dict):
        raise InvalidError.at("-", "must be a JSON object")
    given = dict(body)
    name, start = body.pop("name", None), body.pop("start", True)
    host, labels = body.pop("host", None), body.pop("host_labels", None)
    if not isinstance(name, str):
        raise InvalidError.at("name", "is required: the VM's name")
    if not isinstance(start, bool):
        raise InvalidError.at("start", "must be true or false")
    for key, value in (("host", host), ("host_labels", labels)):
        if value is not None and not cluster:
            raise InvalidError.at(
                key, "this daemon is not in a cluster: it places every VM on its own host"
            )
    if host is not None and not isinstance(host, str):
        raise InvalidError.at("host", "must be a host's name (roost host list shows them)")
    check_name(name)
    return CreateRequest(
        name=name,
        start=start,
        config=parse(VMConfig, body),
        host=host,
        host_labels=_host_labels(labels),
        body=given,
    )


def _host_labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidError.at("host_labels", "must be an object of KEY: VALUE strings")
    labels = {}
    for key, text in value.items():
        try:
            found, wanted = label_selector(f"{key}={text}")
        except ValueError as error:
            raise InvalidError.at(f"host_labels.{key}", str(error)) from None
        labels[found] = wanted
    return labels


class ClusterRouter(Router):
    """Where a request for a VM goes: the VM's host, read from the database at each request
    (one lookup by name; hosts move VMs and come and go, so nothing is kept); None for this
    host's VMs and for names no VM has (answered here: 404). A create is placed by the route
    (`Placer`), which needs its body."""

    def __init__(self, hosts: Hosts, cluster: ClusterSettings, host_id: int) -> None:
        super().__init__(cluster.host_name)
        self.hosts = hosts
        self.cluster = cluster
        self.host_id = host_id

    def host_of(self, vm: str) -> Peer | None:
        found = self._found(vm)
        if found is None or found.id == self.host_id:
            return None
        return Peer(found.name, found.api, found.offline)

    def remover_of(self, vm: str) -> Peer | None:
        """A lost VM whose host is offline (it may never return) is removed here, record only
        (`Engine.destroy_vm`): its host would answer 503 `host_offline` for as long as it is
        away. Any other VM is removed by its host."""
        found = self._found(vm)
        if found is None or found.id == self.host_id or (found.lost and found.offline):
            return None
        return Peer(found.name, found.api, found.offline)

    def _found(self, vm: str) -> reservations.VMHost | None:
        with self.hosts.db.read() as session:
            return reservations.host_of(session.connection(), vm, self.cluster.offline_after)


def moves_on(status: int, body: bytes) -> bool:
    """Whether a host's answer to a create sends it to the next candidate: no room there now
    (409 `no_capacity`), or the host failed (5xx: unreachable, fenced, a boot that failed and
    was rolled back). A contested address or name (409 `ip_taken`, `exists`) and every
    refusal of the request itself are the client's answer."""
    if status >= 500:
        return True
    if status != 409:
        return False
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(code == "no_capacity")


Attempt = Callable[[Candidate], Awaitable[Response]]


async def first_taker(candidates: Sequence[Candidate], attempt: Attempt) -> Response:
    """Each candidate's answer in turn until one is not a refusal that `moves_on`; the last
    answer when all refuse."""
    assert candidates, "placement raises when no host is eligible"
    answer: Response | None = None
    for candidate in candidates:
        answer = await attempt(candidate)
        if not moves_on(answer.status_code, bytes(answer.body)):
            return answer
        log.info(
            "create: host %s refused it (HTTP %d), the next host is asked",
            candidate.name,
            answer.status_code,
        )
    assert answer is not None
    return answer


# creates the VM on this host; `unix_client`: the client came on the Unix socket (root)
Local = Callable[[CreateRequest, bool], Awaitable[dict[str, Any]]]


class Placer:
    """Places a create (`create`): `local` creates it on this host (on the operation gate),
    `read` runs a read on a thread, `forwarder` calls the peers."""

    def __init__(
        self,
        engine: Engine,
        router: ClusterRouter,
        forwarder: Forwarder,
        local: Local,
        read: Callable[..., Awaitable[Any]],
    ) -> None:
        self.engine = engine
        self.router = router
        self.hosts = router.hosts
        self.forwarder = forwarder
        self.local = local
        self.read = read

    def need(self, wanted: CreateRequest) -> Need:
        """What the VM asks of its host, from its plugin and config (404 for an unknown
        plugin, 422 for a config its plan refuses)."""
        allocator = self.engine.allocator
        with self.engine.db.read() as session:
            plugin = self.engine.records.plugin(session.connection(), wanted.config.plugin)
            manifest = Manifest.model_validate(plugin.manifest)
            # an external network is one host's: planned as any host's, placed where it is
            lookup = lookup_in(session, self.router.host_id, anywhere=True)
            plan = plan_vm(wanted.name, manifest, wanted.config, allocator.default, lookup)
            cni = {
                name
                for name in _cni_names(plan)
                if (found := lookup(name)) is not None and found.kind is NetworkKind.CNI
            }
        return need_of(
            plan,
            allocator.vmm_of(wanted.config),
            vsock=uses_vsock(plan, wanted.config.vsock_services),
            registered_cni=cni,
            host=wanted.host,
            labels=wanted.host_labels,
        )

    def candidates(self, wanted: CreateRequest) -> list[Candidate]:
        """The eligible hosts, best first (404 for an unknown `host`, 409 `no_capacity` or
        `no_eligible_host` when there are none)."""
        need = self.need(wanted)
        return chosen(self.hosts.candidates(need, self.router.cluster.offline_after), need)

    async def create(self, raw: bytes, scope: Scope, receive: Receive) -> Response:
        """The answer to a create whose body is `raw`: placed here unless a peer placed it."""
        wanted: CreateRequest = await self.read(
            lambda: create_request(load_json(raw), cluster=True)
        )
        unix_client = on_unix_socket(scope)
        origin = forwarded_from(scope)
        if origin is not None:  # placed by the agent it came from
            here = self.router.host_name
            if wanted.host not in (None, here):
                raise RoostError(
                    f"host {origin} sent a create for host {wanted.host} here ({here}); "
                    "try again (the hosts' records may have just changed)",
                    code="misdirected",
                )
            # any client can send the header: this host must be one placement would take
            await self.read(self.candidates, replace(wanted, host=here))
            return JSONResponse(await self.local(wanted, unix_client), status_code=201)
        candidates = await self.read(self.candidates, wanted)

        async def attempt(candidate: Candidate) -> Response:
            if candidate.host_id == self.router.host_id:
                try:
                    return JSONResponse(await self.local(wanted, unix_client), status_code=201)
                except RoostError as error:
                    return error_response(error)
            peer = Peer(candidate.name, candidate.api)
            body = wanted.on(candidate.name)
            return await forward_create(self.forwarder, peer, body, scope, receive)

        return await first_taker(candidates, attempt)


def _cni_names(plan: Any) -> list[str]:
    return [
        interface.effective.cni.network
        for interface in plan.interfaces.interfaces
        if interface.effective.cni is not None
    ]


async def forward_create(
    forwarder: Forwarder, peer: Peer, body: bytes, scope: Scope, receive: Receive
) -> Response:
    """Send a create with `body` to `peer` as the client's request (its headers, the client's
    kind), and its whole answer back as a response; one that could not reach it is 502
    `host_error`, which moves the create on."""
    headers = [
        (name, value)
        for name, value in scope["headers"]
        if name.lower() not in (b"content-length", b"transfer-encoding")
    ]
    headers.append((b"content-length", str(len(body)).encode()))
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the client's disconnect, if it leaves

    status = CLIENT_LEFT  # unless the peer answers: the client left while the request was sent
    answer_headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def capture(message: Message) -> None:
        nonlocal status, answer_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await forwarder.http(peer, {**scope, "headers": headers}, replay, capture)
    except RoostError as error:
        return error_response(error)
    response = Response(b"".join(chunks), status_code=status)
    kept = [(k, v) for k, v in answer_headers if k.lower() != b"content-length"]
    response.raw_headers = [*kept, (b"content-length", str(len(response.body)).encode())]
    return response
