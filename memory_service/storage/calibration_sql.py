"""SQL a calibration runs: a sample of stored vectors, and their neighbours found exactly and through the index.

The neighbours come from ``search_sql.candidates`` itself, so a calibration measures the very statement searches
run, with the scan settings they would run it with. Everything here runs on the maintenance connection
(``index_sql.maintenance_connection``), whose plain ``SET`` lasts until it closes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import asyncpg

from memory_service.models import MemoryFilter, Scope, ScopeRef, Vector
from memory_service.storage import search_sql, settings_sql
from memory_service.storage.filters import LIVE
from memory_service.storage.index_sql import vector_column

CALIBRATION_KEY = "vector_index_calibration"


@dataclasses.dataclass(frozen=True)
class SampleRow:
    id: int
    vector: Vector
    scope: ScopeRef


async def sample(conn: asyncpg.Connection, size: int, *, rows: int, column: str = "embedding") -> list[SampleRow]:
    """About ``size`` live memories with an embedding, drawn uniformly (a Bernoulli sample of the rows, so pages
    written together, often on one topic, do not come as a block)."""
    percent = min(100.0, 100.0 * 4 * size / max(rows, 1))
    column = vector_column(column)
    records = await conn.fetch(
        f"""
        SELECT id, {column} AS embedding, scope::text AS scope, scope_id FROM memory.memories m
        TABLESAMPLE BERNOULLI ({percent:.6f})
        WHERE m.{column} IS NOT NULL AND (m.expires_at IS NULL OR m.expires_at > now())
        ORDER BY random() LIMIT $1
        """,
        size,
    )
    return [
        SampleRow(id=r["id"], vector=r["embedding"], scope=ScopeRef(scope=Scope(r["scope"]), scope_id=r["scope_id"]))
        for r in records
    ]


async def live_vectors(
    conn: asyncpg.Connection, *, column: str = "embedding", batch: int = 2_000
) -> AsyncIterator[tuple[list[int], list[Vector]]]:
    """Every live memory's id and vector, ``batch`` rows at a time: the rows the exact scan of an unfiltered search
    ranks, read once through a cursor (in a transaction of its own unless the connection is in one). Each batch is
    decoded on the event loop: 2,000 rows keep that to a few milliseconds."""
    column = vector_column(column)
    statement = f"SELECT m.id, m.{column} AS embedding FROM memory.memories m WHERE {LIVE} AND m.{column} IS NOT NULL"
    transaction = None if conn.is_in_transaction() else conn.transaction(readonly=True)
    if transaction is not None:
        await transaction.start()
    try:
        cursor = await conn.cursor(statement)
        while rows := await cursor.fetch(batch):
            yield [r["id"] for r in rows], [r["embedding"] for r in rows]
    finally:
        if transaction is not None:
            await transaction.rollback()


async def use_settings(conn: asyncpg.Connection, settings: Mapping[str, str]) -> None:
    """Scan settings for the statements that follow on this (unpooled) connection."""
    for name, value in settings.items():
        await conn.execute("SELECT set_config($1, $2, false)", name, value)


async def nearest(
    conn: asyncpg.Connection,
    memory_filter: MemoryFilter,
    vector: Vector,
    *,
    limit: int,
    exact: bool,
    column: str = "embedding",
    generation: int | None = None,
    watermark: int | None = None,
) -> list[int]:
    """Ids of the ``limit`` nearest among the filter's memories, by distance: exactly, or through the index."""
    found = await search_sql.candidates(
        conn,
        memory_filter,
        vector=vector,
        text=None,
        limit=limit,
        exact=exact,
        full_rows=False,
        column=column,
        generation=generation,
        watermark=watermark,
    )
    return [c.id for c in sorted(found, key=lambda c: (c.distance if c.distance is not None else 2.0, c.id))]


async def nearest_other(
    conn: asyncpg.Connection, row_id: int, vector: Vector, *, column: str = "embedding", watermark: int | None = None
) -> float | None:
    """Cosine distance from a stored vector to its nearest other one, found through the index at the connection's
    settings: a scale for ``search.calibration_queries``, not an answer to check."""
    found = await search_sql.candidates(
        conn,
        MemoryFilter(),
        vector=vector,
        text=None,
        limit=2,
        exact=False,
        full_rows=False,
        column=column,
        watermark=watermark,
    )
    distances = [c.distance for c in found if c.id != row_id and c.distance is not None]
    return min(distances) if distances else None


async def matching_at_least(conn: asyncpg.Connection, memory_filter: MemoryFilter, rows: int) -> bool:
    return await search_sql.count_matching(conn, memory_filter, cap=rows) >= rows


async def write(conn: asyncpg.Connection, calibration: Mapping[str, Any], key: str = CALIBRATION_KEY) -> None:
    await settings_sql.write_settings(conn, {key: json.dumps(calibration, sort_keys=True)})
