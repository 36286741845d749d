"""The SQL behind BM25's corpus statistics: how much changed, and a refresh of the whole snapshot.

A refresh recomputes document frequencies with ``ts_stat`` over the live memories and writes only the lexemes whose
count changed, in one transaction, so a search sees either the old snapshot or the new one, never a mixture.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

import asyncpg

from memory_service.storage.filters import LIVE
from memory_service.storage.stats_sql import WRITES

# pg_try_advisory_xact_lock key: the ASCII bytes "ms-bm25" read as a big-endian integer.
_REFRESH_LOCK_KEY = int.from_bytes(b"ms-bm25", "big")

_SNAPSHOT = "SELECT docs, total_length, writes_seen, refreshed_at FROM memory.text_corpus"

# One statement, so the frequencies, the totals and the write count come from one snapshot, taken after the lock
# is held (a snapshot taken before it could miss a refresh that committed in between). ts_stat runs the query it is
# given; only this fixed one is ever passed.
_REFRESH = f"""
WITH fresh AS MATERIALIZED (
    SELECT word AS lexeme, ndoc::integer AS df
    FROM ts_stat('SELECT m.search_tsv FROM memory.memories m WHERE {LIVE.replace("'", "''")}')
),
gone AS (
    DELETE FROM memory.text_terms t WHERE NOT EXISTS (SELECT 1 FROM fresh f WHERE f.lexeme = t.lexeme)
),
terms AS (
    INSERT INTO memory.text_terms AS t (lexeme, df) SELECT lexeme, df FROM fresh
    ON CONFLICT (lexeme) DO UPDATE SET df = EXCLUDED.df WHERE t.df <> EXCLUDED.df
)
INSERT INTO memory.text_corpus AS c (docs, total_length, writes_seen, refreshed_at)
SELECT count(*), coalesce(sum(length(m.search_tsv)), 0), coalesce(({WRITES}), 0), clock_timestamp()
FROM memory.memories m WHERE {LIVE}
ON CONFLICT (singleton) DO UPDATE
SET docs = EXCLUDED.docs, total_length = EXCLUDED.total_length, writes_seen = EXCLUDED.writes_seen,
    refreshed_at = EXCLUDED.refreshed_at
RETURNING docs
"""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """When the statistics were taken and what they cover."""

    docs: int
    total_length: int
    writes_seen: int
    refreshed_at: datetime


async def snapshot(conn: asyncpg.Connection) -> Snapshot | None:
    row = await conn.fetchrow(_SNAPSHOT)
    if row is None:
        return None
    return Snapshot(row["docs"], row["total_length"], row["writes_seen"], row["refreshed_at"])


async def refresh(conn: asyncpg.Connection) -> int | None:
    """Recompute the statistics (inside the caller's read-committed transaction, which holds the lock until it
    ends); None when another session is refreshing."""
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _REFRESH_LOCK_KEY):
        return None
    docs: int = await conn.fetchval(_REFRESH)
    return docs
