"""SQL for the ivfflat index: its state, and a rebuild that never blocks writes."""

from __future__ import annotations

import dataclasses
import re

import asyncpg

INDEX = "memories_embedding_ivfflat"
_BUILDING = INDEX + "_building"
_RETIRED = INDEX + "_retired"
# Held (session level, on a dedicated connection) by the one instance rebuilding; spells "memsvivf".
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


async def row_count(conn: asyncpg.Connection) -> int:
    value: int = await conn.fetchval("SELECT count(*) FROM memory.memories WHERE embedding IS NOT NULL")
    return value


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
