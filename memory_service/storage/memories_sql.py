"""SQL for storing, reading, listing and deleting memories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from memory_service.models import (
    Memory,
    MemoryFilter,
    MemoryType,
    NewMemory,
    Scope,
    Vector,
    WriteContext,
    WriteOutcome,
    assemble,
)
from memory_service.storage import columns
from memory_service.storage.command_tag import rows_affected
from memory_service.storage.filters import LIVE, Params, where_clause
from memory_service.storage.versions_sql import RETURNING_ROW, UPSERT_KIND, context_values, record

COLUMNS = f"m.id, {columns.readable('m')}, m.updated_at"
COLUMNS_WITH_EMBEDDING = COLUMNS + ", m.embedding"

WRITE_COLUMNS = columns.WRITTEN_NAMES
"""The columns a write sets, in the order of the VALUES below and of the bulk staging table."""

LATEST_EXPIRY = "'9999-12-31 23:59:59.999999+00'::timestamptz"
"""The latest expiry stored (validation.LATEST_EXPIRY); a TTL added to the database clock is capped at it, so even a
skewed clock cannot store a row that the driver cannot read back (migration 0006 also forbids one)."""


def expiry_sql(expires_at: str, ttl_seconds: str) -> str:
    """The one expression for a written row's ``expires_at``, given SQL for the request's expiry and TTL.

    NULL (never expires) when neither is set. ``LEAST`` ignores NULL arguments, so the TTL branch must only be
    taken when there is a TTL: ``LEAST(now + NULL, latest)`` is ``latest``, not NULL (migration 0010 repairs the
    rows a Store wrote that way).
    """
    return (
        f"CASE WHEN {ttl_seconds} IS NULL THEN {expires_at} "
        f"ELSE LEAST(clock_timestamp() + make_interval(secs => {ttl_seconds}), {LATEST_EXPIRY}) END"
    )


# On conflict the row is rewritten only when something differs, so "unchanged" costs no new row version and
# reports no update. The memory's version is bumped under the row lock the conflict takes. A rewritten row takes
# the proposed row's new graph_seq: it moves to the HNSW graph's tail instead of being inserted into the graph
# (storage.index_sql).
UPSERT_CONFLICT = f"""
ON CONFLICT ({columns.IDENTITY}) DO UPDATE SET
    {columns.upsert_set("m", "EXCLUDED")},
    version = m.version + 1,
    graph_seq = EXCLUDED.graph_seq,
    updated_at = clock_timestamp()
WHERE {columns.changed("m", "EXCLUDED")}
"""
UPSERT_TAIL = UPSERT_CONFLICT + "RETURNING m.id, (m.xmax = 0) AS created\n"
UPSERT_TAIL_VERSIONED = UPSERT_CONFLICT + f"RETURNING {RETURNING_ROW}, (m.xmax = 0) AS created, m.updated_at\n"


def write_values(value: Callable[[columns.Column], str], ttl_seconds: str) -> str:
    """The values a write inserts, in ``WRITE_COLUMNS`` order: ``value(column)`` for each, the expiry computed."""
    return ", ".join(expiry_sql(value(c), ttl_seconds) if c.name == "expires_at" else value(c) for c in columns.WRITTEN)


# Parameters: one per written column in WRITE_COLUMNS order, then the TTL, the generation, the write's context.
_TTL_PARAM = len(columns.WRITTEN) + 1
_GENERATION_PARAM = _TTL_PARAM + 1
_CONTEXT_PARAMS = (f"${_GENERATION_PARAM + 1}", f"${_GENERATION_PARAM + 2}", f"${_GENERATION_PARAM + 3}")


def _param(column: columns.Column) -> str:
    """A written column's parameter. The vectors go through the generation check (the generation both were made
    for; memory.embedding_generation_is fails the write when a cut-over or rollback replaced it): a bare parameter
    is coerced to its column's vector(D) when the statement is planned, so a vector of a generation swapped since
    would fail on its dimension before the check could run."""
    param = column.param(columns.WRITTEN.index(column) + 1)
    if column.type == "vector":
        return f"CASE WHEN memory.embedding_generation_is(${_GENERATION_PARAM}) THEN {param} END"
    return param


_INSERT_ONE = f"""
INSERT INTO memory.memories AS m ({WRITE_COLUMNS})
VALUES ({write_values(_param, f"${_TTL_PARAM}::float8")})
"""
_UPSERT_ONE = _INSERT_ONE + UPSERT_TAIL
_UPSERT_ONE_VERSIONED = f"""
WITH w AS ({_INSERT_ONE} {UPSERT_TAIL_VERSIONED}),
{record("w", kind=UPSERT_KIND, changed_at="updated_at", context_params=_CONTEXT_PARAMS)}
SELECT id, created FROM w
"""

# A delete leaves a tombstone version: the memory as it was when it went.
_DELETE_RETURNING = f"""
RETURNING {RETURNING_ROW.replace("m.version", "m.version + 1 AS version")}, clock_timestamp() AS changed_at,
          CASE WHEN m.expires_at <= now() THEN 'expired' ELSE 'deleted' END::memory.change_kind AS kind
"""
_CONTEXT_AFTER_ONE = ("$2", "$3", "$4")
_DELETE_ONE_VERSIONED = f"""
WITH w AS (DELETE FROM memory.memories m WHERE m.id = $1 {_DELETE_RETURNING}),
{record("w", kind="kind", changed_at="changed_at", context_params=_CONTEXT_AFTER_ONE)}
SELECT count(*) FROM w
"""
_PURGE_EXPIRED_VERSIONED = f"""
WITH w AS (
    DELETE FROM memory.memories m WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM memory.memories
        WHERE expires_at <= clock_timestamp() LIMIT $1 FOR UPDATE SKIP LOCKED))
    {_DELETE_RETURNING}
),
{record("w", kind="'expired'::memory.change_kind", changed_at="changed_at", context_params=_CONTEXT_AFTER_ONE)}
SELECT count(*) FROM w
"""


async def upsert(
    conn: asyncpg.Connection,
    memory: NewMemory,
    embedding: Vector,
    model: str,
    *,
    history: WriteContext | None,
    other: Vector | None = None,
    generation: int = 0,
) -> tuple[int, WriteOutcome]:
    """Store by identity; with ``history``, a change records its version in the same statement. ``embedding`` is
    the current generation's vector, ``other`` the other generation's during a move (``generation``: the epoch
    both belong to)."""
    values = columns.written_values(memory, embedding, model, other)
    row = await conn.fetchrow(
        _UPSERT_ONE if history is None else _UPSERT_ONE_VERSIONED,
        *(values[c.name] for c in columns.WRITTEN),
        memory.ttl_seconds,
        generation,
        *(() if history is None else context_values(history)),
    )
    if row is not None:
        return row["id"], WriteOutcome.CREATED if row["created"] else WriteOutcome.UPDATED
    existing = await conn.fetchval(
        "SELECT id FROM memory.memories WHERE scope = $1::text::memory.scope AND scope_id = $2 AND key = $3",
        memory.scope.value,
        memory.scope_id,
        memory.key,
    )
    return existing, WriteOutcome.UNCHANGED


async def stored_embeddings(conn: asyncpg.Connection, memories: Sequence[NewMemory]) -> dict[int, Vector]:
    """Embeddings already stored for these identities with the same content, by position, so they need not be
    recomputed.

    ``embedding`` holds vectors of the database's current model only (the binding, and during a move the generation
    check of the write that uses them: read by an instance that has not seen a cut-over yet, they fail its write,
    which then runs again), whichever model's name the row carries."""
    if not memories:
        return {}
    rows = await conn.fetch(
        """
        SELECT i.ord, m.embedding
        FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[]) WITH ORDINALITY
             AS i(scope, scope_id, key, content_hash, ord)
        JOIN memory.memories m
          ON m.scope = i.scope::memory.scope AND m.scope_id = i.scope_id AND m.key = i.key
         AND m.content_hash = i.content_hash
        WHERE m.embedding IS NOT NULL
        """,
        [m.scope.value for m in memories],
        [m.scope_id for m in memories],
        [m.key for m in memories],
        [m.content_hash for m in memories],
    )
    return {int(r["ord"]) - 1: r["embedding"] for r in rows}


async def get(conn: asyncpg.Connection, memory_id: int, *, with_embedding: bool) -> Memory | None:
    columns = COLUMNS_WITH_EMBEDDING if with_embedding else COLUMNS
    row = await conn.fetchrow(f"SELECT {columns} FROM memory.memories m WHERE m.id = $1 AND {LIVE}", memory_id)
    return None if row is None else memory_from_row(row)


async def lock_scope_of(conn: asyncpg.Connection, memory_id: int) -> tuple[Scope, int] | None:
    """The scope of a memory (live or expired), locked for the delete that follows; None when there is none."""
    row = await conn.fetchrow(
        "SELECT scope::text AS scope, scope_id FROM memory.memories WHERE id = $1 FOR UPDATE", memory_id
    )
    return None if row is None else (Scope(row["scope"]), row["scope_id"])


async def delete_by_id(conn: asyncpg.Connection, memory_id: int, *, history: WriteContext | None) -> int:
    if history is not None:
        deleted: int = await conn.fetchval(_DELETE_ONE_VERSIONED, memory_id, *context_values(history))
        return deleted
    result = await conn.execute("DELETE FROM memory.memories WHERE id = $1", memory_id)
    return rows_affected(result)


async def delete_matching(
    conn: asyncpg.Connection, memory_filter: MemoryFilter, *, history: WriteContext | None
) -> int:
    params = Params()
    where = where_clause(memory_filter, params, live_only=False)
    if history is None:
        result = await conn.execute(f"DELETE FROM memory.memories m WHERE {where}", *params.values)
        return rows_affected(result)
    context = tuple(params.add(value) for value in context_values(history))
    deleted: int = await conn.fetchval(
        f"""
        WITH w AS (DELETE FROM memory.memories m WHERE {where} {_DELETE_RETURNING}),
        {record("w", kind="kind", changed_at="changed_at", context_params=(context[0], context[1], context[2]))}
        SELECT count(*) FROM w
        """,
        *params.values,
    )
    return deleted


async def list_page(
    conn: asyncpg.Connection, memory_filter: MemoryFilter, *, after_id: int, limit: int, with_embedding: bool
) -> list[Memory]:
    params = Params()
    where = where_clause(memory_filter, params)
    columns = COLUMNS_WITH_EMBEDDING if with_embedding else COLUMNS
    rows = await conn.fetch(
        f"SELECT {columns} FROM memory.memories m WHERE {where} AND m.id > {params.add(after_id)} "
        f"ORDER BY m.id LIMIT {params.add(limit)}",
        *params.values,
    )
    return [memory_from_row(row) for row in rows]


async def purge_expired(conn: asyncpg.Connection, *, batch: int, history: bool = True) -> int:
    """Delete up to ``batch`` expired memories; SKIP LOCKED lets several instances purge side by side."""
    if history:
        purged: int = await conn.fetchval(_PURGE_EXPIRED_VERSIONED, batch, None, None, None)
        return purged
    result = await conn.execute(
        """
        DELETE FROM memory.memories WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM memory.memories
            WHERE expires_at <= clock_timestamp() LIMIT $1 FOR UPDATE SKIP LOCKED))
        """,
        batch,
    )
    return rows_affected(result)


_SCOPES = {scope.value: scope for scope in Scope}
_TYPES = {memory_type.value: memory_type for memory_type in MemoryType}
"""Enum members by their text: a dict lookup, where calling the enum class costs several times as much (per row)."""


def memory_from_row(row: asyncpg.Record | dict[str, Any]) -> Memory:
    # Every search hit and listed memory passes here: assembled, not constructed (models.assemble).
    return assemble(
        Memory,
        {
            "id": row["id"],
            "scope": _SCOPES[row["scope"]],
            "scope_id": row["scope_id"],
            "agent_id": row["agent_id"],
            "memory_type": _TYPES[row["memory_type"]],
            "key": row["key"],
            "value": row["value"],
            "importance": float(row["importance"]),
            "tags": tuple(row["tags"] or ()),
            "metadata": row["metadata"] or {},
            "content_hash": bytes(row["content_hash"]),
            "embedding_model": row["embedding_model"],
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "expires_at": _aware(row["expires_at"]),
            "embedding": row.get("embedding"),
        },
    )


def _aware(value: datetime | None) -> datetime | None:
    """asyncpg reads timestamptz 'infinity' (which is also how it writes datetime.max) as a naive datetime.max."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
