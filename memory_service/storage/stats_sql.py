"""SQL for operator statistics."""

from __future__ import annotations

import asyncpg


async def counts_by_scope(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        """
        SELECT scope::text AS scope, count(*) AS n FROM memory.memories
        WHERE expires_at IS NULL OR expires_at > clock_timestamp() GROUP BY scope
        """
    )
    return {r["scope"]: r["n"] for r in rows}


async def expired_pending(conn: asyncpg.Connection) -> int:
    value: int = await conn.fetchval("SELECT count(*) FROM memory.memories WHERE expires_at <= clock_timestamp()")
    return value
