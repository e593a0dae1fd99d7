"""Request bodies as `load_json` reads them: what would cost memory, time or a crash later is
refused as `invalid_json` with a message that says what, never an internal error."""

from __future__ import annotations

import pytest

from roost.errors import RoostError
from roost.spec import load_json


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[" * 100_000, "nested more than 64 deep"),
        ('{"a":' * 100_000, "nested more than 64 deep"),
        ("[" * 65 + "]" * 65, "nested more than 64 deep"),
        ('{"a": {"b": ' + "[" * 63 + "]" * 63 + "}}", "nested more than 64 deep"),
        ('{"name": "a", "name": "b"}', "key 'name' appears twice"),
        ('{"x": {"k": 1, "k": 1}}', "key 'k' appears twice"),
        ("9" * 5000, "more than 300 digits"),
        ("-" + "9" * 301, "more than 300 digits"),
        ('{"memory_mib": 1' + "0" * 400 + "}", "more than 300 digits"),
        ("1e999", "too large"),
        ("-1e999", "too large"),
        ("NaN", "NaN is not a JSON value"),
        ("[Infinity]", "Infinity is not a JSON value"),
        ('"\\ud800"', "unpaired UTF-16 surrogate"),
        ('{"\\udfff": 1}', "unpaired UTF-16 surrogate"),
        (b"\xff\xfe\xfa", "not UTF-8"),
        ("{not json", "line 1 column 2"),
    ],
)
def test_bodies_that_would_cost_a_crash_or_a_fortune_are_invalid_json(
    text: str | bytes, says: str
) -> None:
    with pytest.raises(RoostError) as caught:
        load_json(text)
    assert caught.value.code == "invalid_json"
    assert says in caught.value.message
    assert caught.value.message.startswith("not valid JSON: ")


def nested_lists(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("[" * 64 + "]" * 64, nested_lists(64)),
        ("9" * 300, int("9" * 300)),
        ("1e308", 1e308),
        ('"\\ud83d\\ude00 NUL\\u0000"', "\U0001f600 NUL\x00"),
        ('{"a": 1, "b": {"a": 2}}', {"a": 1, "b": {"a": 2}}),
    ],
)
def test_bodies_at_the_limits_are_read(text: str, value: object) -> None:
    assert load_json(text) == value
