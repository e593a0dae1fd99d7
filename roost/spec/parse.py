"""Turning untrusted JSON into spec objects, with every problem reported as `loc: msg`."""

from __future__ import annotations

import json
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


def load_json(text: str | bytes) -> Any:
    """Parse JSON text, reporting the line and column where it stops making sense."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidJSONError(
            f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except UnicodeDecodeError:
        raise InvalidJSONError("not valid JSON: the text is not UTF-8") from None
