"""The ivfflat index: none on small tables, fitted lists past the threshold, rebuilt on growth, concurrently."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bench.datasets import clustered, copy_into_memories, records
from memory_service.search.index_policy import IndexState, fitted_lists, fitted_probes, needs_rebuild
from memory_service.storage import settings_sql
from memory_service.storage.database import init_connection
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env

THRESHOLD = 500


@pytest.fixture
async def small_threshold_server(database_url: str) -> AsyncIterator[RunningServer]:
    # The tests call maintain() themselves; the background check (every 60 s by default) would race them on a slow
    # run and do the rebuild a test then expects to do.
    running = await start_server(
        test_env(database_url, VECTOR_INDEX="ivfflat", EXACT_SEARCH_MAX_ROWS=str(THRESHOLD), INDEX_CHECK_INTERVAL="1h")
    )
    yield running
    await stop_server(running)


async def load(database_url: str, rows: int, *, seed: int, offset: int = 0) -> None:
    corpus = clustered(rows, topics=20, seed=seed)
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        async with conn.transaction():  # rows copied behind the service's back bind the model as a Store would
            await settings_sql.bind_embedding_model(conn, "hash-ngram-v1", 384)
        batch = [(r[0], r[1], f"{r[2]}-{offset}", *r[3:]) for r in records(corpus, model="hash-ngram-v1")]
        await copy_into_memories(conn, batch)
        # The policy watches the planner's estimate: fresh statistics make it exact here, so whether autovacuum has
        # got round to the table yet (it once had not, on a loaded machine) cannot decide a rebuild.
        await conn.execute("ANALYZE memory.memories")
    finally:
        await conn.close()


def test_lists_and_probes_follow_pgvector_guidance() -> None:
    assert fitted_lists(30_000) == 30
    assert fitted_lists(1_000_000) == 1000
    assert fitted_lists(4_000_000) == 2000
    assert fitted_lists(100) == 10
    assert fitted_probes(100) == 10
    assert fitted_probes(1) == 1


def test_rebuild_policy_needs_no_database() -> None:
    built = IndexState(exists=True, valid=True, kind="ivfflat", lists=10, rows=10_000, rows_at_build=10_000)
    assert not needs_rebuild(IndexState(rows=499), exact_max_rows=500)
    assert needs_rebuild(IndexState(rows=500), exact_max_rows=500)  # past the threshold with no index
    assert needs_rebuild(IndexState(exists=True, valid=False, lists=10, rows=600), exact_max_rows=500)
    assert not needs_rebuild(built, exact_max_rows=500)
    assert not needs_rebuild(dataclasses.replace(built, rows=19_999), exact_max_rows=500)
    assert needs_rebuild(dataclasses.replace(built, rows=20_000), exact_max_rows=500)  # doubled since the build


async def test_small_table_keeps_no_index_then_builds_and_rebuilds_on_growth(
    small_threshold_server: RunningServer, database_url: str
) -> None:
    index = small_threshold_server.server.runtime.index
    await load(database_url, 200, seed=1)
    assert (await index.maintain()).startswith("exact search")
    assert not index.state.exists

    await load(database_url, 10_300, seed=2, offset=1)
    assert (await index.maintain()).startswith("rebuilt ivfflat with lists=10 for 10500 rows; calibrated probes=")
    assert index.state.usable and index.state.rows_at_build == 10_500
    assert await index.maintain() == "up to date"

    await load(database_url, 12_000, seed=3, offset=2)
    assert (await index.maintain()).startswith("rebuilt ivfflat with lists=22 for 22500 rows; calibrated probes=")
    stats = await small_threshold_server.memory.Stats(memory_pb2.StatsRequest())
    assert stats.index.exists and stats.index.valid and stats.index.lists == 22
    assert stats.index.rows_at_build == 22_500 and stats.index.HasField("built_at")
    # Past 1,000 pages Stats counts are the planner's estimates once autovacuum has analyzed the table (it may have).
    assert stats.memories == pytest.approx(22_500, rel=0.02)

    conn = await asyncpg.connect(database_url)
    try:
        names = await conn.fetch("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'memories_embedding%'")
    finally:
        await conn.close()
    assert [r[0] for r in names] == ["memories_embedding_ivfflat"]


async def test_rebuild_does_not_block_writes(small_threshold_server: RunningServer, database_url: str) -> None:
    await load(database_url, 1000, seed=4)
    # An open snapshot makes CREATE INDEX CONCURRENTLY wait in its last phase; writes must go on meanwhile.
    holder = await asyncpg.connect(database_url)
    observer = await asyncpg.connect(database_url)  # the holder's transaction would see frozen statistics
    transaction = holder.transaction(isolation="repeatable_read")
    await transaction.start()
    await holder.fetchval("SELECT count(*) FROM memory.settings")
    rebuild = asyncio.create_task(small_threshold_server.server.runtime.index.maintain(force=True))
    try:
        async with asyncio.timeout(30):
            while not await observer.fetchval(
                "SELECT count(*) FROM pg_stat_progress_create_index WHERE phase LIKE 'waiting for old snapshots%'"
            ):
                await asyncio.sleep(0.02)
        stored = await small_threshold_server.memory.Store(
            memory_pb2.StoreRequest(
                memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value="written mid-build")
            ),
            timeout=10,
        )
        assert stored.outcome == memory_pb2.WRITE_OUTCOME_CREATED
        assert not rebuild.done()
    finally:
        await transaction.rollback()
        await holder.close()
        await observer.close()
    assert (await rebuild).startswith("rebuilt ivfflat with lists=")


async def test_only_one_instance_rebuilds_at_a_time(database_url: str) -> None:
    env = test_env(database_url, VECTOR_INDEX="ivfflat", EXACT_SEARCH_MAX_ROWS=str(THRESHOLD))
    first, second = await start_server(env), await start_server(env)
    holder = await asyncpg.connect(database_url)
    observer = await asyncpg.connect(database_url)
    try:
        await load(database_url, 3000, seed=5)
        # An open snapshot holds the first build in its last phase, so the second call certainly overlaps it
        # (two calls that happened not to overlap would both rebuild, proving nothing about the lock).
        transaction = holder.transaction(isolation="repeatable_read")
        await transaction.start()
        await holder.fetchval("SELECT count(*) FROM memory.settings")
        building = asyncio.create_task(first.server.runtime.index.maintain(force=True))
        async with asyncio.timeout(30):
            while not await observer.fetchval(
                "SELECT count(*) FROM pg_stat_progress_create_index WHERE phase LIKE 'waiting for old snapshots%'"
            ):
                await asyncio.sleep(0.02)
        refused = await second.server.runtime.index.maintain(force=True)
        assert not building.done()
        await transaction.rollback()
        outcomes = [await building, refused]
    finally:
        await holder.close()
        await observer.close()
        await stop_server(first)
        await stop_server(second)
    refused_and_rebuilt = ["another instance is rebuilding the index", "rebuilt ivfflat"]
    assert sorted(o.split(" with")[0] for o in outcomes) == refused_and_rebuilt


async def test_reindex_and_stats_commands(database_url: str) -> None:
    running = await start_server(test_env(database_url))
    await stop_server(running)
    await load(database_url, 1200, seed=6)
    env = {**os.environ, "DATABASE_URL": database_url, "EXACT_SEARCH_MAX_ROWS": "1000", "LOG_LEVEL": "WARNING"}

    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "memory_service", *args], env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    # The commands run with the defaults: an HNSW graph, over every row written so far.
    assert (await asyncio.to_thread(cli, "reindex")).startswith(
        "rebuilt hnsw with m=16, graph_seq <= 1200 for 1200 rows; calibrated ef_search="
    )
    assert (await asyncio.to_thread(cli, "reindex")).strip() == "up to date"
    # stats asks a server, never the database.
    running = await start_server(test_env(database_url, EXACT_SEARCH_MAX_ROWS="1000", VECTOR_INDEX="hnsw"))
    try:
        stats = json.loads(await asyncio.to_thread(cli, "stats", "--json", "--address", running.address))
    finally:
        await stop_server(running)
    assert stats["memories"] == 1200 and stats["by_scope"] == {"project": 1200}
    assert stats["counts_estimated"] is False  # a small table is counted
    assert stats["index"]["tail_rows"] == 0 and stats["dimension"] == 384
    assert stats["index"]["kind"] == "hnsw" and stats["index"]["target_recall"] == 0.95
    assert stats["index"]["estimated_recall"] >= 0.95 and stats["index"]["calibrated_at"] is not None
