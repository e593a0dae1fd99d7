"""Errors every layer raises, each carrying its API code, HTTP status and CLI exit code.

`CODES` is the one table: every code the API or the CLI can report, with its HTTP status and
exit code. A rule broken anywhere surfaces as the same `{"error": {"code", "message",
"details"}}` object with the same exit code, and the CLI rebuilds any error a daemon sends from
its code alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


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
class Code:
    """What one error code means to HTTP clients and to scripts."""

    http_status: int
    exit_code: int


CODES: dict[str, Code] = {
    # the request itself
    "invalid_json": Code(400, ExitCode.INVALID),
    "unauthorized": Code(401, ExitCode.UNREACHABLE),
    "forbidden": Code(403, ExitCode.UNREACHABLE),
    "not_found": Code(404, ExitCode.NOT_FOUND),
    "too_large": Code(413, ExitCode.INVALID),
    "unsupported_media_type": Code(415, ExitCode.INVALID),
    "misdirected": Code(421, ExitCode.UNREACHABLE),
    "invalid": Code(422, ExitCode.INVALID),
    # clashes with the state
    "conflict": Code(409, ExitCode.CONFLICT),
    "exists": Code(409, ExitCode.CONFLICT),
    "vm_busy": Code(409, ExitCode.CONFLICT),
    "ip_taken": Code(409, ExitCode.CONFLICT),
    "subnet_overlap": Code(409, ExitCode.CONFLICT),
    "network_full": Code(409, ExitCode.CONFLICT),
    "cid_exhausted": Code(409, ExitCode.CONFLICT),
    "plugin_in_use": Code(409, ExitCode.CONFLICT),
    "network_in_use": Code(409, ExitCode.CONFLICT),
    "policy_in_use": Code(409, ExitCode.CONFLICT),
    "locked": Code(409, ExitCode.CONFLICT),
    "orphans": Code(409, ExitCode.CONFLICT),
    "no_capacity": Code(409, ExitCode.CONFLICT),
    "no_eligible_host": Code(409, ExitCode.CONFLICT),
    # the daemon, the host or a VMM
    "internal": Code(500, ExitCode.FAILURE),
    "vmm_failed": Code(502, ExitCode.FAILURE),
    "host_error": Code(502, ExitCode.FAILURE),
    "vmm_unavailable": Code(503, ExitCode.FAILURE),
    "busy": Code(503, ExitCode.FAILURE),
    "recovering": Code(503, ExitCode.FAILURE),
    "database_gone": Code(503, ExitCode.FAILURE),
    "host_offline": Code(503, ExitCode.FAILURE),
    "fenced": Code(503, ExitCode.FAILURE),
    "no_space": Code(507, ExitCode.FAILURE),
    # said by the CLI about a daemon it cannot reach or that does not answer
    "unreachable": Code(503, ExitCode.UNREACHABLE),
    "timeout": Code(504, ExitCode.FAILURE),
}


@dataclass(frozen=True)
class ErrorDetail:
    """One problem at one place: `loc` is dotted (`network.gateway`), `-` for the whole input."""

    loc: str
    msg: str

    def to_json(self) -> dict[str, str]:
        return {"loc": self.loc, "msg": self.msg}


class RoostError(Exception):
    """Base of every error roost reports to a user; `code` (a key of `CODES`) decides the
    HTTP status and the exit code."""

    code: str = "internal"
    retry_after: float | None = None  # seconds, for the codes a client may retry

    def __init__(
        self,
        message: str,
        details: Iterable[ErrorDetail] = (),
        *,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: tuple[ErrorDetail, ...] = tuple(details)
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after
        assert self.code in CODES, f"error code {self.code!r} is not in roost.errors.CODES"

    @property
    def http_status(self) -> int:
        return CODES[self.code].http_status

    @property
    def exit_code(self) -> int:
        return CODES[self.code].exit_code

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


class NotFoundError(RoostError):
    code = "not_found"


class ConflictError(RoostError):
    """A clash with existing state; `code` narrows it (vm_busy, ip_taken, exists, ...)."""

    code = "conflict"


class UnreachableError(RoostError):
    """The CLI cannot reach the daemon."""

    code = "unreachable"


class VMMUnavailableError(RoostError):
    """The VMM cannot be run at all here (binary missing, not executable)."""

    code = "vmm_unavailable"


class VMMFailedError(RoostError):
    """The VMM ran but refused or failed what it was asked to do."""

    code = "vmm_failed"


class HostError(RoostError):
    """The host could not do what roost needed (netlink, files, processes)."""

    code = "host_error"


class NoSpaceError(RoostError):
    """A filesystem the daemon writes to (state, artifacts, disks) is full."""

    code = "no_space"


class UnavailableError(RoostError):
    """The daemon cannot take this now (`busy`, `recovering`, `database_gone`); a client may
    try again after `retry_after` seconds where that is set."""

    code = "busy"


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
    message = str(error.get("message", ""))
    if code not in CODES:  # a newer daemon's code: judged by its HTTP status
        message = f"{message} (error code {code!r})"
        code = "conflict" if status == 409 else "invalid" if 400 <= status < 500 else "internal"
    return RoostError(message, details, code=code)
