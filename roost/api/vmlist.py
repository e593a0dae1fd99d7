"""`GET /v1/vms`: the VMs in name order, narrowed by plugin, status, label, network mode and host
(a cluster's), whole or a page at a time, whole VMs or (`?fields=name`) their names alone.

A page ends after a name and the next begins after it (`?after=NAME`), so a client paging while
VMs come and go sees every VM that exists throughout exactly once: names are unique and each page
starts past the last one seen.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from starlette.datastructures import QueryParams

from roost.engine.core import Engine
from roost.engine.views import UNKNOWN, encoded, json_array
from roost.errors import ErrorDetail, InvalidError
from roost.spec.common import check_name, label_selector
from roost.spec.network import NetworkMode
from roost.state.vms import VMQuery, VMStatus

MAX_PAGE = 10_000
# the filters and bounds given once at most (status and label may be repeated)
_SINGLE = ("plugin", "mode", "host", "limit", "after", "fields")
# what `fields` may ask for instead of whole VMs
_FIELDS = ("name",)

Read = Callable[..., Awaitable[Any]]


def add_vm_list_route(app: FastAPI, engine: Engine, read: Read) -> None:
    @app.get("/v1/vms")
    async def list_vms(
        request: Request,
        plugin: str | None = Query(None, description="only VMs of this plugin"),
        status: list[str] = Query(
            [], description="only VMs in one of these statuses (repeatable: any of them)"
        ),
        label: list[str] = Query(
            [], description="only VMs with this label, key=value (repeatable: all of them)"
        ),
        mode: str | None = Query(
            None,
            description="only VMs with an interface in this mode (vsock: with no interface)",
        ),
        host: str | None = Query(None, description="only VMs on this host (a cluster's)"),
        limit: int | None = Query(
            None, ge=1, le=MAX_PAGE, description="at most this many VMs (default: all)"
        ),
        after: str | None = Query(None, description="only VMs named after this, in name order"),
        fields: str | None = Query(
            None,
            description='name: each VM as {"name": ...} alone (default: whole VMs)',
        ),
    ) -> Response:
        query = vm_query(
            request.query_params, plugin, status, label, mode, limit, after, fields, host
        )
        # one more than asked says whether more remain
        asked = query if query.limit is None else replace(query, limit=query.limit + 1)
        if fields == "name":
            names = await read(engine.list_vm_names, asked)
            vms = [(name, encoded({"name": name})) for name in names]
        else:
            vms = await read(engine.list_vms_encoded, asked)
        headers = {}
        if query.limit is not None and len(vms) > query.limit:
            vms = vms[: query.limit]
            headers["link"] = f'<{next_page(request, vms[-1][0])}>; rel="next"'
        body = json_array([vm for _, vm in vms])
        return Response(body, headers=headers, media_type="application/json")


def vm_query(
    given: QueryParams,
    plugin: str | None,
    statuses: list[str],
    labels: list[str],
    mode: str | None,
    limit: int | None,
    after: str | None,
    fields: str | None = None,
    host: str | None = None,
) -> VMQuery:
    """The listing the query string asks for; every wrong parameter is a 422 at its
    `query.<name>`."""
    errors = [
        ErrorDetail(f"query.{name}", "is given more than once; give it at most once")
        for name in _SINGLE
        if len(given.getlist(name)) > 1
    ]
    # `unknown` is no stored status: it selects the VMs of offline hosts (a cluster's)
    known = [*(status.value for status in VMStatus), UNKNOWN]
    for text in statuses:
        if text not in known:
            errors.append(
                ErrorDetail("query.status", f"{text!r} is not a status: use {', '.join(known)}")
            )
    pairs = []
    for text in labels:
        try:
            pairs.append(label_selector(text))
        except ValueError as error:
            errors.append(ErrorDetail("query.label", str(error)))
    modes = [one.value for one in NetworkMode]
    if mode is not None and mode not in modes:
        errors.append(
            ErrorDetail("query.mode", f"{mode!r} is not a network mode: use {', '.join(modes)}")
        )
    if fields is not None and fields not in _FIELDS:
        errors.append(
            ErrorDetail(
                "query.fields", f"{fields!r} is not a field to list: use {', '.join(_FIELDS)}"
            )
        )
    for name, value in (("plugin", plugin), ("after", after), ("host", host)):
        if value is not None:
            try:
                check_name(value, f"query.{name}")
            except InvalidError as error:
                errors.extend(error.details)
    if errors:
        raise InvalidError.of(errors)
    return VMQuery(
        plugin=plugin,
        statuses=tuple(dict.fromkeys(VMStatus(text) for text in statuses if text != UNKNOWN)),
        unknown=UNKNOWN in statuses,
        labels=tuple(dict.fromkeys(pairs)),
        mode=None if mode is None else NetworkMode(mode),
        after=after,
        limit=limit,
        host=host,
    )


def next_page(request: Request, last: str) -> str:
    """The relative URL of the page after `last`: the same path and parameters, `after` it."""
    kept = [(key, value) for key, value in request.query_params.multi_items() if key != "after"]
    return f"{request.url.path}?{urlencode([*kept, ('after', last)])}"
