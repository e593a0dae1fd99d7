"""The web view's sessions and same-origin rules (roost.api.sessions), as Chromium and Firefox
send their requests: what a page's own reads, EventSource, navigations and changes carry, and
what a page of another origin (or a tool without a browser) does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from roost.api.sessions import (
    CSP,
    Sessions,
    clear_cookie,
    cookie,
    cross_origin_refusal,
    own_origin,
    set_cookie,
    with_security_headers,
)

ORIGIN = "https://roost.example:8443"


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", {"sec-fetch-site": "same-origin"}),  # fetch(), EventSource, module scripts
        ("GET", {"sec-fetch-site": "none"}),  # the address bar, a bookmark, a reload
        ("GET", {"origin": ORIGIN}),
        ("GET", {"referer": ORIGIN + "/ui/map"}),
        ("HEAD", {"sec-fetch-site": "Same-Origin"}),
        ("POST", {"origin": ORIGIN, "x-roost-ui": "1", "sec-fetch-site": "same-origin"}),
        ("PATCH", {"origin": ORIGIN.upper(), "x-roost-ui": "1"}),
        ("DELETE", {"origin": ORIGIN, "x-roost-ui": "1"}),
    ],
)
def test_the_view_s_own_requests_pass(method: str, headers: dict[str, str]) -> None:
    assert cross_origin_refusal(method, headers, ORIGIN) is None


@pytest.mark.parametrize(
    ("method", "headers", "why"),
    [
        ("GET", {}, "Sec-Fetch-Site"),
        ("GET", {"sec-fetch-site": "same-site"}, "Sec-Fetch-Site"),  # another port, a subdomain
        ("GET", {"sec-fetch-site": "cross-site"}, "Sec-Fetch-Site"),
        ("GET", {"origin": "https://evil.example"}, "evil.example"),
        ("GET", {"origin": "null", "sec-fetch-site": "same-origin"}, "'null'"),
        ("GET", {"referer": "https://roost.example:9443/"}, "Sec-Fetch-Site"),
        ("GET", {"referer": "https://user@roost.example:8443/"}, "Sec-Fetch-Site"),
        # the fetch metadata of a page on another port outweighs a Referer
        ("GET", {"sec-fetch-site": "same-site", "referer": ORIGIN + "/ui/"}, "Sec-Fetch-Site"),
        ("POST", {"x-roost-ui": "1", "sec-fetch-site": "same-origin"}, "Origin"),
        ("POST", {"origin": ORIGIN}, "X-Roost-UI"),
        ("POST", {"origin": ORIGIN, "x-roost-ui": "yes"}, "X-Roost-UI"),
        ("DELETE", {"origin": "http://roost.example:8443", "x-roost-ui": "1"}, "http://"),
    ],
)
def test_requests_from_elsewhere_are_refused_saying_why(
    method: str, headers: dict[str, str], why: str
) -> None:
    refusal = cross_origin_refusal(method, headers, ORIGIN)
    assert refusal is not None and why in refusal


def test_a_form_the_view_posts_needs_its_origin_but_not_the_header() -> None:
    assert cross_origin_refusal("POST", {"origin": ORIGIN}, ORIGIN, ui_header=False) is None
    refusal = cross_origin_refusal("POST", {}, ORIGIN, ui_header=False)
    assert refusal is not None and "Origin" in refusal


@pytest.mark.parametrize(
    ("scheme", "host", "origin"),
    [
        ("https", "roost.example:8443", "https://roost.example:8443"),
        ("https", "Roost.Example:443", "https://roost.example"),
        ("http", "127.0.0.1:80", "http://127.0.0.1"),
        ("http", "[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_the_own_origin_is_written_as_browsers_write_origin(
    scheme: str, host: str, origin: str
) -> None:
    assert own_origin(scheme, host) == origin


def test_the_cookie_is_http_only_strict_for_every_path_and_secure_under_tls() -> None:
    assert set_cookie("roost_ui", "abc", secure=False) == (
        "roost_ui=abc; Path=/; HttpOnly; SameSite=Strict"
    )
    assert set_cookie("roost_session", "abc", secure=True).endswith("; Secure")
    assert "Max-Age=0" in clear_cookie("roost_session", secure=True)


def test_the_session_cookie_is_read_among_others() -> None:
    headers = {"cookie": "theme=dark; roost_session=abc=; other=1"}
    assert cookie(headers, "roost_session") == "abc="
    assert cookie(headers, "roost_ui") is None
    assert cookie({}, "roost_ui") is None


def test_a_session_lives_while_used_and_ends_idle_or_logged_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("roost.api.sessions.time", SimpleNamespace(monotonic=lambda: clock[0]))
    store = Sessions(idle_seconds=60)
    first, second = store.create(), store.create()
    assert first != second and len(first) >= 43  # 256 random bits
    clock[0] += 59
    assert store.valid(first)
    clock[0] += 59  # 118 s after its start, 59 s after its last use
    assert store.valid(first)
    assert not store.valid(second)  # idle for 118 s
    store.end(first)
    assert not store.valid(first)
    assert not store.valid(None) and not store.valid("") and not store.valid("made-up")


def test_every_answer_carries_the_policy_and_a_page_is_never_stored() -> None:
    page = dict(with_security_headers([(b"cache-control", b"max-age=60")], page=True))
    assert page[b"content-security-policy"] == CSP.encode()
    assert "script-src 'self';" in CSP and "unsafe-inline" not in CSP
    assert page[b"x-content-type-options"] == b"nosniff"
    assert page[b"referrer-policy"] == b"same-origin"
    assert page[b"cache-control"] == b"no-store"
    static = dict(with_security_headers([(b"content-type", b"text/css")], page=False))
    assert b"cache-control" not in static and b"content-security-policy" in static
