"""An HNSW graph built up to a watermark, and the tail above it searched exactly beside it.

Rows written after the build are not inserted into the graph (a partial index ``WHERE id <= W``); every search
through the index also scans them exactly and merges the two lists. So a row is findable from the moment it is
written, whether it is in the graph or the tail, and a rebuild moves the watermark while writes go on.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import numpy as np
import pytest

from bench.corpus import Corpus
from bench.datasets import clustered, copy_into_memories, records
from bench.ingest import memory_input
from memory_service.models import MemoryFilter
from memory_service.search.hnsw_tail import inserts_tail, tail_bound, tail_due, tail_to_insert
from memory_service.search.index_care import IndexCare
from memory_service.search.index_policy import IndexState, needs_rebuild
from memory_service.storage import search_sql, stats_sql
from memory_service.storage.database import init_connection
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env
from tests.plans import generic_plan

BASE = 3000
MORE = 1200
TAIL_ROWS = 1000


def env_for(database_url: str, **overrides: str) -> dict[str, str]:
    settings = {
        "VECTOR_INDEX": "hnsw",
        "EXACT_SEARCH_MAX_ROWS": "1000",
        "HNSW_TAIL_ROWS": str(TAIL_ROWS),
        "SEARCH_NARROW_FILTER_ROWS": "10",
        "SEARCH_CALIBRATION_QUERIES": "40",
        "INDEX_CHECK_INTERVAL": "1h",  # the tests drive the rebuilds themselves
        "TEXT_STATS_INTERVAL": "1h",  # and the BM25 statistics' refresh
    }
    return test_env(database_url, **{**settings, **overrides})


async def writes_reach(database_url: str, writes: int) -> None:
    """Until PostgreSQL's write counters of memory.memories (which take in a commit up to seconds later) reach
    ``writes``."""
    async with asyncio.timeout(60):
        while (await sql(database_url, stats_sql.WRITES))[0][0] < writes:
            await asyncio.sleep(0.2)


async def sql(database_url: str, statement: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


@pytest.fixture
async def built(database_url: str) -> AsyncIterator[tuple[RunningServer, Corpus]]:
    """BASE rows in the graph; the rest of the corpus is for the tests to write."""
    corpus = clustered(BASE + MORE, topics=100, scopes=4, noise=1.0, seed=5)
    running = await start_server(env_for(database_url))
    try:
        await running.server.runtime.binding.bind_now()  # the rows below are copied in behind the service's back
        conn = await asyncpg.connect(database_url)
        try:
            await init_connection(conn)
            await copy_into_memories(conn, records(corpus, model="hash-ngram-v1")[:BASE])
            await conn.execute("ANALYZE memory.memories")
            top = await conn.fetchval("SELECT max(graph_seq) FROM memory.memories")
        finally:
            await conn.close()
        outcome = await running.server.runtime.index.maintain()
        assert outcome.startswith(f"rebuilt hnsw with m=16, graph_seq <= {top} for {BASE} rows; calibrated"), outcome
        state = running.server.runtime.index.state
        assert state.watermark == top and state.tail == 0
        yield running, corpus
    finally:
        await stop_server(running)


@pytest.fixture
async def care(built: tuple[RunningServer, Corpus], database_url: str) -> AsyncIterator[IndexCare]:
    """The index care of a second instance told that the built graph (BASE rows) is large ("large" is a setting):
    it takes the tail by insertion instead of a rebuild."""
    running = await start_server(env_for(database_url, HNSW_GRAPH_INSERT_ROWS=str(BASE)))
    try:
        yield running.server.runtime.index
    finally:
        await stop_server(running)


async def bulk_store(running: RunningServer, corpus: Corpus, rows: range, *, prefix: str = "") -> None:
    """BulkStore rows ``rows`` of the corpus with their vectors (their values after ``prefix``)."""
    items = [
        memory_pb2.BulkItem(sequence=n + 1, memory=memory_input(corpus, i, embedded=True)) for n, i in enumerate(rows)
    ]
    for item in items:
        item.memory.value = prefix + item.memory.value
    batches = [memory_pb2.BulkStoreRequest(items=items[at : at + 100]) for at in range(0, len(items), 100)]

    async def messages() -> AsyncIterator[memory_pb2.BulkStoreRequest]:
        for batch in batches:
            yield batch

    last = 0
    async for ack in running.memory.BulkStore(messages()):
        assert ack.rejected == 0
        last = ack.durable_sequence
    assert last == len(items)


async def store_moved(
    running: RunningServer, corpus: Corpus, i: int, rng: np.random.Generator, *, prefix: str
) -> tuple[np.ndarray, memory_pb2.StoreResponse]:
    """Store row ``i`` again with a new random unit vector and its value after ``prefix``: an upsert that moves it."""
    vector = rng.normal(size=384).astype(np.float32)
    vector /= np.linalg.norm(vector)
    message = memory_input(corpus, i, embedded=False)
    message.value = prefix + message.value
    message.embedding.extend(vector.tolist())
    return vector, await running.memory.Store(memory_pb2.StoreRequest(memory=message))


async def nearest_keys(
    running: RunningServer, vector: np.ndarray, *, scope_id: int | None = None, top_k: int = 10
) -> tuple[list[str], str]:
    request = memory_pb2.SearchRequest(query_embedding=vector.tolist(), top_k=top_k, mode=memory_pb2.SEARCH_MODE_VECTOR)
    if scope_id is not None:
        request.filter.scopes.add(scope=memory_pb2.SCOPE_PROJECT, scope_id=scope_id)
    response = await running.memory.Search(request)
    return [h.memory.key for h in response.hits], response.plan


async def test_rows_loaded_after_the_build_are_found_from_the_tail(
    built: tuple[RunningServer, Corpus], database_url: str
) -> None:
    running, corpus = built
    await bulk_store(running, corpus, range(BASE, BASE + 200))
    state = await running.server.runtime.index.refresh()
    assert state.tail == 200 and running.server.runtime.index.needs_rebuild(state) is False
    stats = await running.memory.Stats(memory_pb2.StatsRequest())
    assert stats.index.tail_rows == 200 and stats.index.kind == "hnsw"
    assert running.server.metrics.registry.get_sample_value("memory_index_tail_rows") == 200
    assert running.server.metrics.registry.get_sample_value("memory_index_tail_bound_rows") == TAIL_ROWS
    # The graph never saw them: the partial index holds the first BASE rows only.
    rows = await sql(
        database_url,
        "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indexrelid = "
        "'memory.memories_embedding_hnsw'::regclass",
    )
    assert rows[0][0] == f"(graph_seq <= {state.watermark})"
    for i in (BASE, BASE + 77, BASE + 199, 5, 1500, BASE - 1):
        keys, plan = await nearest_keys(running, corpus.vectors[i])
        assert plan == "hnsw-iterative" and keys[0] == f"row-{i}", (i, keys)
        # Filtered by the row's scope too: the tail is scanned under the same filter.
        keys, plan = await nearest_keys(running, corpus.vectors[i], scope_id=int(corpus.scope_ids[i]))
        assert plan == "hnsw-iterative" and keys[0] == f"row-{i}", (i, keys)
    # Top-k merges the graph's list with the tail's by distance: a tail row first, graph rows after it.
    stored = corpus.vectors[: BASE + 200]
    truth = {f"row-{j}" for j in np.argsort(-(stored @ corpus.vectors[BASE + 3]))[:10]}
    keys, _ = await nearest_keys(running, corpus.vectors[BASE + 3])
    assert keys[0] == f"row-{BASE + 3}" and any(int(k.split("-")[1]) < BASE for k in keys)
    assert len(truth & set(keys)) >= 8

    # The statement carries the index's predicate, so the planner walks the graph for the rows under it.
    statement, values = search_sql.candidates_statement(
        MemoryFilter(),
        vector=corpus.vectors[0],
        text=None,
        limit=10,
        exact=False,
        full_rows=True,
        watermark=state.watermark,
    )
    plan = "\n".join(r[0] for r in await sql(database_url, "EXPLAIN " + statement, *values))
    assert "memories_embedding_hnsw" in plan and "memories_graph_tail" in plan, plan
    assert "Seq Scan on memories" not in plan, plan
    # The generic plan too (the one a prepared statement settles on): the watermark is a literal, not a parameter.
    conn = await asyncpg.connect(database_url)
    try:
        plan = await generic_plan(conn, statement)
    finally:
        await conn.close()
    assert "memories_embedding_hnsw" in plan and "memories_graph_tail" in plan, plan
    assert "Seq Scan on memories" not in plan, plan


async def test_deletes_and_updates_in_the_graph_and_in_the_tail(
    built: tuple[RunningServer, Corpus], database_url: str
) -> None:
    running, corpus = built
    await bulk_store(running, corpus, range(BASE, BASE + 100))
    ids = {r["key"]: r["id"] for r in await sql(database_url, "SELECT key, id FROM memory.memories")}
    rng = np.random.default_rng(1)
    for graph, tail in ((10, BASE + 10), (20, BASE + 20)):
        for i in (graph, tail):
            await running.memory.Delete(memory_pb2.DeleteRequest(id=ids[f"row-{i}"]))
            keys, _ = await nearest_keys(running, corpus.vectors[i])
            assert f"row-{i}" not in keys
    for i in (30, BASE + 30):
        moved, stored = await store_moved(running, corpus, i, rng, prefix="moved ")
        assert stored.outcome == memory_pb2.WRITE_OUTCOME_UPDATED and stored.id == ids[f"row-{i}"]
        keys, _ = await nearest_keys(running, moved)
        assert keys[0] == f"row-{i}"
        keys, _ = await nearest_keys(running, corpus.vectors[i], top_k=1)
        assert keys != [f"row-{i}"]
    # The graph's rewritten row moved to the tail (a new graph_seq) instead of into the graph; the tail's stayed.
    state = await running.server.runtime.index.refresh()
    assert state.tail == 100 - 2 + 1
    size = "SELECT pg_relation_size('memory.memories_embedding_hnsw')"
    before = (await sql(database_url, size))[0][0]
    await bulk_store(running, corpus, range(0, 300), prefix="again ")  # rewrites of graph rows (new values)
    assert (await running.server.runtime.index.refresh()).tail == 99 + 300 - 1  # row-30 was in the tail already
    assert (await sql(database_url, size))[0][0] == before


async def test_a_rebuild_moves_the_watermark_while_writes_go_on(
    built: tuple[RunningServer, Corpus], database_url: str
) -> None:
    running, corpus = built
    care = running.server.runtime.index
    before = care.state.watermark
    assert before is not None
    # The tail reaches its bound (HNSW_TAIL_ROWS, under half the graph's rows): the graph is due a rebuild.
    assert tail_bound(BASE, TAIL_ROWS) == TAIL_ROWS
    await bulk_store(running, corpus, range(BASE, BASE + TAIL_ROWS))
    state = await care.refresh()
    assert state.tail == TAIL_ROWS and care.needs_rebuild(state)  # due, to one that knows of no load going on
    # This instance's previous check saw an empty tail: a load is going on, and the graph waits for its end.
    assert not (await care.maintain()).startswith("rebuilt"), care.state
    assert care.state.watermark == before

    async def writes() -> None:
        await asyncio.sleep(0.3)  # after the check below has found the tail quiet, while the graph is built
        for start in range(BASE + TAIL_ROWS, BASE + MORE, 20):
            await bulk_store(running, corpus, range(start, min(start + 20, BASE + MORE)))
            await asyncio.sleep(0)

    outcome, _ = await asyncio.gather(care.maintain(), writes())
    assert outcome.startswith("rebuilt hnsw"), outcome
    state = await care.refresh()
    assert state.watermark is not None and state.watermark > before and not care.needs_rebuild(state)
    top = (await sql(database_url, "SELECT max(graph_seq) FROM memory.memories"))[0][0]
    above = (await sql(database_url, "SELECT count(*) FROM memory.memories WHERE graph_seq > $1", state.watermark))[0][
        0
    ]
    assert state.tail == above and above < MORE - TAIL_ROWS + 1 and top >= state.watermark
    # Every row written, before, during and after the build, is found by its own vector.
    for i in [*range(0, BASE, 150), *range(BASE, BASE + MORE, 7), BASE + MORE - 1]:
        keys, plan = await nearest_keys(running, corpus.vectors[i])
        assert plan == "hnsw-iterative" and keys[0] == f"row-{i}", (i, keys)


async def test_without_a_tail_the_graph_takes_every_row(built: tuple[RunningServer, Corpus], database_url: str) -> None:
    _, corpus = built
    full = await start_server(env_for(database_url, HNSW_TAIL_ROWS="0"))
    try:
        outcome = await full.server.runtime.index.maintain()
        assert outcome.startswith(f"rebuilt hnsw with m=16 for {BASE} rows"), outcome
        assert full.server.runtime.index.state.watermark is None
        await bulk_store(full, corpus, range(BASE, BASE + 50))
        assert (await full.server.runtime.index.refresh()).tail == 0
        keys, plan = await nearest_keys(full, corpus.vectors[BASE + 10])
        assert plan == "hnsw-iterative" and keys[0] == f"row-{BASE + 10}"
    finally:
        await stop_server(full)


async def test_a_large_graph_takes_its_tail_by_insertion_without_a_rebuild(
    built: tuple[RunningServer, Corpus], care: IndexCare, database_url: str
) -> None:
    running, corpus = built
    watermark = (await care.refresh()).watermark
    index_oid = "SELECT 'memory.memories_embedding_hnsw'::regclass::oid"
    graph = (await sql(database_url, index_oid))[0][0]
    await bulk_store(running, corpus, range(BASE, BASE + 600))
    observed = "SELECT (SELECT count(*) FROM memory.changes), (SELECT count(*) FROM memory.memory_versions)"
    history = await sql(database_url, observed)
    rows = "SELECT id, value, metadata, updated_at FROM memory.memories ORDER BY id"
    contents = await sql(database_url, rows)
    state = await care.refresh()
    assert state.tail == 600 and not care.needs_rebuild(state) and care.tail_to_insert(state)
    fed_before = state.fed
    # BM25's statistics taken once the statistics count every row written so far.
    stored = (await sql(database_url, "SELECT count(*) FROM memory.memories"))[0][0]
    await writes_reach(database_url, stored)
    text_stats = running.server.runtime.text_stats
    assert await text_stats.refresh()
    refreshed_at = (await sql(database_url, "SELECT writes_seen FROM memory.text_corpus"))[0][0]

    # A write holding one tail row is neither waited for nor lost: the row stays in the tail until the next check.
    holder = await asyncpg.connect(database_url)
    try:
        await init_connection(holder)
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM memory.memories WHERE key = $1 FOR UPDATE", f"row-{BASE + 5}")
            async with asyncio.timeout(60):
                outcome = await care.maintain()
    finally:
        await holder.close()
    assert outcome.startswith(f"inserted 599 tail rows into the hnsw graph (graph_seq <= {watermark})"), outcome
    assert care.state.tail == 1 and care.state.watermark == watermark
    assert (await care.maintain()).startswith("inserted 1 tail rows")
    assert care.state.tail == 0 and care.state.watermark == watermark
    assert (await sql(database_url, index_oid))[0][0] == graph  # the same index, grown: no rebuild
    assert care.state.fed == fed_before + 600  # counted, so that no calibration takes them for data written
    # Nor do BM25's statistics: once the statistics count the 600 updates, a refresh is not due for them (on a table
    # this small any data written would make it due).
    await writes_reach(database_url, refreshed_at + 600)
    assert not await text_stats.maintain()

    # Only graph_seq moved: no change, no history version, no value or timestamp.
    assert await sql(database_url, observed) == history
    assert await sql(database_url, rows) == contents
    # With no tail left, the rows can only have been found through the graph.
    for i in [*range(BASE, BASE + 600, 41), BASE + 5, 7]:
        keys, plan = await nearest_keys(running, corpus.vectors[i])
        assert plan == "hnsw-iterative" and keys[0] == f"row-{i}", (i, keys)


async def test_a_tail_past_what_is_counted_is_inserted_whole(
    built: tuple[RunningServer, Corpus], care: IndexCare, database_url: str
) -> None:
    running, corpus = built
    # 1,200 new rows and 1,000 rewritten graph rows: a tail of 2,200, past the 2,001 the check counts up to.
    await bulk_store(running, corpus, range(BASE, BASE + MORE))
    await bulk_store(running, corpus, range(0, 1000), prefix="again ")
    # The row estimate counts the rewrites' old versions until the table is analyzed (autovacuum would).
    await sql(database_url, "ANALYZE memory.memories")
    assert (await care.refresh()).tail == 2 * TAIL_ROWS + 1
    # What an interrupted rebuild left (written to by every row version) goes too, since no rebuild will come.
    await sql(database_url, "CREATE INDEX memories_embedding_hnsw_building ON memory.memories (graph_seq)")
    outcome = await care.maintain()
    assert outcome.startswith(f"inserted {MORE + 1000} tail rows into the hnsw graph"), outcome
    assert care.state.tail == 0
    leftover = "SELECT count(*) FROM pg_class WHERE relname = 'memories_embedding_hnsw_building'"
    assert (await sql(database_url, leftover))[0][0] == 0


async def test_rows_rewritten_while_the_tail_is_inserted_are_found_by_their_new_vectors(
    built: tuple[RunningServer, Corpus], care: IndexCare, database_url: str
) -> None:
    running, corpus = built
    watermark = (await care.refresh()).watermark
    await bulk_store(running, corpus, range(BASE, BASE + 600))
    assert (await care.refresh()).tail == 600
    rng = np.random.default_rng(7)
    moved: dict[int, np.ndarray] = {}

    async def rewrites() -> None:
        # Once the first batch is in the graph (only the watermark's own row had graph_seq = W before), tail rows
        # and graph rows get new vectors, and a new graph_seq, while the other batches are inserted.
        at_watermark = "SELECT count(*) FROM memory.memories WHERE graph_seq = $1"
        while (await sql(database_url, at_watermark, watermark))[0][0] <= 1:
            await asyncio.sleep(0.005)
        for i in [*range(BASE, BASE + 600, 5), *range(0, BASE, 100)]:
            vector, stored = await store_moved(running, corpus, i, rng, prefix="rewritten ")
            assert stored.outcome == memory_pb2.WRITE_OUTCOME_UPDATED
            moved[i] = vector
            await asyncio.sleep(0)

    outcome, _ = await asyncio.gather(care.maintain(), rewrites())
    assert outcome.startswith("inserted "), outcome
    while (await care.refresh()).tail and (await care.maintain()).startswith("inserted "):
        pass
    state = await care.refresh()
    assert state.watermark == watermark
    above = "SELECT count(*) FROM memory.memories WHERE graph_seq > $1"
    assert state.tail == (await sql(database_url, above, watermark))[0][0]
    assert (await sql(database_url, "SELECT count(*) FROM memory.memories"))[0][0] == BASE + 600
    # Each row is found by its latest vector, whether it ended in the graph or back in the tail.
    for i, vector in moved.items():
        keys, plan = await nearest_keys(running, vector)
        assert plan == "hnsw-iterative" and keys[0] == f"row-{i}", (i, keys)
    for i in range(BASE + 1, BASE + 600, 29):
        if i not in moved:
            keys, _ = await nearest_keys(running, corpus.vectors[i])
            assert keys[0] == f"row-{i}", (i, keys)


def test_a_large_graph_inserts_its_tail_and_is_rebuilt_after_a_large_load() -> None:
    large = {"rows_at_build": 100_000, "tail_rows": 5000, "insert_rows": 30_000}
    assert inserts_tail(rows=110_000, rows_at_build=100_000, insert_rows=30_000)
    assert not inserts_tail(rows=110_000, rows_at_build=100_000, insert_rows=0)  # 0: always rebuild
    assert not inserts_tail(rows=25_000, rows_at_build=20_000, insert_rows=30_000)  # small: a rebuild is cheaper
    assert not inserts_tail(rows=150_000, rows_at_build=100_000, insert_rows=30_000)  # grown by half since its build
    assert tail_to_insert(10, tail_before=None, rows=110_000, **large)
    assert not tail_to_insert(0, tail_before=None, rows=110_000, **large)
    # A trickle of writes is inserted at once; a load (the tail grew by its bound or more since the previous check)
    # is waited for, up to twice the bound.
    assert tail_to_insert(3000, tail_before=10, rows=110_000, **large)
    assert not tail_to_insert(6000, tail_before=10, rows=110_000, **large)
    assert tail_to_insert(10_000, tail_before=4000, rows=110_000, **large)
    # Never rebuilt for its tail, unless the table grew by half.
    assert not tail_due(10_000, tail_before=None, rows=110_000, **large)
    assert tail_due(10_000, tail_before=None, rows=150_000, **large)
    assert not tail_to_insert(10_000, tail_before=None, rows=150_000, **large)
    state = IndexState(exists=True, valid=True, kind="hnsw", rows=110_000, rows_at_build=100_000, watermark=9)
    state = dataclasses.replace(state, tail=10_000)
    assert not needs_rebuild(state, exact_max_rows=20_000, kind="hnsw", tail_rows=5000, insert_rows=30_000)
    assert needs_rebuild(state, exact_max_rows=20_000, kind="hnsw", tail_rows=5000)


def test_the_tail_bound_is_absolute_and_relative() -> None:
    assert tail_bound(1_000_000, 10_000) == 10_000
    assert tail_bound(4000, 10_000) == 2000
    assert tail_bound(0, 10_000) == 1
    graph = IndexState(exists=True, valid=True, kind="hnsw", rows=30_000, rows_at_build=25_000, watermark=9, tail=5)

    def due(state: IndexState, tail_rows: int | None, tail_before: int | None = None) -> bool:
        return needs_rebuild(state, exact_max_rows=20_000, kind="hnsw", tail_rows=tail_rows, tail_before=tail_before)

    assert not due(graph, 10_000)
    assert due(dataclasses.replace(graph, tail=10_000), 10_000)
    # A load still going on (the tail grew by a tenth of the bound since the previous check) defers the build...
    assert not due(dataclasses.replace(graph, tail=10_000), 10_000, tail_before=9000)
    assert due(dataclasses.replace(graph, tail=10_000), 10_000, tail_before=9001)
    # ...until the tail reaches twice the bound.
    assert due(dataclasses.replace(graph, tail=20_000), 10_000, tail_before=15_000)
    # A partial graph when every row should be in it, or the other way round, is rebuilt.
    assert due(graph, 0)
    assert due(dataclasses.replace(graph, watermark=None), 10)
    assert not due(graph, None)  # no tail policy: the graph is left alone
