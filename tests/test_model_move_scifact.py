"""End to end: a database bound to the hash embedder moves to MiniLM, and VECTOR nDCG@10 on SciFact moves with it.

2,000 SciFact documents (every document judged for the first 60 test queries, and others) are stored with the
hash embedder; the local all-MiniLM-L6-v2 is configured as the next model; the backfill runs while memories are
stored and deleted; the gate's figures are read; cut-over, rollback, cut-over and finish go through the real
``memory-service model`` command; a server restarted with ``EMBEDDING_PROVIDER=local`` serves the data.

To keep the suite's cost modest the documents' MiniLM vectors come from the embedding cache, filled beforehand
with the set's published all-MiniLM-L6-v2 vectors of the same texts (the cache is keyed by model and content, as
the service fills it). The real model embeds everything else: the concurrent writes, the gate's and the searches'
queries.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import asyncpg
import pytest

from bench.quality import LabeledSet, items, ndcg_at
from memory_service.cli.main import main
from memory_service.config.settings import DEFAULT_LOCAL_MODEL
from memory_service.generations.backfill import BackfillWorker
from memory_service.models import content_hash
from memory_service.storage import embedding_cache_sql
from memory_service.storage.database import init_connection
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env
from tests.test_local_embeddings import MODEL_DIR, needs_model

DATA = Path(__file__).resolve().parents[2] / "shared/data/scifact"
needs_data = pytest.mark.skipif(not (DATA / "corpus.jsonl").is_file(), reason=f"no SciFact at {DATA}")
DOCS, QUERIES = 2000, 60
NEXT = {"EMBEDDING_NEXT_PROVIDER": "local", "EMBEDDING_NEXT_MODEL_PATH": str(MODEL_DIR)}
AFTER = {"EMBEDDING_PROVIDER": "local", "EMBEDDING_MODEL_PATH": str(MODEL_DIR)}
# Large enough for an index of each generation (built and calibrated before the cut-over), small enough to be quick.
TUNING = {"EXACT_SEARCH_MAX_ROWS": "1000", "INDEX_CHECK_INTERVAL": "1h", "EMBEDDING_THREADS": "2"}


def subset() -> tuple[LabeledSet, list[str]]:
    """The first QUERIES test queries, every document judged for them, other documents up to DOCS; and DOCS more
    documents held back for the concurrent writes."""
    full = LabeledSet.load(DATA)
    queries = dict(sorted(full.queries.items())[:QUERIES])
    qrels = {q: full.qrels[q] for q in queries}
    judged = {d for q in qrels.values() for d in q}
    chosen = list(judged) + [d for d in full.docs if d not in judged][: DOCS - len(judged)]
    spare = [d for d in full.docs if d not in set(chosen)][:30]
    data = LabeledSet(
        docs={d: full.docs[d] for d in chosen}, queries=queries, qrels=qrels, vectors=full.vectors, other_queries=[]
    )
    return data, [full.docs[d] for d in spare]


def _doc_id(memory: memory_pb2.Memory) -> str:
    """The SciFact id of a stored document; "" for the memories the concurrent writes added."""
    if "_id" not in memory.metadata:
        return ""
    return str(memory.metadata["_id"])


async def vector_ndcg(running: RunningServer, data: LabeledSet) -> float:
    total = 0.0
    for query_id, text in data.queries.items():
        request = memory_pb2.SearchRequest(query=text, mode=memory_pb2.SEARCH_MODE_VECTOR, top_k=10)
        response = await running.memory.Search(request)
        ranked = [_doc_id(hit.memory) for hit in response.hits]
        total += ndcg_at(ranked, data.qrels[query_id])
    return total / len(data.queries)


async def fill_cache(dsn: str, data: LabeledSet) -> None:
    """The published MiniLM vectors of the stored texts, as the service's own cache would hold them."""
    assert data.vectors is not None
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)
        entries = [(content_hash(text), data.vectors[doc_id]) for doc_id, text in data.docs.items()]
        await embedding_cache_sql.insert(conn, DEFAULT_LOCAL_MODEL, 384, entries)
    finally:
        await conn.close()


async def backfilled(running: RunningServer) -> None:
    """Until the backfill is complete (this call, or the server's own round, holds its lease)."""
    worker: BackfillWorker = running.server.runtime.moves.backfill
    for _ in range(600):
        if await worker.run() == "backfill complete":
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the backfill did not complete")


async def model(env: dict[str, str], action: str) -> int:
    return await asyncio.to_thread(main, ["model", action], env)


@needs_data
@needs_model
async def test_scifact_moves_from_the_hash_embedder_to_minilm(database_url: str) -> None:
    data, spare = subset()
    env = test_env(database_url, **TUNING)
    first = await start_server(env)
    try:
        async for ack in first.memory.BulkStore(items(dataclasses.replace(data, vectors=None), with_vectors=False)):
            assert not ack.rejected
        await first.server.runtime.index.maintain()
    finally:
        await stop_server(first)
    await fill_cache(database_url, data)

    moving = await start_server({**env, **NEXT})
    try:
        hash_ndcg = await vector_ndcg(moving, data)  # still the hash generation; these are the gate's searches

        deleted = []

        async def writes() -> None:
            for text in spare:
                memory = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_PROJECT, scope_id=2, value=text)
                await moving.memory.Store(memory_pb2.StoreRequest(memory=memory))
            listed = await moving.memory.List(memory_pb2.ListRequest(page_size=5))
            for memory in listed.memories:
                if memory.metadata["_id"] not in {d for q in data.qrels.values() for d in q}:  # keep the judged
                    deleted.append((await moving.memory.Delete(memory_pb2.DeleteRequest(id=memory.id))).deleted)

        await asyncio.gather(writes(), backfilled(moving))
        runtime = moving.server.runtime
        await runtime.moves.backfill.measure_gate()
        maintained = await runtime.moves.other_index.maintain()
        assert "rebuilt" in maintained and "calibrated" in maintained, maintained
        stats = await moving.memory.Stats(memory_pb2.StatsRequest())
        move = stats.model_move
        assert move.phase == "backfilling" and move.backfill_complete and move.next_model == DEFAULT_LOCAL_MODEL
        assert move.gate_searches.queries == QUERIES and move.gate_memories.queries > 10
        # The models disagree (or the gate measures nothing), but not about everything.
        assert 0.05 < move.gate_searches.overlap_at_10 < 0.95
        assert 0.0 < move.gate_searches.top_hit_changed < 1.0

        assert await model(env, "cutover") == 0
        minilm_ndcg = await vector_ndcg(moving, data)  # 0.746 here, from the hash embedder's 0.325
        assert minilm_ndcg > hash_ndcg + 0.1, (hash_ndcg, minilm_ndcg)
        assert await model(env, "rollback") == 0
        assert abs(await vector_ndcg(moving, data) - hash_ndcg) < 0.02
        assert await model(env, "cutover") == 0
        assert await model(env, "finish") == 0
    finally:
        await stop_server(moving)

    served = await start_server({**env, **AFTER})
    try:
        assert abs(await vector_ndcg(served, data) - minilm_ndcg) < 0.02
        # Counted through List: past a small table Stats estimates (after an ANALYZE that autovacuum may run or not).
        listed, token = 0, ""
        while True:
            page = await served.memory.List(memory_pb2.ListRequest(page_size=1000, page_token=token))
            listed, token = listed + len(page.memories), page.next_page_token
            if not token:
                break
        assert listed == DOCS + len(spare) - sum(deleted)
    finally:
        await stop_server(served)
