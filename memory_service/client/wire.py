"""Wire values from plain Python: the lower-case names of the protocol's enums, filters and memories to store.

The one table of wire names, shared by the client, its History calls and the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import duration_pb2

from memory_service.v1 import memory_pb2


def _names(enum: Any, prefix: str) -> dict[str, int]:
    """The lower-case names of a wire enum (``SCOPE_AGENT`` -> ``agent``), without its UNSPECIFIED zero."""
    return {name.removeprefix(prefix).lower(): value for name, value in enum.items() if value}


SCOPES = _names(memory_pb2.Scope, "SCOPE_")
MEMORY_TYPES = _names(memory_pb2.MemoryType, "MEMORY_TYPE_")
SEARCH_MODES = _names(memory_pb2.SearchMode, "SEARCH_MODE_")


def _value(table: dict[str, int], what: str, name: str) -> Any:
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(table)}") from None


def scope_value(name: str) -> memory_pb2.Scope.ValueType:
    return _value(SCOPES, "scope", name)  # type: ignore[no-any-return]


def memory_type_value(name: str) -> memory_pb2.MemoryType.ValueType:
    return _value(MEMORY_TYPES, "memory type", name)  # type: ignore[no-any-return]


def mode_value(name: str) -> memory_pb2.SearchMode.ValueType:
    return _value(SEARCH_MODES, "search mode", name)  # type: ignore[no-any-return]


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


def scope_filter(scope: str | None = None, scope_id: int | None = None) -> memory_pb2.MemoryFilter:
    """A filter on one scope (every scope_id of it when ``scope_id`` is None), or no filter at all."""
    memory_filter = memory_pb2.MemoryFilter()
    if scope is not None:
        ref = memory_filter.scopes.add(scope=scope_value(scope))
        if scope_id is not None:
            ref.scope_id = scope_id
    return memory_filter


def memory_input(
    value: str,
    *,
    scope: str = "global",
    scope_id: int = 0,
    key: str = "",
    memory_type: str = "fact",
    importance: float | None = None,
    tags: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    agent_id: int | None = None,
    ttl_seconds: float | None = None,
    embedding: Sequence[float] | None = None,
) -> memory_pb2.MemoryInput:
    """A memory to store, from the same keywords as ``MemoryClient.store`` (a dict of them works with ``**``)."""
    memory = memory_pb2.MemoryInput(
        scope=scope_value(scope),
        scope_id=scope_id,
        key=key,
        value=value,
        memory_type=memory_type_value(memory_type),
        tags=tags or [],
        embedding=embedding or [],
    )
    if importance is not None:
        memory.importance = importance
    if agent_id is not None:
        memory.agent_id = agent_id
    if metadata:
        memory.metadata.update(metadata)
    if ttl_seconds is not None:
        memory.ttl.FromNanoseconds(int(ttl_seconds * 1e9))
    return memory
