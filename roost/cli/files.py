"""Reading manifests and VM configs from files, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from roost.errors import ErrorDetail, InvalidError, RoostError

if TYPE_CHECKING:
    from roost.spec import Manifest

# roost.spec (pydantic) is imported where a file is read: commands that read none start faster


def read_json(path: Path) -> Any:
    from roost.spec import load_json

    try:
        text = path.read_bytes()
    except OSError as error:
        raise InvalidError.at("-", f"cannot read {path}: {error.strerror}") from None
    try:
        return load_json(text)
    except RoostError as error:
        raise InvalidError.at("-", error.message) from None


def read_manifest(path: Path) -> Manifest:
    """A manifest file, validated; relative artifact paths stay as written."""
    from roost.spec import Manifest, parse

    return parse(Manifest, read_json(path))


def manifest_problems(path: Path) -> tuple[Manifest | None, list[ErrorDetail]]:
    try:
        return read_manifest(path), []
    except InvalidError as error:
        return None, list(error.details)


def with_resolved_artifacts(manifest: Manifest, path: Path) -> Manifest:
    """The manifest with relative artifact paths made absolute against its file's folder."""
    base = str(path.resolve().parent)
    update = {role: artifact.resolve(base) for role, artifact in manifest.artifacts().items()}
    return manifest.model_copy(update=update)
