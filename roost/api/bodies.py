"""Request bodies in the OpenAPI document: pydantic's JSON Schemas, with the definitions they
refer to moved where OpenAPI's references find them (`components/schemas`); left inside each
body, `#/$defs/...` would point at the document's root, where nothing is, and clients and
fuzzers generated from the document could make no body at all."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

REF_TEMPLATE = "#/components/schemas/{model}"


class BodySchemas:
    """Collects the definitions of every body one app declares, then adds them to its
    OpenAPI document."""

    def __init__(self) -> None:
        self.definitions: dict[str, Any] = {}

    def of(
        self,
        model: type[BaseModel],
        extra: dict[str, Any] | None = None,
        required: Iterable[str] = (),
    ) -> dict[str, Any]:
        """A route's `openapi_extra` for a JSON body of `model`, with `extra` properties and
        more `required` ones (fields the route reads beside the model's)."""
        schema = model.model_json_schema(ref_template=REF_TEMPLATE)
        self.definitions.update(schema.pop("$defs", {}))
        if extra:
            schema["properties"] = {**schema["properties"], **extra}
        if required:
            schema["required"] = sorted({*schema.get("required", ()), *required})
        content = {"application/json": {"schema": schema}}
        return {"requestBody": {"required": True, "content": content}}

    def install(self, app: FastAPI) -> None:
        """Make `app`'s OpenAPI document carry the collected definitions."""
        generate = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                document = generate()
                schemas = document.setdefault("components", {}).setdefault("schemas", {})
                schemas.update(self.definitions)
            return app.openapi_schema  # type: ignore[return-value]

        app.openapi = openapi  # type: ignore[method-assign]
