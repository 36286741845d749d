"""SQL for the ivfflat index: its state, a row estimate that scans nothing, and a rebuild that never blocks writes.

``rebuild_exclusively`` is the whole rebuild: its own connection, the session advisory lock that lets one instance
build at a time, the build settings, the build and the record of it. When to rebuild and with how many lists is
policy and lives in ``memory_service.search.index_care``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from datetime import datetime

import asyncpg

from memory_service.storage import settings_sql
from memory_service.storage.database import translate_errors

log = logging.getLogger(__name__)

INDEX = "memories_embedding_ivfflat"
_BUILDING = INDEX + "_building"
_RETIRED = INDEX + "_retired"
# Held (session level, on a dedicated connection) by the one instance rebuilding; its bytes spell "memsvivf".
REBUILD_LOCK_KEY = 0x6D656D7376697666
_LISTS = re.compile(r"lists=(\d+)")


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    exists: bool
    valid: bool
    lists: int


async def index_info(conn: asyncpg.Connection) -> IndexInfo:
    row = await conn.fetchrow(
        """
        SELECT i.indisvalid AS valid, c.reloptions AS options
        FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'memory' AND c.relname = $1
        """,
        INDEX,
    )
    if row is None:
        return IndexInfo(exists=False, valid=False, lists=0)
    lists = 0
    for option in row["options"] or ():
        if (match := _LISTS.fullmatch(option)) is not None:
            lists = int(match.group(1))
    return IndexInfo(exists=True, valid=bool(row["valid"]), lists=lists)


_COUNT = "SELECT count(*) FROM memory.memories WHERE embedding IS NOT NULL"

# The planner's own estimate: tuples per page at the last VACUUM, ANALYZE or CREATE INDEX, times the pages the table
# has now, less the fraction of rows without an embedding. It reads the catalog and the file size, never the rows.
_ESTIMATE = """
SELECT c.reltuples, c.relpages, pg_relation_size(c.oid) / current_setting('block_size')::bigint AS pages,
       coalesce(s.null_frac, 0) AS null_frac
FROM pg_class c
LEFT JOIN pg_stats s ON s.schemaname = 'memory' AND s.tablename = 'memories' AND s.attname = 'embedding'
WHERE c.oid = 'memory.memories'::regclass
"""


async def row_count(conn: asyncpg.Connection) -> int:
    """Rows with an embedding, counted exactly: a scan of the table."""
    value: int = await conn.fetchval(_COUNT)
    return value


async def estimated_rows(conn: asyncpg.Connection) -> int:
    """Rows with an embedding as the planner estimates them, without a scan.

    A table that was never analyzed has no estimate (``reltuples`` -1, or no pages when it was last looked at); it is
    counted exactly until autovacuum first analyzes it, which happens soon after it grows.
    """
    row = await conn.fetchrow(_ESTIMATE)
    if row["reltuples"] < 0 or row["relpages"] <= 0:
        return await row_count(conn)
    estimate: float = row["reltuples"] / row["relpages"] * row["pages"] * (1.0 - row["null_frac"])
    return round(estimate)


@dataclasses.dataclass(frozen=True)
class Rebuilt:
    rows: int
    lists: int


async def rebuild_exclusively(dsn: str, lists_for: Callable[[int], int]) -> Rebuilt | None:
    """Count the rows, rebuild with ``lists_for(rows)`` lists, and record the build; None when another instance is
    rebuilding.

    Runs on a connection of its own, outside the pool: the session advisory lock and ``maintenance_work_mem`` must
    last the whole build, and CREATE INDEX CONCURRENTLY cannot run inside a transaction. The exact count is paid
    once per build, next to a build that reads every row anyway.
    """
    with translate_errors():
        conn = await asyncpg.connect(dsn)
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK_KEY):
                return None
            try:
                rows = await row_count(conn)
                lists = lists_for(rows)
                log.info("building ivfflat index: %d rows, lists=%d", rows, lists)
                await conn.execute("SET maintenance_work_mem = '512MB'")
                await rebuild(conn, lists=lists)
                built_at: datetime = await conn.fetchval("SELECT clock_timestamp()")
                await settings_sql.write_settings(
                    conn, {"ivfflat_rows_at_build": str(rows), "ivfflat_built_at": built_at.isoformat()}
                )
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK_KEY)
        finally:
            await conn.close()
    return Rebuilt(rows=rows, lists=lists)


async def rebuild(conn: asyncpg.Connection, *, lists: int) -> None:
    """Build a new index concurrently and swap it in by renaming; ``conn`` must be outside a transaction.

    CREATE INDEX CONCURRENTLY and DROP INDEX CONCURRENTLY let writes continue throughout; the renames take only a
    brief lock that does not conflict with reads or writes.
    """
    await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS memory.{_BUILDING}")
    await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS memory.{_RETIRED}")
    await conn.execute(
        f"CREATE INDEX CONCURRENTLY {_BUILDING} ON memory.memories "
        f"USING ivfflat (embedding vector_cosine_ops) WITH (lists = {int(lists)})"
    )
    async with conn.transaction():
        await conn.execute(f"ALTER INDEX IF EXISTS memory.{INDEX} RENAME TO {_RETIRED}")
        await conn.execute(f"ALTER INDEX memory.{_BUILDING} RENAME TO {INDEX}")
    await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS memory.{_RETIRED}")
