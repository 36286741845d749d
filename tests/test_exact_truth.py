"""A calibration's truth in one pass: the same neighbours, in the same order, as an exact scan per query."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.datasets import clustered, copy_into_memories, records
from memory_service.models import MemoryFilter
from memory_service.search.exact_truth import ExactTop, exact_top
from memory_service.storage import calibration_sql, settings_sql
from memory_service.storage.database import init_connection


def by_scan(queries: np.ndarray, ids: list[int], vectors: np.ndarray, k: int) -> list[list[int]]:
    """What an exact scan answers: every row's cosine distance (in float32, as pgvector computes it), ordered by
    distance, then id."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    answers = []
    for query in queries:
        distances = (1.0 - unit @ (query / np.linalg.norm(query))).astype(np.float32)
        answers.append([i for _, i in sorted(zip(distances.tolist(), ids, strict=True))[:k]])
    return answers


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 60),
    batch=st.integers(1, 25),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_batches_find_the_scan_s_neighbours_ties_by_id(rows: int, batch: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Few distinct vectors, so most rows tie with others (as identical texts under the hash embedder do), and ids
    # that do not come in order.
    distinct = rng.normal(size=(4, 8))
    vectors = distinct[rng.integers(0, 4, size=rows)] * rng.choice([1.0, 2.0], size=(rows, 1))
    ids = rng.permutation(np.arange(1, rows + 1) * 7).tolist()
    queries = rng.normal(size=(5, 8))
    top = ExactTop(list(queries), k)
    for start in range(0, rows, batch):
        top.offer(ids[start : start + batch], list(vectors[start : start + batch]))
    assert top.nearest() == (by_scan(queries, ids, vectors, k) if rows else [[] for _ in queries])


async def test_no_queries_read_nothing() -> None:
    async def batches() -> AsyncIterator[tuple[list[int], list[np.ndarray]]]:
        raise AssertionError("the table was read for no query")
        yield [], []

    assert await exact_top([], batches(), 10) == []
    empty = ExactTop([], 10)
    empty.offer([1, 2], [np.ones(4), np.ones(4)])
    assert empty.nearest() == []


async def test_one_pass_over_the_table_agrees_with_the_exact_scan_of_each_query(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await init_connection(conn)
        async with conn.transaction():
            await settings_sql.bind_embedding_model(conn, "hash-ngram-v1", 384)
        corpus = clustered(3000, topics=20, seed=3)
        await copy_into_memories(conn, records(corpus, model="hash-ngram-v1"))
        # An expired memory is no one's neighbour.
        await conn.execute("UPDATE memory.memories SET expires_at = now() - interval '1 day' WHERE id % 10 = 0")
        queries = list(corpus.vectors[:40] + 0.01)
        found = await exact_top(queries, calibration_sql.live_vectors(conn, batch=700), 10)
        for query, nearest in zip(queries, found, strict=True):
            expected = await calibration_sql.nearest(conn, MemoryFilter(), query, limit=10, exact=True)
            assert nearest == expected
        assert not conn.is_in_transaction()
    finally:
        await conn.close()
