"""A minimal QMP client: one short connection per command, so a VM never holds a socket open.

QEMU serves one QMP client at a time (others wait in the listen backlog), so every call opens,
negotiates, runs one command and closes, each step bounded by a timeout.
"""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path
from typing import Any

from roost.errors import VMMFailedError

TIMEOUT = 5.0


def qmp(
    path: Path, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = TIMEOUT
) -> Any:
    """Run `command` on the QMP socket at `path` and return its `return` value.

    Raises `VMMFailedError` when the socket cannot be reached, QEMU answers with an error, or
    the connection ends first (for `quit`, an end without an answer counts as success: QEMU may
    exit before it writes the reply)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            with sock.makefile("rwb") as stream:
                if "QMP" not in _read(stream):
                    raise VMMFailedError(f"{path} did not greet as a QMP monitor")
                _execute(stream, "qmp_capabilities", None)
                return _execute(stream, command, arguments)
    except EOFError:
        if command == "quit":
            return {}
        raise VMMFailedError(f"QMP {command}: QEMU closed {path} without answering") from None
    except OSError as error:
        raise VMMFailedError(f"QMP {command} on {path} failed: {error}") from None


def _execute(stream: io.BufferedRWPair, command: str, arguments: dict[str, Any] | None) -> Any:
    request: dict[str, Any] = {"execute": command}
    if arguments is not None:
        request["arguments"] = arguments
    stream.write(json.dumps(request).encode() + b"\n")
    stream.flush()
    while True:
        message = _read(stream)
        if "return" in message:
            return message["return"]
        if "error" in message:
            error = message["error"]
            raise VMMFailedError(f"QEMU refused {command}: {error.get('desc', error)}")
        # anything else is an asynchronous event (POWERDOWN, STOP, ...): not our answer


def _read(stream: io.BufferedRWPair) -> dict[str, Any]:
    line = stream.readline()
    if not line:
        raise EOFError
    try:
        message = json.loads(line)
    except ValueError:
        raise VMMFailedError(f"QMP sent something that is not JSON: {line[:200]!r}") from None
    if not isinstance(message, dict):
        raise VMMFailedError(f"QMP sent a JSON value that is not an object: {line[:200]!r}")
    return message
