"""Errors every layer raises, each carrying its API code, HTTP status and CLI exit code.

One table here keeps the REST API and the CLI in step: a rule broken anywhere surfaces as the
same `{"error": {"code", "message", "details"}}` object with the same exit code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


class ExitCode:
    """Exit codes scripts can trust (documented in the README)."""

    OK = 0
    INVALID = 1
    USAGE = 2
    NOT_FOUND = 3
    CONFLICT = 4
    UNREACHABLE = 5
    FAILURE = 6


@dataclass(frozen=True)
class ErrorDetail:
    """One problem at one place: `loc` is dotted (`network.gateway`), `-` for the whole input."""

    loc: str
    msg: str

    def to_json(self) -> dict[str, str]:
        return {"loc": self.loc, "msg": self.msg}


class RoostError(Exception):
    """Base of every error roost reports to a user."""

    code: str = "internal"
    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = ExitCode.FAILURE

    def __init__(
        self, message: str, details: Iterable[ErrorDetail] = (), *, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: tuple[ErrorDetail, ...] = tuple(details)
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "details": [d.to_json() for d in self.details],
            }
        }


class InvalidError(RoostError):
    """The input breaks a rule; `details` says where and why."""

    code = "invalid"
    http_status = 422
    exit_code = ExitCode.INVALID

    @classmethod
    def at(cls, loc: str, msg: str) -> InvalidError:
        return cls(f"{loc}: {msg}", [ErrorDetail(loc, msg)])

    @classmethod
    def of(cls, details: Sequence[ErrorDetail]) -> InvalidError:
        first = details[0]
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        return cls(f"{first.loc}: {first.msg}{more}", details)


class InvalidJSONError(RoostError):
    code = "invalid_json"
    http_status = 400
    exit_code = ExitCode.INVALID


class NotFoundError(RoostError):
    code = "not_found"
    http_status = 404
    exit_code = ExitCode.NOT_FOUND


class ConflictError(RoostError):
    """A clash with existing state; `code` narrows it (vm_busy, ip_taken, exists, ...)."""

    code = "conflict"
    http_status = 409
    exit_code = ExitCode.CONFLICT


class UnauthorizedError(RoostError):
    code = "unauthorized"
    http_status = 401
    exit_code = ExitCode.UNREACHABLE


class UnreachableError(RoostError):
    """The CLI cannot reach the daemon."""

    code = "unreachable"
    http_status = 503
    exit_code = ExitCode.UNREACHABLE


class VMMUnavailableError(RoostError):
    """The VMM cannot be run at all here (binary missing, not executable)."""

    code = "vmm_unavailable"
    http_status = 503
    exit_code = ExitCode.FAILURE


class VMMFailedError(RoostError):
    """The VMM ran but refused or failed what it was asked to do."""

    code = "vmm_failed"
    http_status = 502
    exit_code = ExitCode.FAILURE


class HostError(RoostError):
    """The host could not do what roost needed (netlink, files, processes)."""

    code = "host_error"
    http_status = 502
    exit_code = ExitCode.FAILURE


ERROR_TYPES: dict[str, type[RoostError]] = {
    cls.code: cls
    for cls in (
        InvalidError,
        InvalidJSONError,
        NotFoundError,
        ConflictError,
        UnauthorizedError,
        VMMUnavailableError,
        VMMFailedError,
        HostError,
    )
}


def error_from_json(status: int, body: Any) -> RoostError:
    """Rebuild the error a daemon answered with, so the CLI exits as the daemon meant."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return RoostError(f"daemon answered HTTP {status} without an error object")
    code = str(error.get("code", "internal"))
    details = [
        ErrorDetail(str(d.get("loc", "-")), str(d.get("msg", "")))
        for d in error.get("details") or []
        if isinstance(d, dict)
    ]
    cls = ERROR_TYPES.get(code)
    if cls is None:
        cls = ConflictError if status == 409 else RoostError
    return cls(str(error.get("message", "")), details, code=code)
