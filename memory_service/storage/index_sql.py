"""SQL for the vector index: its state, a row estimate that scans nothing, and a rebuild that never blocks writes.

One approximate index serves the embedding column at a time, ivfflat or HNSW, each under its own name so a switch
from one to the other is a rebuild like any other: the new index is built concurrently, swapped in, and the old one
dropped. ``maintenance_connection`` is the connection a rebuild and a calibration run on: its own, outside the
pool, holding the session advisory lock that lets one instance maintain the index at a time. When to rebuild and
how is policy and lives in ``memory_service.search.index_care``.

An HNSW index may be partial, ``WHERE graph_seq <= W``: the graph then covers the rows up to the watermark ``W``.
Every row created or rewritten takes the next ``graph_seq`` (migration 0013), so rows written after the build land
above it, in the tail, and are not inserted into the graph one by one (pgvector's per-row insert is a search at
``ef_construction`` through the buffer manager, about ten times the in-memory build's cost per row);
``search_sql`` searches them exactly beside the graph. The watermark is read back from the index's own predicate,
so it can never disagree with the index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg

from memory_service.models import IndexKind
from memory_service.storage.database import init_connection, translate_errors
from memory_service.storage.stats_sql import FED_ROWS_KEY, SMALL_TABLE_PAGES

KINDS: tuple[IndexKind, ...] = ("ivfflat", "hnsw")
NAMES: dict[IndexKind, str] = {"ivfflat": "memories_embedding_ivfflat", "hnsw": "memories_embedding_hnsw"}
COLUMNS = ("embedding", "embedding_alt")
"""The vector columns: the generation searches use, and during a move of embedding models the other one
(``storage.generations_sql``). Each has its own index and index settings."""
INDEX_SETTINGS = ("vector_index_rows_at_build", "vector_index_built_at", "vector_index_calibration")


def vector_column(column: str) -> str:
    """``column`` when it is one of ``COLUMNS``: the only way a column name gets into the SQL text."""
    if column not in COLUMNS:
        raise ValueError(f"not a vector column: {column!r}")
    return column


def index_name(column: str, kind: IndexKind) -> str:
    return NAMES[kind] if vector_column(column) == "embedding" else f"memories_{column}_{kind}"


def setting_key(base: str, column: str) -> str:
    """The memory.settings key of an index setting of ``column`` (the current column's keys are unsuffixed)."""
    return base if vector_column(column) == "embedding" else f"{base}:{column}"


# Held (session level, on a dedicated connection) by the one instance rebuilding; its bytes spell "memsvivf".
REBUILD_LOCK_KEY = 0x6D656D7376697666
_OPTION = re.compile(r"(lists|m|ef_construction)=(\d+)")
# pg_get_expr of ``WHERE graph_seq <= W``: ``(graph_seq <= 123)``, or ``(graph_seq <= '5000000000'::bigint)``.
_WATERMARK = re.compile(r"\(graph_seq <= '?(\d+)'?(?:::bigint)?\)")


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """What to build: the kind and its build parameters (``lists`` for ivfflat, ``m`` and ``ef_construction``
    for HNSW)."""

    kind: IndexKind
    lists: int = 0
    m: int = 16
    ef_construction: int = 64
    column: str = "embedding"
    watermark: int | None = None
    """HNSW only: the graph covers rows with ``graph_seq <= watermark`` (None: every row, each inserted as
    written)."""

    def using(self) -> str:
        if self.kind == "hnsw":
            options = f"m = {int(self.m)}, ef_construction = {int(self.ef_construction)}"
        else:
            options = f"lists = {int(self.lists)}"
        hnsw_partial = self.kind == "hnsw" and self.watermark is not None
        partial = f" WHERE graph_seq <= {int(self.watermark or 0)}" if hnsw_partial else ""
        return f"{self.kind} ({vector_column(self.column)} vector_cosine_ops) WITH ({options}){partial}"


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    exists: bool
    valid: bool
    kind: IndexKind | None = None
    lists: int = 0
    m: int = 0
    watermark: int | None = None
    """A partial HNSW index's ``W`` in ``WHERE graph_seq <= W``; None for an index of every row."""


async def index_info(conn: asyncpg.Connection, prefer: IndexKind, column: str = "embedding") -> IndexInfo:
    """The index searches use: of the kind ``prefer`` when one is there (a switch of kinds leaves the other one
    in use until the new one is built)."""
    names = {kind: index_name(column, kind) for kind in KINDS}
    rows = await conn.fetch(
        """
        SELECT c.relname AS name, i.indisvalid AS valid, c.reloptions AS options,
               pg_get_expr(i.indpred, i.indrelid) AS predicate
        FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'memory' AND c.relname = ANY($1::text[])
        """,
        list(names.values()),
    )
    found = {kind: row for kind in KINDS for row in rows if row["name"] == names[kind]}
    usable = [kind for kind in (prefer, *KINDS) if kind in found and found[kind]["valid"]]
    if not found:
        return IndexInfo(exists=False, valid=False)
    kind = usable[0] if usable else prefer if prefer in found else next(iter(found))
    options = {
        match.group(1): int(match.group(2))
        for option in found[kind]["options"] or ()
        if (match := _OPTION.fullmatch(option)) is not None
    }
    predicate = found[kind]["predicate"]
    watermark = _WATERMARK.fullmatch(predicate) if predicate else None
    return IndexInfo(
        exists=True,
        valid=bool(found[kind]["valid"]),
        kind=kind,
        lists=options.get("lists", 0),
        m=options.get("m", 0),
        watermark=int(watermark.group(1)) if watermark else None,
    )


_TAIL = {
    c: "SELECT count(*) FROM (SELECT 1 FROM memory.memories WHERE graph_seq > {w} AND " + c + " IS NOT NULL LIMIT $1) s"
    for c in COLUMNS
}


async def tail_rows(conn: asyncpg.Connection, watermark: int, column: str = "embedding", *, cap: int) -> int:
    """Rows with an embedding above a partial index's watermark (searched exactly), counted up to ``cap``: a range
    scan of ``memories_graph_tail`` from the watermark (a literal, so the planner sees it lies in that partial
    index), which reads the tail, never the graph's rows."""
    value: int = await conn.fetchval(_TAIL[vector_column(column)].format(w=int(watermark)), cap)
    return value


# The fed rows and the counter in one statement: committed together, so the counter is exact.
_FEED = {
    c: "WITH fed AS (UPDATE memory.memories m SET graph_seq = {w} FROM (SELECT id FROM memory.memories "
    + "WHERE graph_seq > {w} AND graph_seq <= $2 AND "
    + c
    + " IS NOT NULL ORDER BY graph_seq LIMIT $1 FOR UPDATE SKIP LOCKED) tail WHERE m.id = tail.id RETURNING m.id), "
    + "counted AS (INSERT INTO memory.settings (key, value) SELECT $3, count(*)::text FROM fed HAVING count(*) > 0 "
    + "ON CONFLICT (key) DO UPDATE SET value = (memory.settings.value::bigint + EXCLUDED.value::bigint)::text, "
    + "updated_at = clock_timestamp()) "
    + "SELECT count(*) FROM fed"
    for c in COLUMNS
}


async def feed_tail(
    conn: asyncpg.Connection, watermark: int, column: str = "embedding", *, rows: int, upto: int | None = None
) -> int:
    """Move up to ``rows`` of the oldest tail rows (up to ``graph_seq`` ``upto``, if given) into the graph without a
    rebuild; return how many moved.

    Lowering a row's ``graph_seq`` to the watermark makes its new version satisfy the partial index's predicate, so
    PostgreSQL inserts it into the graph as it writes the version: the graph grows by these rows and keeps its
    watermark, which a search statement names. Only ``graph_seq`` changes, which no history, change log or count
    follows (``FED_ROWS_KEY`` counts the rows). Rows a write holds locked are skipped and taken at the next call;
    one a write rewrote meanwhile is fed as its new version, since the update re-reads a row that changed under
    it."""
    limit = (1 << 63) - 1 if upto is None else upto
    moved: int = await conn.fetchval(_FEED[vector_column(column)].format(w=int(watermark)), rows, limit, FED_ROWS_KEY)
    return moved


async def next_watermark(conn: asyncpg.Connection) -> int:
    """The watermark of a graph about to be built: the highest ``graph_seq`` written so far.

    A row given a lower one by a transaction still open is covered all the same: CREATE INDEX CONCURRENTLY indexes
    every row its predicate takes, whenever it commits."""
    value: int = await conn.fetchval("SELECT coalesce(max(graph_seq), 0) FROM memory.memories WHERE graph_seq > 0")
    return value


_COUNT = {c: f"SELECT count(*) FROM memory.memories WHERE {c} IS NOT NULL" for c in COLUMNS}

# The planner's own estimate: tuples per page at the last VACUUM, ANALYZE or CREATE INDEX, times the pages the table
# has now, less the fraction of rows without an embedding. It reads the catalog and the file size, never the rows.
_ESTIMATE = """
SELECT c.reltuples, c.relpages, pg_relation_size(c.oid) / current_setting('block_size')::bigint AS pages,
       coalesce(s.null_frac, 0) AS null_frac
FROM pg_class c
LEFT JOIN pg_stats s ON s.schemaname = 'memory' AND s.tablename = 'memories' AND s.attname = $1
WHERE c.oid = 'memory.memories'::regclass
"""


async def row_count(conn: asyncpg.Connection, column: str = "embedding") -> int:
    """Rows with an embedding, counted exactly: a scan of the table."""
    value: int = await conn.fetchval(_COUNT[vector_column(column)])
    return value


# Live rows as the cumulative statistics count every committed insert and delete (lost on a crash or a reset).
_LIVE = "SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = 'memory.memories'::regclass"
_PLANNED = {c: f"EXPLAIN (FORMAT JSON) SELECT 1 FROM memory.memories WHERE {c} IS NOT NULL" for c in COLUMNS}


async def estimated_rows(conn: asyncpg.Connection, column: str = "embedding") -> int:
    """Rows with an embedding as the planner estimates them, without a scan.

    A table that was never analyzed has no statistics (``reltuples`` -1, or no pages when it was last looked at):
    a small one is counted; a large one (a bulk load autovacuum has not analyzed yet) takes the live rows the
    cumulative statistics counted, or, when those were reset, the planner's guess from its size, until the first
    ANALYZE.
    """
    row = await conn.fetchrow(_ESTIMATE, vector_column(column))
    if row["reltuples"] < 0 or row["relpages"] <= 0:
        if row["pages"] < SMALL_TABLE_PAGES:
            return await row_count(conn, column)
        live: int | None = await conn.fetchval(_LIVE)
        if live:
            return live
        plan = await conn.fetchval(_PLANNED[column])
        planned = json.loads(plan) if isinstance(plan, str) else plan
        return int(planned[0]["Plan"]["Plan Rows"])
    estimate: float = row["reltuples"] / row["relpages"] * row["pages"] * (1.0 - row["null_frac"])
    return round(estimate)


@contextlib.asynccontextmanager
async def maintenance_connection(dsn: str) -> AsyncIterator[asyncpg.Connection | None]:
    """A connection of its own holding the index maintenance lock, or None when another instance holds it.

    Outside the pool: the session advisory lock, ``maintenance_work_mem`` and the scan settings a calibration sets
    must last the whole job, and CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    """
    with translate_errors():
        conn = await asyncpg.connect(dsn)
        try:
            await init_connection(conn)
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK_KEY):
                yield None
                return
            try:
                await conn.execute("SET maintenance_work_mem = '512MB'")
                yield conn
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK_KEY)
        finally:
            try:
                await conn.close(timeout=5)
            except BaseException:  # cancelled or timed out while closing: drop the socket rather than leak it
                conn.terminate()
                raise


async def drop_leftovers(conn: asyncpg.Connection, kind: IndexKind, column: str = "embedding") -> None:
    """Drop what an interrupted rebuild left: an index it was building (invalid, but still written to by every
    insert and update) or the one it was retiring. ``conn`` must be outside a transaction."""
    name = index_name(column, kind)
    wanted = [name + "_building", name + "_retired"]
    # Looked up first: a DROP INDEX CONCURRENTLY waits for every open transaction on the table, even with nothing
    # to drop.
    found = await conn.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'memory'::regnamespace AND relname = ANY($1::text[])", wanted
    )
    for row in found:
        await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS memory.{row['relname']}")


async def rebuild(conn: asyncpg.Connection, spec: IndexSpec) -> datetime:
    """Build a new index concurrently and swap it in by renaming; drop any index of the other kind; return when
    the build finished. ``conn`` must be outside a transaction.

    CREATE INDEX CONCURRENTLY and DROP INDEX CONCURRENTLY let writes continue throughout; the renames take only a
    brief lock that does not conflict with reads or writes.
    """
    name = index_name(spec.column, spec.kind)
    building, retired = name + "_building", name + "_retired"
    await drop_leftovers(conn, spec.kind, spec.column)
    await conn.execute(f"CREATE INDEX CONCURRENTLY {building} ON memory.memories USING {spec.using()}")
    async with conn.transaction():
        await conn.execute(f"ALTER INDEX IF EXISTS memory.{name} RENAME TO {retired}")
        await conn.execute(f"ALTER INDEX memory.{building} RENAME TO {name}")
    await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS memory.{retired}")
    for other in KINDS:
        if other != spec.kind:
            await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS memory.{index_name(spec.column, other)}")
    built_at: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return built_at
