"""SQL for the embedding cache, keyed by (model, dimension, content hash)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import asyncpg

from memory_service.models import Vector
from memory_service.storage.command_tag import rows_affected


async def lookup(conn: asyncpg.Connection, model: str, dimension: int, hashes: Sequence[bytes]) -> dict[bytes, Vector]:
    rows = await conn.fetch(
        """
        SELECT content_hash, embedding FROM memory.embedding_cache
        WHERE model = $1 AND dimension = $2 AND content_hash = ANY($3::bytea[])
        """,
        model,
        dimension,
        list(hashes),
    )
    return {bytes(r["content_hash"]): r["embedding"] for r in rows}


async def insert(conn: asyncpg.Connection, model: str, dimension: int, entries: Sequence[tuple[bytes, Vector]]) -> None:
    await conn.executemany(
        """
        INSERT INTO memory.embedding_cache (model, dimension, content_hash, embedding)
        VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING
        """,
        [(model, dimension, digest, vector) for digest, vector in entries],
    )


async def evict_older_than(conn: asyncpg.Connection, age: timedelta, *, batch: int) -> int:
    """Delete up to ``batch`` entries created more than ``age`` ago, oldest first; return how many."""
    status = await conn.execute(
        """
        DELETE FROM memory.embedding_cache
        WHERE (model, dimension, content_hash) IN (
            SELECT model, dimension, content_hash FROM memory.embedding_cache
            WHERE created_at < clock_timestamp() - $1::interval
            ORDER BY created_at
            LIMIT $2)
        """,
        age,
        batch,
    )
    return rows_affected(status)
