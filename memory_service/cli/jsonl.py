"""The JSON-lines format of ``memory-service ingest``: one object per line, turned into a MemoryInput.

Only what this client must know is checked here (JSON syntax, field names and types, enum names); the server
validates the rest (empty values, dimensions, ranges) and rejects those rows with the same line numbers.
"""

from __future__ import annotations

import json
import math
from typing import Any

from memory_service.client import MEMORY_TYPES, SCOPES
from memory_service.v1 import memory_pb2

_MAX_TTL_SECONDS = 315_576_000_000  # the range of google.protobuf.Duration
_FIELDS = (
    "scope",
    "scope_id",
    "agent_id",
    "memory_type",
    "key",
    "value",
    "importance",
    "tags",
    "metadata",
    "embedding",
    "ttl_seconds",
    "expires_at",
)


class LineError(Exception):
    """A line this client cannot send; ``field`` is the JSON field at fault, or "" for the whole line."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


def _get(data: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise LineError(name, f"must be {what}")
    return value


def parse_line(raw: bytes) -> memory_pb2.MemoryInput:
    """One JSONL line as a MemoryInput; LineError for what is malformed here (the server checks the rest)."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise LineError("", f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LineError("", "not a JSON object")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise LineError(unknown[0], "is not a known field (expected " + ", ".join(_FIELDS) + ")")
    value = _get(data, "value", str, "a string")
    if value is None:
        raise LineError("value", "is required")
    message = memory_pb2.MemoryInput(value=value, key=_get(data, "key", str, "a string") or "")
    for name, table, target in (("scope", SCOPES, "scope"), ("memory_type", MEMORY_TYPES, "memory_type")):
        label = _get(data, name, str, "a string")
        if label is not None:
            if label.lower() not in table:
                raise LineError(name, f"must be one of {', '.join(table)} (got {label!r})")
            setattr(message, target, table[label.lower()])
    if message.scope == 0:
        raise LineError("scope", "is required")
    for name in ("scope_id", "agent_id"):
        number = _get(data, name, int, "an integer")
        if number is not None:
            if not -(2**63) <= number < 2**63:
                raise LineError(name, "is out of range for a 64-bit id")
            setattr(message, name, number)
    importance = _get(data, "importance", (int, float), "a number")
    if importance is not None:
        message.importance = float(importance)
    tags = _get(data, "tags", list, "a list of strings")
    if tags is not None:
        if not all(isinstance(tag, str) for tag in tags):
            raise LineError("tags", "must be a list of strings")
        message.tags.extend(tags)
    metadata = _get(data, "metadata", dict, "a JSON object")
    if metadata:
        try:
            message.metadata.update(metadata)
        except (ValueError, TypeError) as exc:
            raise LineError("metadata", f"cannot be stored ({exc})") from None
    embedding = _get(data, "embedding", list, "a list of numbers")
    if embedding:
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in embedding):
            raise LineError("embedding", "must be a list of numbers")
        message.embedding.extend(embedding)
    ttl = _get(data, "ttl_seconds", (int, float), "a number of seconds")
    expires_at = _get(data, "expires_at", str, "an RFC 3339 timestamp")
    if ttl is not None and expires_at is not None:
        raise LineError("ttl_seconds", "give ttl_seconds or expires_at, not both")
    if ttl is not None:
        if not (math.isfinite(ttl) and abs(ttl) < _MAX_TTL_SECONDS):
            raise LineError("ttl_seconds", f"must be a number of seconds below {_MAX_TTL_SECONDS:.0f}")
        message.ttl.FromNanoseconds(int(ttl * 1e9))
    if expires_at is not None:
        try:
            message.expires_at.FromJsonString(expires_at)
        except ValueError:
            raise LineError("expires_at", f"must be an RFC 3339 timestamp (got {expires_at!r})") from None
    return message
