"""SQL for operator statistics: counts whose cost does not grow with the table.

Counting rows is a scan, so the large counts come from the planner's own statistics instead: tuples per page at
the last ANALYZE (or VACUUM, or CREATE INDEX) times the pages the table has now, and for each scope its share in the
column's most-common-values list. Those are refreshed by autovacuum's ANALYZE, which runs once about 10% of a
table's rows changed since the last one (``autovacuum_analyze_scale_factor``), so a share is as old as that ANALYZE
and a total follows the table's size at once. What the statistics cannot say well is counted exactly, through an
index and never past ``EXACT_BELOW`` rows: a scope the statistics put below that (or do not list), and the expired
rows still waiting for the purge.

A table smaller than ``SMALL_TABLE_PAGES``, or one not analyzed yet (autovacuum analyzes a table soon after it first
grows), is counted exactly: that scan costs a few milliseconds, or happens only until the first ANALYZE.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

SMALL_TABLE_PAGES = 1_000
"""Tables below this many pages (8 MB: about 4,000 memories with 384-dimension embeddings) are counted exactly."""
EXACT_BELOW = 1_000
"""Counts the statistics put below this are taken exactly through an index, reading at most this many rows."""

# Rows inserted, updated and deleted in memory.memories, from the cumulative statistics: a counter that only grows
# (until a statistics reset or a crash), read without touching the table. What "the data changed enough" is measured
# from, for BM25's corpus statistics and for the vector index's calibration.
WRITES = """
SELECT coalesce(n_tup_ins + n_tup_upd + n_tup_del, 0) FROM pg_stat_user_tables
WHERE relid = 'memory.memories'::regclass
"""

# One statement: each table's planner figures, and what ANALYZE recorded about memories.scope (pg_stats has no
# row for it until the first ANALYZE). pg_relation_size reads the file size, not the rows.
_CATALOG = """
SELECT c.relname AS relation, c.reltuples, c.relpages,
       pg_relation_size(c.oid) / current_setting('block_size')::bigint AS pages,
       CASE WHEN c.relname = 'memories' THEN enum_range(NULL::memory.scope)::text[] END AS scopes,
       s.attname IS NOT NULL AS analyzed, s.most_common_vals::text::text[] AS common, s.most_common_freqs AS freqs
FROM pg_class c
LEFT JOIN pg_stats s
    ON c.relname = 'memories' AND s.schemaname = 'memory' AND s.tablename = 'memories' AND s.attname = 'scope'
    AND NOT s.inherited
WHERE c.oid IN ('memory.memories'::regclass, 'memory.embedding_cache'::regclass)
"""

# One scan of a small (or never analyzed) table: live memories per scope and the expired ones beside them.
_EXACT_MEMORIES = """
SELECT m.scope::text AS scope,
       count(*) FILTER (WHERE m.expires_at IS NULL OR m.expires_at > now()) AS live,
       count(*) FILTER (WHERE m.expires_at <= now()) AS expired
FROM memory.memories m GROUP BY m.scope
"""

_EXACT_CACHE = "SELECT count(*) FROM memory.embedding_cache"

# The capped counts read an index in its order and stop at the cap. A plain index scan is the one plan whose cost
# the cap bounds whatever the statistics say: a bitmap scan collects every match before it stops, and a sequential
# scan under a LIMIT may read the whole table before it finds the rows it was told are there.
_CAPPED_SETTINGS = "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off"

_CAPPED_SCOPE = """
SELECT count(*) FROM (
    SELECT 1 FROM memory.memories m
    WHERE m.scope = $1::memory.scope AND (m.expires_at IS NULL OR m.expires_at > now())
    ORDER BY m.scope_id, m.id LIMIT $2
) AS capped
"""

# The first expired rows by expires_at, by scope: all of them while they are fewer than the cap (the purge keeps
# them few), otherwise a sample of how they split.
_CAPPED_EXPIRED = """
SELECT e.scope::text AS scope, count(*) AS n FROM (
    SELECT m.scope FROM memory.memories m WHERE m.expires_at <= now() ORDER BY m.expires_at LIMIT $1
) AS e GROUP BY e.scope
"""

# The planner's estimate of the expired rows (its histogram of expires_at), read from the plan: no row is read.
_PLANNED_EXPIRED = "EXPLAIN (FORMAT JSON) SELECT 1 FROM memory.memories m WHERE m.expires_at <= now()"


FED_ROWS_KEY = "vector_index_fed_rows"
"""memory.settings: rows ever fed into an HNSW graph (``index_sql.feed_tail``, every column's). Each is an UPDATE that
``WRITES`` counts although no data changed, so what "the data changed enough" is measured from leaves them out. The
counter starts at 0 with this key, as do the fed counts stored beside what it is compared with."""


def settings_count(key: str) -> str:
    """A count kept in memory.settings under ``key``, as an SQL expression (0 while unset)."""
    return f"coalesce((SELECT value::bigint FROM memory.settings WHERE key = '{key}'), 0)"


FED_ROWS = settings_count(FED_ROWS_KEY)


async def writes_and_fed(conn: asyncpg.Connection) -> tuple[int, int]:
    """``writes_so_far`` and the rows fed into a graph so far (``FED_ROWS_KEY``), in one round trip."""
    row = await conn.fetchrow(f"SELECT ({WRITES}) AS writes, {FED_ROWS} AS fed")
    assert row is not None
    return row["writes"] or 0, row["fed"]


async def writes_so_far(conn: asyncpg.Connection) -> int:
    """Rows inserted, updated and deleted in memory.memories since the statistics' last reset (``WRITES``)."""
    value: int | None = await conn.fetchval(WRITES)
    return value or 0


@dataclasses.dataclass(frozen=True)
class Counts:
    by_scope: dict[str, int]
    """Live (unexpired) memories per scope label; scopes with none are left out."""
    expired_pending_purge: int
    embedding_cache_entries: int
    estimated: bool
    """Whether any of the numbers came from the planner's statistics rather than a count."""


@dataclasses.dataclass(frozen=True)
class _Relation:
    reltuples: float
    relpages: int
    pages: int

    def estimate(self) -> int | None:
        """Rows as the planner would estimate them; None when the table is small or has no statistics yet."""
        if self.pages < SMALL_TABLE_PAGES or self.reltuples < 0 or self.relpages <= 0:
            return None
        return round(self.reltuples / self.relpages * self.pages)


async def counts(conn: asyncpg.Connection) -> Counts:
    """Memories per scope, expired memories and cache entries, at a cost bounded whatever the tables' sizes."""
    rows = {r["relation"]: r for r in await conn.fetch(_CATALOG)}
    memories, cache = rows["memories"], rows["embedding_cache"]
    cache_rows = _relation(cache).estimate()
    total = _relation(memories).estimate()
    # Repeatable read: every count from one snapshot. The transaction also bounds the SET LOCAL of the capped counts.
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cache_entries: int = cache_rows if cache_rows is not None else await conn.fetchval(_EXACT_CACHE)
        if total is None or not memories["analyzed"]:
            by_scope, expired_rows = await _exact_memories(conn)
            return Counts(by_scope, expired_rows, cache_entries, estimated=cache_rows is not None)
        await conn.execute(_CAPPED_SETTINGS)
        expired = await _expired_by_scope(conn)
        shares = dict(zip(memories["common"] or (), memories["freqs"] or (), strict=True))
        by_scope = await _estimated_by_scope(conn, memories["scopes"], shares, total, expired)
    return Counts(by_scope, sum(expired.values()), cache_entries, estimated=True)


def _relation(row: Mapping[str, Any]) -> _Relation:
    return _Relation(reltuples=row["reltuples"], relpages=row["relpages"], pages=row["pages"])


async def _exact_memories(conn: asyncpg.Connection) -> tuple[dict[str, int], int]:
    rows = await conn.fetch(_EXACT_MEMORIES)
    return {r["scope"]: r["live"] for r in rows if r["live"]}, sum(r["expired"] for r in rows)


async def _expired_by_scope(conn: asyncpg.Connection) -> dict[str, int]:
    """Expired rows per scope: counted below the cap, the planner's estimate split as the first ones are beyond."""
    counted = {r["scope"]: r["n"] for r in await conn.fetch(_CAPPED_EXPIRED, EXACT_BELOW)}
    seen = sum(counted.values())
    if seen < EXACT_BELOW:
        return counted
    plan = await conn.fetchval(_PLANNED_EXPIRED)
    planned = json.loads(plan) if isinstance(plan, str) else plan
    rows: float = planned[0]["Plan"]["Plan Rows"]
    scale = max(1.0, rows / seen)
    return {scope: round(n * scale) for scope, n in counted.items()}


async def _estimated_by_scope(
    conn: asyncpg.Connection,
    scopes: Sequence[str],
    shares: Mapping[str, float],
    total: int,
    expired: Mapping[str, int],
) -> dict[str, int]:
    """Each scope's share of the rows less its expired ones; scopes expected below ``EXACT_BELOW`` are counted.

    Scopes absent from the most-common values share what the listed ones leave (the planner's own rule); a scope
    ANALYZE did not list is rare, and its count through the index stops at the cap anyway.
    """
    unlisted = max(0.0, 1.0 - sum(shares.values())) / max(1, len(scopes) - len(shares))
    result: dict[str, int] = {}
    for scope in scopes:
        expected = max(0, round(shares.get(scope, unlisted) * total) - expired.get(scope, 0))
        if scope in shares and expected >= EXACT_BELOW:
            count = expected
        else:
            count = await conn.fetchval(_CAPPED_SCOPE, scope, EXACT_BELOW)
            if count >= EXACT_BELOW:  # statistics older than the scope's growth
                count = max(count, expected)
        if count:
            result[scope] = count
    return result


async def granted_counts(conn: asyncpg.Connection, *, every_scope: bool) -> dict[str, int]:
    """Memories per scope kind within the call's grants (``memory.grants``), from the per-scope counts of migration
    0011: exact, and read through an index whatever the table's size. Expired memories count until purged."""
    rows = await conn.fetch(
        """
        SELECT scope::text AS scope, sum(memories)::bigint AS n FROM memory.scope_usage
        WHERE $1::boolean OR memory.granted(scope, scope_id) GROUP BY scope
        """,
        every_scope,
    )
    return {row["scope"]: row["n"] for row in rows if row["n"]}
