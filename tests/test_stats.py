"""Stats counts: exact on a small or never-analyzed table, the planner's estimates past it, and never a scan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import asyncpg
import pytest

from bench.datasets import clustered, copy_into_memories, records
from memory_service.memories.stats import Stats, collect
from memory_service.models import Scope
from memory_service.search.index_care import IndexCare
from memory_service.storage import index_sql, settings_sql, stats_sql
from memory_service.storage.database import Database, init_connection

# Enough rows with 384-dimension embeddings (about four to a page) to pass SMALL_TABLE_PAGES. "global" has one row,
# which ANALYZE leaves out of the most-common values (it lists only values seen more than once); "circle" is listed
# but below EXACT_BELOW. Both are counted exactly; the three others are estimated.
MIX = {"project": 6000, "agent": 3000, "conversation": 1500, "circle": 400, "global": 1}
EXPIRED = 20  # agent rows whose expires_at has passed
CACHE_ENTRIES = 6000  # about five to a page: past SMALL_TABLE_PAGES too


async def load(conn: asyncpg.Connection, mix: Mapping[str, int], *, batch: int) -> None:
    """``mix[scope]`` memories of each scope, with keys of their own in ``batch``."""
    for n, (scope, rows) in enumerate(mix.items()):
        if not rows:
            continue
        corpus = clustered(rows, topics=5, seed=batch * 10 + n)
        await copy_into_memories(
            conn,
            [
                (scope, 0 if scope == "global" else r[1], f"{r[2]}-{batch}", *r[3:])
                for r in records(corpus, model="hash-ngram-v1")
            ],
        )


async def analyze(conn: asyncpg.Connection) -> None:
    await conn.execute("ANALYZE memory.memories; ANALYZE memory.embedding_cache")


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a database where only the test analyzes: autovacuum is off for the two counted tables."""
    connection = await asyncpg.connect(database_url)
    await init_connection(connection)
    await connection.execute(
        "ALTER TABLE memory.memories SET (autovacuum_enabled = false);"
        "ALTER TABLE memory.embedding_cache SET (autovacuum_enabled = false)"
    )
    async with connection.transaction():  # rows copied behind the service's back bind the model as a Store would
        await settings_sql.bind_embedding_model(connection, "hash-ngram-v1", 384)
    yield connection
    await connection.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """The service's pool, of one connection: the test can flush that backend's statistics after a Stats call."""
    database = await Database.connect(database_url, min_size=1, max_size=1)
    yield database
    await database.close()


async def stats(db: Database) -> Stats:
    return await collect(
        db,
        IndexCare(db, db.dsn, exact_max_rows=100_000),
        embedding_model="hash-ngram-v1",
        dimension=384,
        postgres_version="",
        pgvector_version="",
        iterative_scan=False,
    )


async def load_past_the_small_table(conn: asyncpg.Connection) -> None:
    await load(conn, MIX, batch=0)
    await conn.execute(
        """
        UPDATE memory.memories SET expires_at = now() - interval '1 hour'
        WHERE id IN (SELECT id FROM memory.memories WHERE scope = 'agent' ORDER BY id LIMIT $1)
        """,
        EXPIRED,
    )
    await conn.execute(
        """
        INSERT INTO memory.embedding_cache (model, dimension, content_hash, embedding)
        SELECT 'hash-ngram-v1', 384, sha256(i::text::bytea), array_fill(i::real, ARRAY[384])::vector
        FROM generate_series(1, $1) AS i
        """,
        CACHE_ENTRIES,
    )
    pages = await conn.fetchval(
        "SELECT least(pg_relation_size('memory.memories'), pg_relation_size('memory.embedding_cache')) / 8192"
    )
    assert pages >= stats_sql.SMALL_TABLE_PAGES, "the tables must be past the exact fallback"


async def test_a_never_analyzed_small_table_is_counted_exactly(conn: asyncpg.Connection, db: Database) -> None:
    await load(conn, {"project": 300, "agent": 50, "global": 1}, batch=0)
    await conn.execute("UPDATE memory.memories SET expires_at = now() - interval '1 second' WHERE key LIKE 'row-1_-%'")
    await conn.execute(
        "INSERT INTO memory.embedding_cache (model, dimension, content_hash, embedding) "
        "VALUES ('m', 3, '\\x01', '[1,2,3]'), ('m', 3, '\\x02', '[1,2,3]')"
    )
    never_analyzed = "SELECT count(*) = 0 FROM pg_stats WHERE schemaname = 'memory' AND tablename = 'memories'"
    assert await conn.fetchval(never_analyzed)

    got = await stats(db)

    # keys row-10 .. row-19 of project and of agent have expired
    assert got.by_scope == {Scope.PROJECT: 290, Scope.AGENT: 40, Scope.GLOBAL: 1}
    assert got.memories == 331
    assert got.expired_pending_purge == 20
    assert got.embedding_cache_entries == 2
    assert not got.counts_estimated


async def test_counts_past_a_small_table_follow_the_truth_after_analyze(conn: asyncpg.Connection, db: Database) -> None:
    await load_past_the_small_table(conn)
    await analyze(conn)
    # Then 10% more rows of the same mix: the estimate follows the table's size without another ANALYZE.
    await load(conn, {scope: rows // 10 for scope, rows in MIX.items()}, batch=1)
    truth = {
        Scope(r["scope"]): r["n"]
        for r in await conn.fetch(
            "SELECT scope::text AS scope, count(*) AS n FROM memory.memories "
            "WHERE expires_at IS NULL OR expires_at > now() GROUP BY scope"
        )
    }
    assert truth[Scope.PROJECT] == 6600 and truth[Scope.AGENT] == 3300 - EXPIRED  # the data is what we think

    got = await stats(db)

    assert got.counts_estimated
    assert set(got.by_scope) == set(truth)
    for scope in (Scope.PROJECT, Scope.AGENT, Scope.CONVERSATION):
        assert got.by_scope[scope] == pytest.approx(truth[scope], rel=0.03), scope
    assert got.by_scope[Scope.CIRCLE] == 440  # listed, but expected below EXACT_BELOW: counted
    assert got.by_scope[Scope.GLOBAL] == 1  # not listed: counted
    assert got.memories == pytest.approx(sum(truth.values()), rel=0.02)
    assert got.expired_pending_purge == EXPIRED
    assert got.embedding_cache_entries == pytest.approx(CACHE_ENTRIES, rel=0.02)

    # Expired rows leave their own scope's count; past EXACT_BELOW their number is the planner's estimate.
    await conn.execute(
        "UPDATE memory.memories SET expires_at = now() - interval '1 minute' "
        "WHERE scope = 'conversation' AND key LIKE '%-0'"
    )
    await analyze(conn)
    got = await stats(db)
    assert got.expired_pending_purge == pytest.approx(EXPIRED + 1500, rel=0.05)
    assert got.by_scope[Scope.CONVERSATION] == 150  # the rows of the second batch, counted once they are few
    assert got.by_scope[Scope.AGENT] == pytest.approx(truth[Scope.AGENT], rel=0.03)


async def sequential_scans(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT relname, seq_scan FROM pg_stat_user_tables "
        "WHERE schemaname = 'memory' AND relname IN ('memories', 'embedding_cache')"
    )
    return {r["relname"]: r["seq_scan"] for r in rows}


async def flush_statistics(db: Database) -> None:
    """Publish the pool's one backend's pending table statistics: it flushes them before its next ReadyForQuery."""
    async with db.connection() as pooled:
        await pooled.execute("SELECT pg_stat_force_next_flush()")


async def test_a_stats_call_scans_neither_table(conn: asyncpg.Connection, db: Database) -> None:
    await load_past_the_small_table(conn)
    await analyze(conn)
    await flush_statistics(db)
    before = await sequential_scans(conn)

    for _ in range(7):  # past the five custom plans after which a prepared statement may switch to a generic one
        got = await stats(db)
    await flush_statistics(db)

    assert await sequential_scans(conn) == before
    assert got.counts_estimated and got.by_scope[Scope.GLOBAL] == 1  # the capped counts ran, through indexes


async def test_index_care_estimates_a_large_unanalyzed_table_without_a_scan(
    conn: asyncpg.Connection, db: Database
) -> None:
    # A bulk load autovacuum has not analyzed yet: the index policy, checked every minute, must not count it.
    await load_past_the_small_table(conn)
    await conn.execute("SELECT pg_stat_force_next_flush()")  # the loader's inserts reach the cumulative statistics
    await flush_statistics(db)
    before = await sequential_scans(conn)
    async with db.connection() as pooled:
        estimate = await index_sql.estimated_rows(pooled)
    await flush_statistics(db)
    assert (await sequential_scans(conn))["memories"] == before["memories"]
    assert estimate == pytest.approx(sum(MIX.values()), rel=0.01)  # the live rows the statistics counted
