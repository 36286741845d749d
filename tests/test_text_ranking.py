"""BM25 text ranking through real gRPC: the scores against a hand computation, any-word matching, the corpus
statistics after deletes and bulk loads, bounded broad queries, and query text that is never syntax."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from memory_service.models import MemoryFilter
from memory_service.search.text_stats import RefreshPolicy
from memory_service.search.tuning import TextRanking
from memory_service.storage import search_sql, text_stats_sql
from memory_service.storage.database import init_connection
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env

K1, B = 1.2, 0.75


def memory(value: str, scope_id: int = 1) -> memory_pb2.MemoryInput:
    return memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=scope_id, value=value)


async def store(server: RunningServer, *values: str, scope_id: int = 1) -> list[int]:
    ids = []
    for value in values:
        response = await server.memory.Store(memory_pb2.StoreRequest(memory=memory(value, scope_id)))
        ids.append(response.id)
    return ids


async def text_search(server: RunningServer, query: str, top_k: int = 10, **fields: object) -> list[tuple[str, float]]:
    response = await server.memory.Search(
        memory_pb2.SearchRequest(query=query, mode=memory_pb2.SEARCH_MODE_TEXT, top_k=top_k, **fields)  # type: ignore[arg-type]
    )
    assert response.plan == "text"
    return [(hit.memory.value, hit.text_score) for hit in response.hits]


async def refresh(server: RunningServer) -> None:
    assert await server.server.runtime.text_stats.refresh()


def bm25_term(*, tf: int, df: int, docs: int, length: int, average: float) -> float:
    """Okapi BM25 of one term, written out: Lucene's idf and the k1 / b length normalisation."""
    idf = math.log(1 + (docs - df + 0.5) / (df + 0.5))
    return idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / average))


FRUIT = ("apples and apples with bananas", "apples beside cherries, dates and figs", "grapes and melons")


async def test_scores_match_a_hand_computed_bm25(server: RunningServer) -> None:
    await store(server, *FRUIT)
    await refresh(server)
    # English stemming and stopwords: "apples and apples with bananas" holds appl (twice) and banana, 2 lexemes;
    # the second memory 5 lexemes (appl, besid, cherri, date, fig); the third 2 (grape, melon).
    docs, average = 3, (2 + 5 + 2) / 3
    hits = await text_search(server, "Apple or banana?")
    first = bm25_term(tf=2, df=2, docs=docs, length=2, average=average) + bm25_term(
        tf=1, df=1, docs=docs, length=2, average=average
    )
    second = bm25_term(tf=1, df=2, docs=docs, length=5, average=average)
    assert [value for value, _ in hits] == [FRUIT[0], FRUIT[1]]
    assert hits[0][1] == pytest.approx(first, rel=1e-9)
    assert hits[1][1] == pytest.approx(second, rel=1e-9)


async def test_any_query_word_may_match(server: RunningServer) -> None:
    await store(server, *FRUIT)
    await refresh(server)
    # No memory holds every word; each memory that holds one of them is found, the one with more ranks first.
    hits = await text_search(server, "which fruit basket has grapes, melons and kiwis")
    assert [value for value, _ in hits] == [FRUIT[2]]
    hits = await text_search(server, "bananas or grapes for the kiwi")
    assert {value for value, _ in hits} == {FRUIT[0], FRUIT[2]}
    assert await text_search(server, "the and of with") == []  # stopwords only: nothing to rank by


async def test_statistics_follow_deletes_and_bulk_loads(server: RunningServer, database_url: str) -> None:
    first, *_ = await store(server, *FRUIT)
    await refresh(server)
    before = dict(await text_search(server, "apples"))
    await server.memory.Delete(memory_pb2.DeleteRequest(id=first))
    await refresh(server)
    after = dict(await text_search(server, "apples"))
    # appl is now in 1 of 2 memories (it was in 2 of 3): rarer, so each remaining hit scores higher.
    average = (5 + 2) / 2
    assert after[FRUIT[1]] == pytest.approx(bm25_term(tf=1, df=1, docs=2, length=5, average=average), rel=1e-9)
    assert after[FRUIT[1]] > before[FRUIT[1]]

    load = [
        memory_pb2.BulkItem(sequence=i + 1, memory=memory(f"bulk note {i} about apples" if i % 2 else f"bulk note {i}"))
        for i in range(200)
    ]
    async for ack in server.memory.BulkStore(iter([memory_pb2.BulkStoreRequest(items=load)])):
        assert ack.rejected == 0
    await refresh(server)
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT docs FROM memory.text_corpus") == 202
        assert await conn.fetchval("SELECT df FROM memory.text_terms WHERE lexeme = 'appl'") == 101
        assert await conn.fetchval("SELECT df FROM memory.text_terms WHERE lexeme = 'banana'") is None
    finally:
        await conn.close()


async def test_statistics_refresh_by_themselves(database_url: str) -> None:
    running = await start_server(test_env(database_url, TEXT_STATS_INTERVAL="100ms"))
    try:
        await store(running, *FRUIT)
        conn = await asyncpg.connect(database_url)
        try:
            for _ in range(300):
                if await conn.fetchval("SELECT docs FROM memory.text_corpus") == 3:
                    break
                await asyncio.sleep(0.1)
            assert await conn.fetchval("SELECT docs FROM memory.text_corpus") == 3
        finally:
            await conn.close()
    finally:
        await stop_server(running)


@pytest.fixture
async def narrow_budget(database_url: str) -> AsyncIterator[RunningServer]:
    """A server that scores at most 100 memories per text query, over a corpus with one very common word."""
    running = await start_server(test_env(database_url, TEXT_MAX_SCORED="100"))
    items = [
        memory_pb2.BulkItem(sequence=i + 1, memory=memory(f"common filler entry number {i}", scope_id=1 + i % 4))
        for i in range(400)
    ]
    items.append(memory_pb2.BulkItem(sequence=401, memory=memory("a rare zeppelin entry", scope_id=9)))
    async for ack in running.memory.BulkStore(iter([memory_pb2.BulkStoreRequest(items=items)])):
        assert ack.rejected == 0
    await refresh(running)
    yield running
    await stop_server(running)


async def test_broad_queries_score_a_bounded_number_of_memories(narrow_budget: RunningServer) -> None:
    # "common" and "entry" are in all 401 memories; only the rare word brings candidates in, and still the
    # common words fill the answer up to top_k, and score the rare memory above every filler.
    hits = await text_search(narrow_budget, "rare common entry zeppelin", top_k=20)
    assert hits[0][0] == "a rare zeppelin entry"
    assert len(hits) == 20


async def test_filtered_text_search_is_complete(narrow_budget: RunningServer) -> None:
    # One scope of 100 memories is a narrow filter: every memory in it that holds a query word is a candidate.
    scope = memory_pb2.MemoryFilter(scopes=[memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_AGENT, scope_id=2)])
    hits = await text_search(narrow_budget, "filler", top_k=200, filter=scope)
    assert len(hits) == 100
    assert all(value.startswith("common filler") for value, _ in hits)


async def test_candidates_say_whether_every_query_term_brought_its_own(
    narrow_budget: RunningServer, database_url: str
) -> None:
    # With every term among the candidates' sources, a short answer is the true one and no wider statement runs;
    # with a term left out by the budget, the engine must widen to stay complete.
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)

        async def every_term(text: str) -> bool:
            found = await search_sql.candidates(
                conn, MemoryFilter(), vector=None, text=text, limit=10, exact=True, full_rows=False,
                text_ranking=TextRanking(max_scored=100).values,
            )  # fmt: skip
            assert found
            return found[0].text_every_term

        assert await every_term("zeppelin rare")  # each in one memory: both fit the budget
        assert not await every_term("zeppelin common")  # "common" is in 401 memories, past the budget of 100
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("apples\" OR -bananas & | ! ( ) <-> :* \\ ' ", ["apples and bananas"]),
        ("a\\b O'Reilly", ["a\\b from O'Reilly"]),
        ("🍎🍌", []),
        ("x" * 2000, []),
        (" ".join(f"word{i}" for i in range(500)), []),
    ],
)
async def test_any_text_is_a_valid_query(server: RunningServer, query: str, found: list[str]) -> None:
    await store(server, "apples and bananas", "a\\b from O'Reilly")
    await refresh(server)
    hits = await text_search(server, query)
    # Exactly the memories sharing a word with the query: operators and quotes are words or nothing, never syntax.
    assert [value for value, _ in hits] == found
    assert all(math.isfinite(score) and score > 0 for _, score in hits)


def test_refresh_policy() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    policy = RefreshPolicy(small_table_rows=100, change_fraction=0.1, max_age=60)

    def snapshot(docs: int, writes: int, age: float) -> text_stats_sql.Snapshot:
        return text_stats_sql.Snapshot(docs, docs * 5, writes, now - timedelta(seconds=age))

    assert policy.due(None, 0, now)
    assert not policy.due(snapshot(50, 10, 0), 10, now)  # nothing written
    assert policy.due(snapshot(50, 10, 0), 11, now)  # small table: any write
    assert not policy.due(snapshot(1000, 10, 0), 109, now)  # 99 of 1000 written
    assert policy.due(snapshot(1000, 10, 0), 110, now)  # 10% written
    assert policy.due(snapshot(1000, 10, 61), 11, now)  # old, and something was written
    assert policy.due(snapshot(1000, 10, 0), 5, now)  # counters reset: unknown
    # Rows fed into an HNSW graph are updates of no text: 100 fed since the snapshot (200 -> 300), 99 written.
    fed = dataclasses.replace(snapshot(1000, 10, 61), fed_seen=200)
    assert not policy.due(fed, 10 + 100, now, fed_now=300)  # only fed, even though old
    assert not policy.due(dataclasses.replace(fed, refreshed_at=now), 10 + 100 + 99, now, fed_now=300)
    assert policy.due(dataclasses.replace(fed, refreshed_at=now), 10 + 100 + 100, now, fed_now=300)
    assert policy.due(fed, 10 + 100 + 1, now, fed_now=300)  # old, and something was written


async def test_concurrent_refreshes_never_fail(server: RunningServer, database_url: str) -> None:
    # Instances starting together all refresh at once; one refreshes, the others skip, and none fails (a refresh
    # whose snapshot predated another's commit used to fail to serialize and stop the server's start-up).
    await store(server, *FRUIT)
    stats = server.server.runtime.text_stats
    for _ in range(30):
        outcomes = await asyncio.gather(*(stats.refresh() for _ in range(4)))
        assert any(outcomes)
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT docs FROM memory.text_corpus") == 3
        assert await conn.fetchval("SELECT df FROM memory.text_terms WHERE lexeme = 'appl'") == 2
    finally:
        await conn.close()
