"""The columns of a memory, declared once: ``memory.memories`` and each of its versions in ``memory.memory_versions``
hold them, and every statement that reads a memory, returns one or copies it into a version lists them from here.
"""

from __future__ import annotations

CONTENT = (
    "scope",
    "scope_id",
    "agent_id",
    "memory_type",
    "key",
    "value",
    "importance",
    "tags",
    "metadata",
    "content_hash",
    "embedding_model",
    "created_at",
    "expires_at",
)
"""What a memory and each of its versions hold, besides ids, version counters, times of change and the vector."""

_ENUMS = frozenset({"scope", "memory_type"})
"""Read as text: the driver has no codec for the enum types."""

NAMES = ", ".join(CONTENT)
"""The content columns by name, for an INSERT's column list or a SELECT from a CTE."""


def qualified(alias: str) -> str:
    """The content columns as stored, for copying a row into its version: ``m.scope, m.scope_id, ...``."""
    return ", ".join(f"{alias}.{column}" for column in CONTENT)


def readable(alias: str) -> str:
    """The content columns as ``memory_from_row`` reads them (enums as text)."""
    return ", ".join(f"{alias}.{c}::text AS {c}" if c in _ENUMS else f"{alias}.{c}" for c in CONTENT)
