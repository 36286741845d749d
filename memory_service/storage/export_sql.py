"""Reading every live memory of some scopes in id order, a batch at a time, from one snapshot (``export``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg

from memory_service.models import Memory, MemoryFilter
from memory_service.storage.filters import Params, where_clause
from memory_service.storage.memories_sql import COLUMNS, COLUMNS_WITH_EMBEDDING, memory_from_row


async def memories(
    conn: asyncpg.Connection, memory_filter: MemoryFilter, *, with_embedding: bool, batch: int = 1000
) -> AsyncIterator[Memory]:
    """Live memories matching ``memory_filter``, by id, through a server-side cursor: ``batch`` rows in memory at
    a time, whatever the table's size. Runs in the caller's transaction (a cursor needs one), whose snapshot
    every row comes from."""
    params = Params()
    where = where_clause(memory_filter, params)
    columns = COLUMNS_WITH_EMBEDDING if with_embedding else COLUMNS
    sql = f"SELECT {columns} FROM memory.memories m WHERE {where} ORDER BY m.id"
    async for row in conn.cursor(sql, *params.values, prefetch=batch):
        yield memory_from_row(row)
