"""Turning untrusted JSON into spec objects, with every problem reported as `loc: msg`."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from roost.errors import ErrorDetail, InvalidError, InvalidJSONError

Model = TypeVar("Model", bound=BaseModel)

# pydantic's wording, rephrased to tell the user what to do (`{...}` from the error's ctx).
MESSAGES = {
    "extra_forbidden": "is not a known field; check its spelling",
    "missing": "is required",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
    "string_pattern_mismatch": "must be a single word (no spaces)",
    "string_type": "must be a string",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "list_type": "must be a JSON list",
}


def dotted(loc: tuple[int | str, ...]) -> str:
    """pydantic's loc tuple as roost's dotted form (`-` for the whole document)."""
    return ".".join(str(part) for part in loc) if loc else "-"


def details_of(error: ValidationError) -> list[ErrorDetail]:
    details = []
    for item in error.errors(include_url=False):
        template = MESSAGES.get(item["type"])
        msg = template.format(**item.get("ctx", {})) if template else item["msg"]
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        details.append(ErrorDetail(dotted(item["loc"]), msg))
    return details


def parse(model: type[Model], data: Any) -> Model:
    """Validate `data` as `model`, raising `InvalidError` with one detail per problem."""
    if not isinstance(data, dict):
        raise InvalidError.at("-", "must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise InvalidError.of(details_of(error)) from None


MAX_DEPTH = 64
MAX_INT_DIGITS = 300
_SURROGATE = re.compile("[\ud800-\udfff]")


class _RefusedError(Exception):
    """Raised inside the JSON parser's hooks to stop at the first thing roost refuses."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        twice = next(key for key, count in counts.items() if count > 1)
        raise _RefusedError(f"key {twice!r} appears twice in one object; give each key once")
    return data


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _RefusedError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(digits)


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _RefusedError(f"the number {text[:40]}{'...' if len(text) > 40 else ''} is too large")
    return value


def _constant(name: str) -> Any:
    raise _RefusedError(f"{name} is not a JSON value")


def _check_tree(data: Any) -> None:
    """Nesting at most `MAX_DEPTH` deep and no unpaired surrogate in any string (it could
    not be stored or sent back as UTF-8), checked without recursion."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: list[Any] = [*value.keys(), *value.values()]
        elif isinstance(value, list):
            children = value
        else:
            if isinstance(value, str) and _SURROGATE.search(value):
                raise _RefusedError("a string holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)")
            continue
        if depth >= MAX_DEPTH:
            raise _RefusedError(f"objects and lists are nested more than {MAX_DEPTH} deep")
        stack.extend((child, depth + 1) for child in children)


def load_json(text: str | bytes) -> Any:
    """Parse JSON text, reporting the line and column where it stops making sense.

    Refused as well, since each would otherwise cost memory, time or a crash later on:
    nesting deeper than `MAX_DEPTH`, a key given twice in one object, integers longer than
    `MAX_INT_DIGITS` digits, numbers too large for a float, NaN and Infinity, and strings
    with unpaired surrogates.
    """
    try:
        data = json.loads(
            text,
            object_pairs_hook=_object,
            parse_int=_int,
            parse_float=_float,
            parse_constant=_constant,
        )
        _check_tree(data)
    except json.JSONDecodeError as error:
        raise InvalidJSONError(
            f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except UnicodeDecodeError:
        raise InvalidJSONError("not valid JSON: the text is not UTF-8") from None
    except RecursionError:
        raise InvalidJSONError(
            f"not valid JSON: objects and lists are nested more than {MAX_DEPTH} deep"
        ) from None
    except _RefusedError as error:
        raise InvalidJSONError(f"not valid JSON: {error}") from None
    return data
