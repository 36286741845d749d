"""Log output: the classic text lines, or ``LOG_FORMAT=json``, one JSON object per line.

A JSON line carries time, level, logger and message, and inside a call the call's request id, trace id, principal
and method (the access log adds code and duration). Exceptions go in ``error`` as one string.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from memory_service.observability.calls import current_call

LOG_FORMATS = ("text", "json")
ACCESS_LOGGER = "memory_service.access"
_RESERVED = frozenset(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per record; fields passed with ``extra=`` are kept as they are."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = record.created
        millis = int((seconds - int(seconds)) * 1000)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        note = current_call.get()
        if note is not None:
            entry["request_id"] = note.request_id
            entry["trace_id"] = note.trace_id
            entry["principal"] = note.principal
            entry["method"] = note.method
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class _ServiceHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure`` installs, told apart from any other on the root logger."""


def configure(level: str, log_format: str = "text") -> None:
    """Send every log line to stderr in the chosen format, at ``level``."""
    handler = _ServiceHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    # Only a handler of ours is replaced (configuring twice in one process), never one a host program installed.
    for existing in [h for h in root.handlers if isinstance(h, _ServiceHandler)]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("asyncio", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
