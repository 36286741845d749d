"""Log output: the classic text lines, or ``LOG_FORMAT=json``, one JSON object per line.

A JSON line carries time, level, logger and message, and inside a call the call's request id, trace id, principal
and method (the access log adds code and duration, the slow-call log the plan). Exceptions go in ``error`` as one
string.
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


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a dict passed as ``extra={"fields": {...}}`` adds its keys to the object."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def _time(self, created: float) -> str:
        # One strftime per second rather than per line: the access log writes a line per call.
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record.created),
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
        fields = record.__dict__.get("fields")
        if isinstance(fields, dict):
            entry.update(fields)
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
