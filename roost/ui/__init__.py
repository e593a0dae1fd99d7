"""The web view's pages and static files (issue 16), served by `roost.api.ui` on the daemon's
`/ui/` and by `roost ui`.

A page is a fragment in `pages/` put into `pages/layout.html`, with the API base the scripts
call (`data-api`) and the mount its links are relative to (`data-base`, `<base href>`) filled
in by plain substitution: the pages hold no data, the scripts fetch it, so there is nothing to
template and no dependency to add. Everything else is in `static/`, served as it is.
"""

from __future__ import annotations

import re
from functools import cache
from html import escape
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
PAGES_DIR = HERE / "pages"

# page name -> its title in the tab and the nav
TITLES = {
    "index": "VMs",
    "vm": "VM",
    "map": "Network map",
    "networks": "Networks",
    "plugins": "Plugins",
    "hosts": "Hosts",
    "events": "Events",
    "login": "Log in",
}
PAGES = frozenset(TITLES)
# the pages whose path is their name (`vms/<name>` and the index are the others)
_NAMED = PAGES - {"index", "vm"}
_VM_PATH = re.compile(r"vms/[^/]+")


def page_for(path: str) -> str | None:
    """The page a request path shows, relative to the mount (no leading slash): `""` is the VM
    table, `vms/<name>` a VM; None for a path that is no page (answer 404)."""
    if path in ("", "index.html"):
        return "index"
    if path in _NAMED:
        return path
    if _VM_PATH.fullmatch(path):
        return "vm"
    return None


def render(page: str, *, api_base: str, base_href: str) -> str:
    """The whole HTML of `page`: its scripts call `api_base + "/v1/..."` ("" on the daemon,
    "/api" under `roost ui`) and its links resolve against `base_href` ("/ui/" or "/").
    KeyError for a page that does not exist."""
    title = TITLES[page]
    values = {
        "@API@": escape(api_base, quote=True),
        "@BASE@": escape(base_href, quote=True),
        "@PAGE@": page,
        "@TITLE@": escape(title),
        "@MAIN@": _fragment(page),
    }
    return re.sub("|".join(values), lambda match: values[match.group(0)], _layout())


@cache
def _layout() -> str:
    return (PAGES_DIR / "layout.html").read_text(encoding="utf-8")


@cache
def _fragment(page: str) -> str:
    return (PAGES_DIR / f"{page}.html").read_text(encoding="utf-8")
