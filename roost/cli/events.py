"""`roost events`: follow what happens to VMs, plugins and networks as the daemon tells it
(`GET /v1/events`), across reconnects: a stream that ends (the daemon stopped, the connection
broke) is opened again with the last event's id, so the daemon sends what was missed, or says
`overflow` when it cannot."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Annotated, Any

import typer

from roost.cli.apps import app
from roost.cli.client import Client
from roost.cli.output import err
from roost.cli.reach import daemon
from roost.errors import RoostError, UnreachableError
from roost.names import check_name

RECONNECT_DELAY = 1.0  # seconds between attempts to reach a daemon that went away
LOST = (UnreachableError.code, "timeout")  # the errors of a daemon gone, not of a request


@app.command("events")
def events(
    vm: Annotated[
        str | None, typer.Option("--vm", metavar="NAME", help="Only this VM's events.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each event's JSON object on one line.")
    ] = False,
) -> None:
    """Follow the daemon's events until Ctrl-C (in a cluster, every host's): VMs created,
    changing status or config and removed; plugins installed and removed; networks created
    and removed; hosts joining, offline, fenced and cordoned."""
    try:
        with daemon(as_json) as client:
            _follow(client, None if vm is None else check_name(vm, "vm"), as_json)
    except KeyboardInterrupt:
        pass  # how one stops following: not an error


def _follow(client: Client, vm: str | None, as_json: bool) -> None:
    """Print events as they come, forever. A daemon never reached is an error; one that goes
    away once reached is waited for (the stream opens with a block of its own, so a client
    knows at once that it follows)."""
    last_id: str | None = None
    followed = False  # whether a stream ever opened
    lost = False  # whether the daemon went away and has not answered since
    while True:
        headers = None if last_id is None else {"last-event-id": last_id}
        try:
            for kind, event_id, data in _sse(
                client.text_stream("/v1/events", headers=headers, vm=vm)
            ):
                followed, lost = True, False
                if kind is not None:  # else a block without an event: a heartbeat
                    last_id = event_id or last_id
                    _print(json.loads(data), as_json)
        except RoostError as error:
            if not followed or error.code not in LOST:
                raise
            if not lost:
                err.print(f"lost the daemon ({error.message}); reconnecting", markup=False)
        else:
            if not lost:
                err.print("the daemon ended the stream; reconnecting", markup=False)
        lost = True
        time.sleep(RECONNECT_DELAY)


def _sse(chunks: Iterable[bytes]) -> Iterator[tuple[str | None, str | None, str]]:
    """The blocks of a Server-Sent Events stream as (event type, id, data); a block of only
    comments (a heartbeat) as (None, None, "")."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            kind: str | None = None
            event_id: str | None = None
            data: list[str] = []
            for line in block.decode().split("\n"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    kind = value
                elif name == "id":
                    event_id = value
                elif name == "data":
                    data.append(value)
            yield (kind or "message") if data else None, event_id, "\n".join(data)


def _print(data: dict[str, Any], as_json: bool) -> None:
    sys.stdout.write((json.dumps(data) if as_json else _human(data)) + "\n")
    sys.stdout.flush()


def _human(data: dict[str, Any]) -> str:
    """`12:00:01 vm.status web-1 running`: local time, type, subject, what changed."""
    clock = datetime.fromisoformat(data["time"]).astimezone().strftime("%H:%M:%S")
    kind = data["type"]
    if kind == "overflow":
        return (
            f"{clock} overflow: events after id {data['after']} are lost; resuming at id "
            f"{data['resumes_at']}"
        )
    subject = (
        data.get("vm") or data.get("plugin") or data.get("network") or data.get("policy") or "-"
    )
    detail = ""
    if kind == "vm.status":
        reason = data.get("status_reason")
        detail = data["status"] + (f": {reason}" if reason else "")
    elif kind == "vm.created":
        detail = f"plugin {data['plugin']}"
    elif kind in ("vm.config", "plugin.installed"):
        detail = f"version {data['version']}"
    return " ".join(part for part in (clock, kind, subject, detail) if part)
