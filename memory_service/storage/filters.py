"""MemoryFilter as a SQL WHERE fragment over ``memory.memories m``.

The SQL text comes only from the fixed fragments below; every value travels as a ``$n`` parameter.
"""

from __future__ import annotations

import json
from typing import Any

from memory_service.models import MemoryFilter

# now() (the transaction's start), not clock_timestamp(): a stable value is computed once per statement instead of
# once per row, and the planner may use it in index conditions.
LIVE = "(m.expires_at IS NULL OR m.expires_at > now())"


class Params:
    """Collects query parameters and hands out their ``$n`` placeholders."""

    def __init__(self, *initial: Any) -> None:
        self.values: list[Any] = list(initial)

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def where_clause(memory_filter: MemoryFilter, params: Params, *, live_only: bool = True) -> str:
    """``cond AND cond ...`` (never empty: at least ``TRUE``)."""
    conditions: list[str] = [LIVE] if live_only else []
    f = memory_filter
    if f.scopes:
        alternatives = []
        for ref in f.scopes:
            scope = params.add(ref.scope.value)
            if ref.scope_id is None:
                alternatives.append(f"m.scope = {scope}::memory.scope")
            else:
                alternatives.append(f"(m.scope = {scope}::memory.scope AND m.scope_id = {params.add(ref.scope_id)})")
        conditions.append("(" + " OR ".join(alternatives) + ")")
    if f.agent_id is not None:
        conditions.append(f"m.agent_id = {params.add(f.agent_id)}")
    if f.memory_types:
        types = params.add([t.value for t in f.memory_types])
        conditions.append(f"m.memory_type = ANY({types}::memory.memory_type[])")
    if f.tags:
        conditions.append(f"m.tags @> {params.add(list(f.tags))}::text[]")
    if f.min_importance is not None:
        conditions.append(f"m.importance >= {params.add(f.min_importance)}")
    if f.created_after is not None:
        conditions.append(f"m.created_at >= {params.add(f.created_after)}")
    if f.created_before is not None:
        conditions.append(f"m.created_at < {params.add(f.created_before)}")
    if f.metadata_contains:
        conditions.append(f"m.metadata @> {params.add(json.dumps(f.metadata_contains))}::text::jsonb")
    return " AND ".join(conditions) if conditions else "TRUE"
