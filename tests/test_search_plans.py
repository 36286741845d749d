"""How searches reach PostgreSQL: statements whose generic plan is good, and scan settings per pooled connection."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import numpy as np
import pytest

from bench.corpus import Corpus
from bench.datasets import clustered, copy_into_memories, records
from memory_service.models import MemoryFilter, MemoryType, Scope, ScopeRef, SearchMode, SearchQuery
from memory_service.search.tuning import DEFAULT_TEXT_RANKING
from memory_service.storage import search_sql, text_index_sql
from memory_service.storage.database import init_connection
from memory_service.storage.session import session_statement, use_session_settings
from memory_service.v1 import memory_pb2
from tests.conftest import (
    TEMPLATE_DB,
    RunningServer,
    create_database,
    drop_database,
    start_server,
    stop_server,
    test_env,
)
from tests.plans import generic_plan

ROWS = 20000
SCOPES = 100  # one scope_id selects 1% of the rows


@pytest.fixture(scope="module")
async def indexed(server_dsn: str, template_dsn: str) -> AsyncIterator[tuple[RunningServer, Corpus, str]]:
    """20,000 memories, ANALYZEd, with the service's ivfflat index, behind a server whose pool has one connection."""
    dsn = await create_database(server_dsn, TEMPLATE_DB)
    corpus = clustered(ROWS, topics=60, scopes=SCOPES)
    env = test_env(
        dsn,
        VECTOR_INDEX="ivfflat",
        EXACT_SEARCH_MAX_ROWS="1000",
        SEARCH_NARROW_FILTER_ROWS="10",
        DATABASE_POOL_MIN="1",
        DATABASE_POOL_MAX="1",
    )
    running = await start_server(env)
    try:
        await running.server.runtime.binding.bind_now()  # the rows below are copied in behind the service's back
        conn = await asyncpg.connect(dsn)
        try:
            await init_connection(conn)
            await copy_into_memories(conn, records(corpus, model="hash-ngram-v1"))
            await conn.execute("ANALYZE memory.memories")
        finally:
            await conn.close()
        text_search = running.server.runtime.search.text_search
        assert text_search is not None
        await text_search.build()  # the copy wrote no change-log rows for the index to follow
        assert (await running.server.runtime.index.maintain()).startswith("rebuilt ivfflat with lists=")
        yield running, corpus, dsn
    finally:
        await stop_server(running)
        await drop_database(server_dsn, dsn)


SCOPED = MemoryFilter(scopes=(ScopeRef(scope=Scope.PROJECT, scope_id=7),))
NONE = MemoryFilter()


def _statements() -> list[tuple[str, str, bool]]:
    """(name, SQL, whether an index must serve it) for every statement shape a search issues."""
    shapes: list[tuple[str, str, bool]] = []
    vector, text = np.zeros(384, dtype=np.float32), "query words"
    for name, memory_filter in (("unfiltered", NONE), ("scoped", SCOPED)):
        for exact in (False, True):
            for mode in ("vector", "text", "hybrid"):
                if mode == "text" and exact:
                    continue
                for pruned in (True, False) if mode != "vector" else (True,):
                    sql, _ = search_sql.candidates_statement(
                        memory_filter,
                        vector=vector if mode != "text" else None,
                        text=text if mode != "vector" else None,
                        limit=10 if mode == "vector" else 40,
                        exact=exact,
                        full_rows=mode == "vector",
                        pruned=pruned,
                        text_ranking=DEFAULT_TEXT_RANKING.values,
                        generation=0,  # as the service runs them: checking the embedding generation
                    )
                    # The exact scan computes every distance among the filtered rows on purpose (the OFFSET 0
                    # fence): unfiltered, that is the whole table, and a sequential scan is the right plan.
                    needs_index = not (exact and memory_filter is NONE)
                    label = f"{mode} {'exact' if exact else 'index'} {name}{'' if pruned else ' unpruned'}"
                    shapes.append((label, sql, needs_index))
    shapes.append(("count_matching scoped", search_sql.count_matching_statement(SCOPED, cap=5000)[0], True))
    shapes.append(("memories_by_id", search_sql.memories_by_id_statement(with_embedding=False), True))
    # The text index's statements: query terms and the change log after its frontier, then its answer's rows.
    shapes.append(("text index terms", text_index_sql.TERMS, True))
    for name, memory_filter in (("unfiltered", NONE), ("scoped", SCOPED)):
        shapes.append(
            (f"text index rows {name}", text_index_sql.rows_statement(memory_filter, with_embedding=False)[0], True)
        )
        shapes.append((f"text index passing {name}", text_index_sql.passing_ids_statement(memory_filter)[0], True))
    shapes.append(("text index terms scoped", text_index_sql.terms_statement(SCOPED, cap=50_000)[0], True))
    return shapes


async def test_search_statements_have_generic_plans_that_use_the_indexes(
    indexed: tuple[RunningServer, Corpus, str],
) -> None:
    # A generic plan that scans the whole table is one the plan cache never adopts (each search is planned anew),
    # or, with plan_cache_mode = force_generic_plan, one that runs for 100+ ms where an index answers in a few.
    _, _, dsn = indexed
    conn = await asyncpg.connect(dsn)
    try:
        checked = 0
        for label, sql, needs_index in _statements():
            plan = await generic_plan(conn, sql)
            if needs_index:
                assert "Seq Scan on memories" not in plan, f"{label}:\n{plan}"
                checked += 1
            if label == "vector index unfiltered":
                assert "memories_embedding_ivfflat" in plan, plan
        # With the settings an index search runs under, a scoped search walks the vector index rather than reading
        # the scope through its btree and sorting every row (an exact scan that the response would call approximate).
        await conn.execute("SET enable_sort = off")
        for label, sql, _ in _statements():
            if label in ("vector index scoped", "hybrid index scoped"):
                plan = await generic_plan(conn, sql)
                assert "memories_embedding_ivfflat" in plan, f"{label}:\n{plan}"
    finally:
        await conn.close()
    assert checked >= 18


async def _show(running: RunningServer, name: str) -> str:
    async with running.server.runtime.db.connection() as conn:
        value: str = await conn.fetchval(f"SHOW {name}")
        return value


async def test_searches_with_different_probes_each_run_with_their_own(
    indexed: tuple[RunningServer, Corpus, str],
) -> None:
    running, corpus, _ = indexed
    engine = running.server.runtime.search
    lists = running.server.runtime.index.state.lists
    assert lists >= 6
    # The pool has one connection, so each search reuses the connection the last one set up: after every search
    # the connection holds exactly that search's settings. (An earlier version also inferred the probes from the
    # plan, through a filter that made probes = 1 come back short; whether PostgreSQL used the index for such a
    # filter at all depended on the index build, so that check was flaky.)
    engine.iterative_scan = False
    try:

        def request(probes: int) -> memory_pb2.SearchRequest:
            return memory_pb2.SearchRequest(
                query_embedding=corpus.vectors[5].tolist(),
                top_k=20,
                probes=probes,
                mode=memory_pb2.SEARCH_MODE_VECTOR,
            )

        for probes in (lists, 1, lists, 1):
            response = await running.memory.Search(request(probes))
            assert len(response.hits) == 20
            assert (response.plan, response.probes) == ("ivfflat", probes)
            assert await _show(running, "ivfflat.probes") == str(probes)
            assert await _show(running, "ivfflat.iterative_scan") == "off"
    finally:
        engine.iterative_scan = True
    # The next search that wants iterative scans gets them, and its own probes.
    response = await running.memory.Search(request(2))
    assert response.plan == "ivfflat-iterative" and len(response.hits) == 20
    assert await _show(running, "ivfflat.probes") == "2"
    assert await _show(running, "ivfflat.iterative_scan") == "relaxed_order"
    # Inside a transaction a rollback could undo a SET behind the tracking's back: refused.
    async with running.server.runtime.db.transaction() as conn:
        with pytest.raises(RuntimeError, match="outside a transaction"):
            await use_session_settings(conn, {"ivfflat.probes": "5"})
    assert await _show(running, "ivfflat.probes") == "2"
    # Exact and text searches need no scan settings and send none: the connection keeps what it has.
    await running.memory.Search(memory_pb2.SearchRequest(query="anything", mode=memory_pb2.SEARCH_MODE_TEXT))
    await running.memory.Search(memory_pb2.SearchRequest(query_embedding=corpus.vectors[1].tolist(), exact=True))
    assert await _show(running, "ivfflat.probes") == "2"


async def test_planner_settings_of_an_index_search_end_with_it(indexed: tuple[RunningServer, Corpus, str]) -> None:
    running, corpus, _ = indexed
    db = running.server.runtime.db
    await running.memory.Search(memory_pb2.SearchRequest(query_embedding=corpus.vectors[5].tolist(), probes=2))
    # The pool's one connection still holds the search's settings (the next index search sends nothing)...
    async with db.settings_connection(
        {"ivfflat.probes": "2", "ivfflat.iterative_scan": "relaxed_order", "enable_sort": "off"}
    ) as conn:
        assert await conn.fetchval("SHOW enable_sort") == "off"
    # ...but whatever else takes it next (a Store, a List, a lease) plans with PostgreSQL's defaults.
    assert await _show(running, "enable_sort") == "on"
    assert await _show(running, "ivfflat.probes") == "2"  # scan settings touch only index scans, and stay


def test_session_statement_changes_only_what_differs() -> None:
    probes = {"ivfflat.probes": "3"}
    both = {"ivfflat.probes": "3", "ivfflat.iterative_scan": "relaxed_order"}
    assert session_statement({}, both) == "SET ivfflat.probes = '3'; SET ivfflat.iterative_scan = 'relaxed_order'"
    assert session_statement(both, probes) == "RESET ivfflat.iterative_scan"
    assert session_statement(probes, {"ivfflat.probes": "4"}) == "SET ivfflat.probes = '4'"
    # Not known (a SET was interrupted): start from the server's defaults.
    assert session_statement(None, probes) == "RESET ALL; SET ivfflat.probes = '3'"
    bad: list[dict[str, Any]] = [{"ivfflat.probes": "1'; DROP TABLE x; --"}, {"search_path; RESET": "x"}]
    for wanted in bad:
        with pytest.raises(ValueError):
            session_statement({}, wanted)


async def test_the_narrow_filter_count_reads_only_the_index(indexed: tuple[RunningServer, Corpus, str]) -> None:
    # The exact scan of a narrow filter reads its heap rows; the count that chose it must not read them first.
    _, _, dsn = indexed
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM memory.memories")  # sets the visibility map, as autovacuum does after a load
        sql, values = search_sql.count_matching_statement(SCOPED, cap=5000)
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) {sql}", *values))
        assert "Index Only Scan using memories_scope_list" in plan and "Heap Fetches: 0" in plan, plan
        assert await conn.fetchval(sql, *values) == ROWS // SCOPES
    finally:
        await conn.close()


async def test_repeated_searches_run_on_a_cached_generic_plan(indexed: tuple[RunningServer, Corpus, str]) -> None:
    # PostgreSQL tries five custom plans, then keeps the generic one if it costs no more: a statement whose generic
    # plan is bad is planned anew on every call. The pool has one connection, which holds the prepared statements.
    running, corpus, _ = indexed
    vector = corpus.vectors[9]
    text = " ".join(corpus.texts[9].split()[:2])
    shapes = {
        "vector": (
            memory_pb2.SearchRequest(query_embedding=vector.tolist(), mode=memory_pb2.SEARCH_MODE_VECTOR),
            search_sql.candidates_statement(
                NONE, vector=vector, text=None, limit=10, exact=False, full_rows=True, generation=0
            )[0],
        ),
        "text terms": (
            memory_pb2.SearchRequest(query=text, mode=memory_pb2.SEARCH_MODE_TEXT),
            text_index_sql.TERMS,
        ),
        "text rows": (
            memory_pb2.SearchRequest(query=text, mode=memory_pb2.SEARCH_MODE_TEXT),
            text_index_sql.rows_statement(NONE, with_embedding=False)[0],
        ),
    }
    for request, _ in shapes.values():
        for _ in range(8):
            await running.memory.Search(request)
    async with running.server.runtime.db.connection() as conn:
        for mode, (_, sql) in shapes.items():
            row = await conn.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1", sql
            )
            assert row is not None, mode
            assert row["generic_plans"] >= 3 and row["custom_plans"] <= 5, (mode, dict(row))


def test_only_filters_an_index_narrows_are_counted() -> None:
    # Counting the matches of an importance or memory-type filter up to the cap would read the table until the cap:
    # such a filter goes to the vector index (whose iterative scan keeps it complete) uncounted.
    assert not search_sql.count_is_bounded(MemoryFilter(min_importance=0.99))
    assert not search_sql.count_is_bounded(MemoryFilter(memory_types=(MemoryType.SKILL,)))
    assert search_sql.count_is_bounded(SCOPED)
    assert search_sql.count_is_bounded(MemoryFilter(agent_id=3, min_importance=0.99))
    assert search_sql.count_is_bounded(MemoryFilter(tags=("a",)))


_OURS: contextvars.ContextVar[bool] = contextvars.ContextVar("ours", default=False)


async def test_a_vector_search_and_a_get_are_one_statement_each(indexed: tuple[RunningServer, Corpus, str]) -> None:
    # The per-call cost target (issue 19) counts on it: no SET, no count, no second fetch for an unfiltered VECTOR
    # search once its connection has its settings, and one statement for a Get. The driver calls query loggers
    # through the event loop in a copy of the issuing task's context, so only this task's statements are counted
    # (background loops share the pool's one connection).
    running, corpus, _ = indexed
    runtime = running.server.runtime
    query = SearchQuery(embedding=corpus.vectors[3], mode=SearchMode.VECTOR, top_k=10, probes=4)
    first = await runtime.search.search(query)  # prepares the statement and sets the scan settings
    memory_id = first.hits[0].memory.id
    await runtime.memories.get(memory_id, with_embedding=False)
    heard: list[str] = []

    def hear(record: Any) -> None:
        if _OURS.get():
            heard.append(record.query)

    async with runtime.db.pool.acquire() as conn:
        conn.add_query_logger(hear)
    statement, _ = search_sql.candidates_statement(
        NONE, vector=corpus.vectors[3], text=None, limit=10, exact=False, full_rows=True, generation=0
    )
    mark = _OURS.set(True)
    try:
        # A background job may take the pool's one connection between two searches and leave other scan settings
        # on it (a calibration): the search after it sends a SET first, the one after that must not.
        for _ in range(3):
            result = await runtime.search.search(query)
            await asyncio.sleep(0)
            searched, heard[:] = list(heard), []
            if searched == [statement]:
                break
        memory = await runtime.memories.get(memory_id, with_embedding=False)
        await asyncio.sleep(0)
    finally:
        _OURS.reset(mark)
        async with runtime.db.pool.acquire() as conn:
            conn.remove_query_logger(hear)
    assert result.plan == "ivfflat-iterative" and len(result.hits) == 10
    assert searched == [statement]
    assert memory.id == memory_id and len(heard) == 1, heard


def test_the_unfiltered_vector_statement_is_built_once_and_the_same() -> None:
    # search_sql.candidates keeps the text of unfiltered vector searches; it must be candidates_statement's, with
    # the parameters in the same order.
    vector = np.ones(384, dtype=np.float32)
    shapes = itertools.product((False, True), (False, True), (None, 3), ("embedding", "embedding_alt"), (None, 42))
    for exact, with_embedding, generation, column, watermark in shapes:
        expected, values = search_sql.candidates_statement(
            NONE,
            vector=vector,
            text=None,
            limit=7,
            exact=exact,
            full_rows=True,
            with_embedding=with_embedding,
            column=column,
            generation=generation,
            watermark=watermark,
        )
        built = search_sql._unfiltered_vector_sql(
            7,
            exact=exact,
            full_rows=True,
            with_embedding=with_embedding,
            column=column,
            guarded=generation is not None,
            watermark=watermark,
        )
        assert built == expected
        assert values[0] is vector and values[1:] == ([] if generation is None else [generation])
