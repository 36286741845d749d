"""Search through real gRPC: modes, fusion, filters, completeness with a real ivfflat index."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import numpy as np
import pytest

from bench.corpus import Corpus
from bench.datasets import clustered, copy_into_memories, records
from memory_service.models import MemoryFilter
from memory_service.storage import search_sql
from memory_service.storage.database import init_connection
from memory_service.storage.filters import Params, where_clause
from memory_service.storage.session import begin_statement
from memory_service.v1 import memory_pb2
from tests.conftest import (
    RunningServer,
    code_of,
    create_database,
    drop_database,
    start_server,
    stop_server,
    test_env,
)


def agent_memory(value: str, scope_id: int = 1, **fields: object) -> memory_pb2.StoreRequest:
    return memory_pb2.StoreRequest(
        memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=scope_id, value=value, **fields)  # type: ignore[arg-type]
    )


async def test_text_search_ranks_by_words(server: RunningServer) -> None:
    await server.memory.Store(agent_memory("the kubernetes cluster runs in eu-west"))
    await server.memory.Store(agent_memory("lunch is at noon on fridays"))
    await server.memory.Store(agent_memory("kubernetes upgrades happen monthly; the cluster drains first"))
    response = await server.memory.Search(
        memory_pb2.SearchRequest(query="kubernetes cluster", mode=memory_pb2.SEARCH_MODE_TEXT)
    )
    assert response.mode == memory_pb2.SEARCH_MODE_TEXT
    assert len(response.hits) == 2
    assert all("kubernetes" in h.memory.value for h in response.hits)
    assert all(h.HasField("text_score") and h.text_rank >= 1 for h in response.hits)
    assert response.exact and response.plan == "text"


async def test_hybrid_hits_explain_their_score(server: RunningServer) -> None:
    for value in ("deploys happen on tuesday", "the deploy pipeline uses argo", "cats sleep all day"):
        await server.memory.Store(agent_memory(value))
    response = await server.memory.Search(memory_pb2.SearchRequest(query="deploy pipeline", top_k=3))
    assert response.mode == memory_pb2.SEARCH_MODE_HYBRID
    assert [h.memory.value for h in response.hits][:2] == ["the deploy pipeline uses argo", "deploys happen on tuesday"]
    # Every hybrid candidate carries both exact scores, whichever list found it; the unrelated memory has BM25 0.
    assert all(h.HasField("cosine_similarity") and h.HasField("text_score") for h in response.hits)
    assert response.hits[2].memory.value == "cats sleep all day" and response.hits[2].text_score == 0.0
    # The default fusion with the hash embedder: 0.2 * cosine / best cosine + 0.8 * BM25 / best BM25, where the
    # best are taken over the candidates (here all three memories).
    best_cosine = max(h.cosine_similarity for h in response.hits)
    best_text = max(h.text_score for h in response.hits)
    for hit in response.hits:
        expected = 0.2 * max(hit.cosine_similarity, 0) / best_cosine + 0.8 * hit.text_score / best_text
        assert hit.score == pytest.approx(expected)
    rrf = await server.memory.Search(
        memory_pb2.SearchRequest(query="deploy pipeline", top_k=3, fusion=memory_pb2.FUSION_RRF)
    )
    # The ranks the RRF score is checked against are first checked against the scores they come from, so wrong
    # ranks cannot pass by agreeing with a score computed from themselves.
    by_cosine = sorted(rrf.hits, key=lambda h: -h.cosine_similarity)
    assert [h.vector_rank for h in by_cosine] == [1, 2, 3]
    by_text = sorted((h for h in rrf.hits if h.HasField("text_rank")), key=lambda h: -h.text_score)
    assert [h.text_rank for h in by_text] == [1, 2]  # the memory without a query word was no text candidate
    top = rrf.hits[0]
    assert top.memory.value == "the deploy pipeline uses argo" and (top.vector_rank, top.text_rank) == (1, 1)
    assert top.score == pytest.approx(2 / 61)


async def test_weighted_fusion_and_boosts(server: RunningServer) -> None:
    low = await server.memory.Store(agent_memory("database failover drill", importance=0.0))
    high = await server.memory.Store(agent_memory("database failover runbook", importance=1.0))
    plain = await server.memory.Search(
        memory_pb2.SearchRequest(query="database failover", fusion=memory_pb2.FUSION_WEIGHTED, alpha=0.5)
    )
    for hit in plain.hits:
        assert 0.0 <= hit.score <= 1.0
    boosted = await server.memory.Search(
        memory_pb2.SearchRequest(query="database failover", importance_boost=10.0, top_k=2)
    )
    assert boosted.hits[0].memory.id == high.id
    assert {h.memory.id for h in boosted.hits} == {low.id, high.id}


async def test_min_score_drops_weak_hits(server: RunningServer) -> None:
    await server.memory.Store(agent_memory("alpha beta gamma"))
    await server.memory.Store(agent_memory("completely unrelated words here"))
    response = await server.memory.Search(
        memory_pb2.SearchRequest(query="alpha beta gamma", mode=memory_pb2.SEARCH_MODE_VECTOR, min_score=0.9)
    )
    assert [h.memory.value for h in response.hits] == ["alpha beta gamma"]


async def test_filters_restrict_results(server: RunningServer) -> None:
    await server.memory.Store(agent_memory("shared words apple", scope_id=1, tags=["fruit"], agent_id=5))
    await server.memory.Store(agent_memory("shared words banana", scope_id=2, tags=["fruit", "yellow"], agent_id=6))
    request = memory_pb2.MemoryInput(
        scope=memory_pb2.SCOPE_PROJECT,
        scope_id=9,
        value="shared words cherry",
        memory_type=memory_pb2.MEMORY_TYPE_SKILL,
    )
    request.metadata.update({"team": "infra"})
    await server.memory.Store(memory_pb2.StoreRequest(memory=request))

    async def values(memory_filter: memory_pb2.MemoryFilter) -> set[str]:
        response = await server.memory.Search(memory_pb2.SearchRequest(query="shared words", filter=memory_filter))
        return {h.memory.value.split()[-1] for h in response.hits}

    scope = memory_pb2.ScopeRef
    assert await values(memory_pb2.MemoryFilter()) == {"apple", "banana", "cherry"}
    assert await values(memory_pb2.MemoryFilter(scopes=[scope(scope=memory_pb2.SCOPE_AGENT, scope_id=2)])) == {"banana"}
    assert await values(memory_pb2.MemoryFilter(scopes=[scope(scope=memory_pb2.SCOPE_AGENT)])) == {"apple", "banana"}
    assert await values(
        memory_pb2.MemoryFilter(
            scopes=[scope(scope=memory_pb2.SCOPE_AGENT, scope_id=1), scope(scope=memory_pb2.SCOPE_PROJECT, scope_id=9)]
        )
    ) == {"apple", "cherry"}
    assert await values(memory_pb2.MemoryFilter(tags=["fruit", "yellow"])) == {"banana"}
    assert await values(memory_pb2.MemoryFilter(agent_id=5)) == {"apple"}
    assert await values(memory_pb2.MemoryFilter(memory_types=[memory_pb2.MEMORY_TYPE_SKILL])) == {"cherry"}
    metadata_filter = memory_pb2.MemoryFilter()
    metadata_filter.metadata_contains.update({"team": "infra"})
    assert await values(metadata_filter) == {"cherry"}


@pytest.mark.parametrize(
    "query",
    ['"unbalanced', "a & | ! b", "-", "OR OR", "(((", "'; DROP TABLE x; --", "the", "ñandú ∑ 🚀", ":*", "\\"],
)
async def test_any_text_is_a_valid_text_query(server: RunningServer, query: str) -> None:
    await server.memory.Store(agent_memory("something to search"))
    response = await server.memory.Search(memory_pb2.SearchRequest(query=query, mode=memory_pb2.SEARCH_MODE_TEXT))
    assert response.mode == memory_pb2.SEARCH_MODE_TEXT


# A table with a real ivfflat index, for the completeness guarantee.

ROWS = 20000
SCOPES = 100  # one scope_id selects 1% of the rows


@pytest.fixture
async def indexed(database_url: str) -> AsyncIterator[tuple[RunningServer, Corpus]]:
    corpus = clustered(ROWS, topics=60, scopes=SCOPES)
    env = test_env(database_url, VECTOR_INDEX="ivfflat", EXACT_SEARCH_MAX_ROWS="1000", SEARCH_NARROW_FILTER_ROWS="10")
    running = await start_server(env)
    await running.server.runtime.binding.bind_now()  # the rows below are copied in behind the service's back
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        await copy_into_memories(conn, records(corpus, model="hash-ngram-v1"))
        await conn.execute("ANALYZE memory.memories")
    finally:
        await conn.close()
    outcome = await running.server.runtime.index.maintain()
    assert outcome.startswith("rebuilt ivfflat with lists=")
    yield running, corpus
    await stop_server(running)


async def _plan_uses_ivfflat(
    database_url: str, memory_filter: MemoryFilter, vector: np.ndarray, *, limit: int = 10
) -> bool:
    """Whether PostgreSQL would answer this filtered query through the ivfflat index (not a btree and a sort)."""
    params = Params()
    where = where_clause(memory_filter, params)
    sql = "EXPLAIN " + search_sql._vector_cte(where, params.add(vector), str(limit), exact=False)
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        plan = "\n".join(r[0] for r in await conn.fetch(sql, *params.values))
    finally:
        await conn.close()
    return "memories_embedding_ivfflat" in plan


async def _query_whose_nearest_list_is_short(
    database_url: str, corpus: Corpus, memory_filter: MemoryFilter, top_k: int
) -> np.ndarray:
    """A stored vector for which ivfflat at probes = 1, without iterative scans, finds fewer than ``top_k`` matches."""
    params = Params()
    where = where_clause(memory_filter, params)
    vector = params.add(None)
    sql = f"SELECT count(*) FROM ({search_sql._vector_cte(where, vector, str(top_k), exact=False)}) s"
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        await conn.execute("SET ivfflat.probes = 1; SET ivfflat.iterative_scan = off")
        for i in range(5, 200):
            values = list(params.values)
            values[int(vector[1:]) - 1] = corpus.vectors[i]
            if await conn.fetchval(sql, *values) < top_k:
                return corpus.vectors[i]
    finally:
        await conn.close()
    raise AssertionError("no stored vector's nearest list is short of top_k matches")


async def test_filtered_vector_search_on_indexed_table_returns_top_k(
    indexed: tuple[RunningServer, Corpus], database_url: str
) -> None:
    running, corpus = indexed
    state = running.server.runtime.index.state
    assert state.usable and state.lists >= 6
    # About 1% of rows have importance >= 0.99, and no btree index can find them: PostgreSQL scans ivfflat and
    # filters afterwards, which at probes=1 would keep only a handful of rows without iterative scans.
    assert 100 < int((corpus.importance >= 0.99).sum()) < 300
    assert await _plan_uses_ivfflat(database_url, MemoryFilter(min_importance=0.99), corpus.vectors[0])
    for row in (3, 420, 777):
        request = memory_pb2.SearchRequest(
            query_embedding=corpus.vectors[row].tolist(),
            top_k=10,
            probes=1,
            filter=memory_pb2.MemoryFilter(min_importance=0.99),
        )
        response = await running.memory.Search(request)
        assert len(response.hits) == 10
        assert all(h.memory.importance >= 0.99 for h in response.hits)
        assert response.plan == "ivfflat-iterative" and not response.exact

        exact = await running.memory.Search(memory_pb2.SearchRequest(exact=True, **_fields(request)))
        assert exact.exact and exact.plan == "exact"
        assert len(exact.hits) == 10


async def test_without_iterative_scans_a_short_answer_falls_back_to_exact(
    indexed: tuple[RunningServer, Corpus], database_url: str
) -> None:
    running, corpus = indexed
    # A query whose one probed list holds fewer than top_k rows that pass the filter (a list holds about 1000 rows,
    # about 10 of them pass; but list sizes depend on the index build, so the premise is checked, not assumed).
    query = await _query_whose_nearest_list_is_short(database_url, corpus, MemoryFilter(min_importance=0.99), 20)
    assert await _plan_uses_ivfflat(database_url, MemoryFilter(min_importance=0.99), query, limit=20)
    running.server.runtime.search.iterative_scan = False  # behave as on pgvector < 0.8
    request = memory_pb2.SearchRequest(
        query_embedding=query.tolist(),
        top_k=20,
        probes=1,
        filter=memory_pb2.MemoryFilter(min_importance=0.99),
    )
    response = await running.memory.Search(request)
    assert len(response.hits) == 20
    assert response.exact and response.plan == "exact"
    expected = np.flatnonzero(corpus.importance >= 0.99)
    truth = expected[np.argsort(-(corpus.vectors[expected] @ query))[:20]]
    assert {h.memory.key for h in response.hits} == {f"row-{i}" for i in truth}


async def test_unfiltered_search_uses_the_index_with_good_recall(indexed: tuple[RunningServer, Corpus]) -> None:
    running, corpus = indexed
    found = 0
    for i in range(0, 400, 20):
        query = corpus.vectors[i].tolist()
        approx = await running.memory.Search(memory_pb2.SearchRequest(query_embedding=query, top_k=10))
        exact = await running.memory.Search(memory_pb2.SearchRequest(query_embedding=query, top_k=10, exact=True))
        assert approx.plan == "ivfflat-iterative" and approx.probes >= 1
        found += len({h.memory.id for h in approx.hits} & {h.memory.id for h in exact.hits})
    assert found / (20 * 10) >= 0.9


async def test_narrow_filter_is_searched_exactly(database_url: str) -> None:
    corpus = clustered(3000, topics=30, scopes=SCOPES)
    running = await start_server(test_env(database_url, EXACT_SEARCH_MAX_ROWS="1000"))
    try:
        await running.server.runtime.binding.bind_now()  # the rows below are copied in behind the service's back
        conn = await asyncpg.connect(database_url)
        try:
            await init_connection(conn)
            await copy_into_memories(conn, records(corpus, model="hash-ngram-v1"))
        finally:
            await conn.close()
        await running.server.runtime.index.maintain()
        request = memory_pb2.SearchRequest(
            query_embedding=corpus.vectors[0].tolist(),
            filter=memory_pb2.MemoryFilter(scopes=[memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_PROJECT, scope_id=5)]),
        )
        response = await running.memory.Search(request)
        assert response.plan == "exact" and len(response.hits) == 10
        truth = np.argsort(-(corpus.vectors[corpus.scope_ids == 5] @ corpus.vectors[0]))[:10]
        expected = {f"row-{i}" for i in np.flatnonzero(corpus.scope_ids == 5)[truth]}
        assert {h.memory.key for h in response.hits} == expected
    finally:
        await stop_server(running)


def _fields(request: memory_pb2.SearchRequest) -> dict[str, object]:
    return {field.name: value for field, value in request.ListFields()}


async def test_search_rejects_bad_requests(server: RunningServer) -> None:
    cases = [
        (memory_pb2.SearchRequest(), "query"),
        (memory_pb2.SearchRequest(query="x", top_k=-1), "top_k"),
        (memory_pb2.SearchRequest(query_embedding=[0.1, 0.2]), "query_embedding"),
        (memory_pb2.SearchRequest(query="x", mode=99), "mode"),  # type: ignore[arg-type]
        (memory_pb2.SearchRequest(query="x", alpha=2.0), "alpha"),
        (memory_pb2.SearchRequest(query="x\x00y"), "query"),
        (memory_pb2.SearchRequest(query="x", rrf_k=0), "rrf_k"),
        (memory_pb2.SearchRequest(query="x", recency_boost=1.0), "recency_half_life"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as caught:
            await server.memory.Search(request)
        assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT, request
        assert (caught.value.details() or "").startswith(field), (field, caught.value.details())


async def test_searches_go_to_the_read_replica(database_url: str, server_dsn: str, template_dsn: str) -> None:
    # A second database stands in for a replica that has not caught up: searches must read from it.
    replica = await create_database(server_dsn, "memory_service_test_template")
    running = await start_server(test_env(database_url, DATABASE_READ_URL=replica))
    try:
        stored = await running.memory.Store(agent_memory("only on the primary"))
        response = await running.memory.Search(memory_pb2.SearchRequest(query="only on the primary"))
        assert list(response.hits) == []
        assert (await running.memory.Get(memory_pb2.GetRequest(id=stored.id))).memory.value == "only on the primary"
    finally:
        await stop_server(running)
        await drop_database(server_dsn, replica)


def test_set_local_statement_accepts_only_plain_names_and_values() -> None:
    assert begin_statement({"ivfflat.probes": "10"}, readonly=True) == (
        "BEGIN READ ONLY; SET LOCAL ivfflat.probes = '10'"
    )
    for name, value in (("ivfflat.probes", "1'; DROP TABLE x; --"), ("search_path; RESET", "x"), ("a.b", "")):
        with pytest.raises(ValueError):
            begin_statement({name: value})
