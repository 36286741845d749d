"""The SQL behind BM25's corpus statistics: how much changed, and a refresh of the whole snapshot.

A refresh recomputes document frequencies with ``ts_stat`` over the live memories and writes only the lexemes whose
count changed, in one transaction, so a search sees either the old snapshot or the new one, never a mixture.

It reads first and writes last: the scan (seconds on a large table) is one read-only statement, and only the short
write of what changed draws a transaction id. The change feed delivers nothing past a transaction that holds one
(``changes_sql.frontier_probe``), so a refresh that wrote first would hold every Watch stream back for the whole
scan.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

import asyncpg

from memory_service.storage.filters import LIVE
from memory_service.storage.stats_sql import FED_ROWS, WRITES, settings_count

# pg_try_advisory_xact_lock key: the ASCII bytes "ms-bm25" read as a big-endian integer.
_REFRESH_LOCK_KEY = int.from_bytes(b"ms-bm25", "big")

_FED_SEEN_KEY = "text_stats_fed_rows"
"""memory.settings: ``stats_sql.FED_ROWS_KEY``'s count when the statistics were taken (written once there is one:
a database that never fed a row keeps no setting for it)."""

_SNAPSHOT = f"""
SELECT docs, total_length, writes_seen, refreshed_at,
       {settings_count(_FED_SEEN_KEY)} AS fed_seen
FROM memory.text_corpus
"""

# One statement, so the frequencies, the totals and the write count come from one snapshot, taken after the lock
# is held (a snapshot taken before it could miss a refresh that committed in between). It only reads: it answers the
# lexemes whose frequency differs from the stored one (0: no live memory has it any more) and the totals. ts_stat
# runs the query it is given; only this fixed one is ever passed.
_READ = f"""
WITH fresh AS MATERIALIZED (
    SELECT word AS lexeme, ndoc::integer AS df
    FROM ts_stat('SELECT m.search_tsv FROM memory.memories m WHERE {LIVE.replace("'", "''")}')
),
changed AS MATERIALIZED (
    SELECT coalesce(f.lexeme, t.lexeme) AS lexeme, coalesce(f.df, 0) AS df
    FROM fresh f FULL JOIN memory.text_terms t ON t.lexeme = f.lexeme
    WHERE f.df IS DISTINCT FROM t.df
)
SELECT (SELECT coalesce(array_agg(lexeme ORDER BY lexeme), '{{}}') FROM changed) AS lexemes,
       (SELECT coalesce(array_agg(df ORDER BY lexeme), '{{}}') FROM changed) AS dfs,
       count(*) AS docs, coalesce(sum(length(m.search_tsv)), 0) AS total_length, coalesce(({WRITES}), 0) AS writes,
       {FED_ROWS} AS fed
FROM memory.memories m WHERE {LIVE}
"""

# The write: the changed lexemes and the totals the read computed, in one short statement.
_WRITE = f"""
WITH changes AS (SELECT * FROM unnest($1::text[], $2::integer[]) AS c(lexeme, df)),
fed AS (
    INSERT INTO memory.settings (key, value) SELECT '{_FED_SEEN_KEY}', $6::bigint::text WHERE $6::bigint > 0
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = clock_timestamp()
),
gone AS (
    DELETE FROM memory.text_terms t USING changes c WHERE c.df = 0 AND t.lexeme = c.lexeme
),
terms AS (
    INSERT INTO memory.text_terms AS t (lexeme, df) SELECT lexeme, df FROM changes WHERE df > 0
    ON CONFLICT (lexeme) DO UPDATE SET df = EXCLUDED.df
)
INSERT INTO memory.text_corpus AS c (docs, total_length, writes_seen, refreshed_at)
VALUES ($3, $4, $5, clock_timestamp())
ON CONFLICT (singleton) DO UPDATE
SET docs = EXCLUDED.docs, total_length = EXCLUDED.total_length, writes_seen = EXCLUDED.writes_seen,
    refreshed_at = EXCLUDED.refreshed_at
"""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """When the statistics were taken and what they cover."""

    docs: int
    total_length: int
    writes_seen: int
    refreshed_at: datetime
    fed_seen: int = 0
    """Rows fed into an HNSW graph by then (``stats_sql.FED_ROWS_KEY``)."""


async def snapshot(conn: asyncpg.Connection) -> Snapshot | None:
    row = await conn.fetchrow(_SNAPSHOT)
    if row is None:
        return None
    return Snapshot(row["docs"], row["total_length"], row["writes_seen"], row["refreshed_at"], row["fed_seen"])


async def refresh(conn: asyncpg.Connection) -> int | None:
    """Recompute the statistics (inside the caller's read-committed transaction, which holds the lock until it
    ends); None when another session is refreshing."""
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _REFRESH_LOCK_KEY):
        return None
    read = await conn.fetchrow(_READ)
    assert read is not None
    await conn.execute(
        _WRITE, read["lexemes"], read["dfs"], read["docs"], read["total_length"], read["writes"], read["fed"]
    )
    docs: int = read["docs"]
    return docs
