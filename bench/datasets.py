"""Corpora with structure, shared by the benchmarks and the search tests, selectable by name (``corpus``).

Uniform random vectors are the worst case of any IVF index and say nothing about real embeddings, which
cluster by topic. Here each row belongs to a topic: its vector is the topic's centre plus noise, and its text
draws most words from the topic's vocabulary, so vector, text and hybrid search all have something to find.

``clustered`` is well separated: ivfflat finds every neighbour at probes = 1, so it cannot tell a good default
from a wasteful one. ``hard`` and ``harder`` group the topic centres around a few super-topic centres and add more
noise, so a query's neighbours spread over many lists, as real embeddings' do: on 100k rows with lists = 100, at
probes = 10 (about sqrt(lists)) ivfflat's recall@10 measured 0.97-0.98 for ``hard`` and 0.91 for ``harder``.
``minilm`` is real all-MiniLM-L6-v2 vectors of SciFact sentences (``bench.minilm``), 100k rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Final

import asyncpg
import numpy as np
import numpy.typing as npt

from bench.corpus import Corpus
from memory_service.config.settings import DEFAULT_HASH_MODEL
from memory_service.storage import settings_sql

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zu", "pe", "da", "go", "hi", "ju", "ba", "fe")


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))


@dataclasses.dataclass(frozen=True)
class Shape:
    """How a synthetic corpus is drawn."""

    topics: int = 200
    noise: float = 0.6
    """Norm of each row's noise against its topic centre's 1: the larger, the more rows of nearby topics mix."""
    super_topics: int = 0
    """0: topic centres drawn independently (nearly orthogonal in 384-d, so well separated). Otherwise each topic
    centre is one of these super-topic centres plus ``spread`` of noise, so topics crowd together."""
    spread: float = 0.0


SHAPES: Final = {
    "clustered": Shape(),
    # Chosen by measuring recall on PostgreSQL at 100k rows, lists = 100 (see the module docstring).
    "hard": Shape(topics=2000, noise=1.1, super_topics=8, spread=0.6),
    "harder": Shape(topics=2000, noise=1.0, super_topics=6, spread=0.6),
}
NAMES: Final = (*SHAPES, "minilm")
_SLICE_ROWS = 50_000


def corpus(name: str, rows: int, *, scopes: int = 100, seed: int = 7) -> Corpus:
    """The corpus called ``name`` (one of ``NAMES``) with ``rows`` rows."""
    if name == "minilm":
        from bench.minilm import scifact_corpus

        return scifact_corpus(rows, scopes=scopes, seed=seed)
    try:
        shape = SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r}; expected one of {', '.join(NAMES)}") from None
    return synthetic(rows, shape, scopes=scopes, seed=seed)


def clustered(
    rows: int, *, dim: int = 384, topics: int = 200, scopes: int = 100, noise: float = 0.6, seed: int = 7
) -> Corpus:
    """``rows`` memories in ``topics`` clusters; ``scope_id = row % scopes`` so one scope is a 1/scopes filter."""
    return synthetic(rows, Shape(topics=topics, noise=noise), dim=dim, scopes=scopes, seed=seed)


def _unit(rows: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def synthetic(rows: int, shape: Shape, *, dim: int = 384, scopes: int = 100, seed: int = 7) -> Corpus:
    """``rows`` memories drawn as ``shape`` says; ``scope_id = row % scopes`` so one scope is a 1/scopes filter."""
    rng = np.random.default_rng(seed)
    topics = shape.topics
    if shape.super_topics:
        supers = _unit(rng.normal(size=(shape.super_topics, dim)).astype(np.float32))
        parent = rng.integers(0, shape.super_topics, size=topics)
        spread = shape.spread * rng.normal(size=(topics, dim)).astype(np.float32) / np.sqrt(dim)
        centres = _unit(supers[parent] + spread)
    else:
        centres = _unit(rng.normal(size=(topics, dim)).astype(np.float32))
    topic_of = rng.integers(0, topics, size=rows)
    vectors = np.empty((rows, dim), dtype=np.float32)
    # In slices, so a million rows never hold a float64 copy of the whole table (the draws are the same).
    for start in range(0, rows, _SLICE_ROWS):
        stop = min(rows, start + _SLICE_ROWS)
        noise = shape.noise * rng.normal(size=(stop - start, dim)).astype(np.float32) / np.sqrt(dim)
        vectors[start:stop] = _unit(centres[topic_of[start:stop]] + noise)
    vocabulary = [[_word(rng) for _ in range(12)] for _ in range(topics)]
    common = [_word(rng) for _ in range(400)]
    texts = []
    for row in range(rows):
        words = list(rng.choice(vocabulary[topic_of[row]], size=5)) + list(rng.choice(common, size=7))
        rng.shuffle(words)
        texts.append(f"note {row}: " + " ".join(words))
    return Corpus(
        vectors=vectors,
        texts=texts,
        topics=topic_of,
        scope_ids=np.arange(rows, dtype=np.int64) % scopes,
        importance=rng.uniform(0, 1, size=rows).astype(np.float32),
        centres=centres,
        vocabulary=vocabulary,
        noise=shape.noise,
    )


def queries(corpus: Corpus, count: int, *, seed: int = 11) -> tuple[npt.NDArray[np.float32], list[str]]:
    """Queries from the corpus's own distribution, never stored rows.

    Synthetic corpora: a topic centre plus the rows' noise, and two topic words. Corpora with queries of their own
    (``query_vectors``) give those, repeated when ``count`` is larger."""
    if corpus.query_vectors is not None and corpus.query_texts is not None:
        picked = np.arange(count) % len(corpus.query_vectors)
        return corpus.query_vectors[picked], [corpus.query_texts[i] for i in picked]
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, len(corpus.centres), size=count)
    dim = corpus.vectors.shape[1]
    vectors = corpus.centres[topic] + corpus.noise * rng.normal(size=(count, dim)).astype(np.float32) / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [" ".join(rng.choice(corpus.vocabulary[t], size=2, replace=False)) for t in topic]
    return vectors.astype(np.float32), texts


def records(corpus: Corpus, *, model: str, scope: str = "project") -> list[tuple[object, ...]]:
    """Rows in the column order of ``COPY_COLUMNS``."""
    return [
        (
            scope,
            int(corpus.scope_ids[i]),
            f"row-{i}",
            text,
            corpus.vectors[i],
            hashlib.sha256(text.encode()).digest(),
            model,
            float(corpus.importance[i]),
        )
        for i, text in enumerate(corpus.texts)
    ]


COPY_COLUMNS = ("scope", "scope_id", "key", "value", "embedding", "content_hash", "embedding_model", "importance")


async def copy_into_memories(conn: asyncpg.Connection, rows: list[tuple[object, ...]]) -> None:
    """Plain binary COPY straight into memory.memories: the floor any ingest path is measured against."""
    await conn.copy_records_to_table("memories", schema_name="memory", columns=COPY_COLUMNS, records=rows)


async def load_for_index(conn: asyncpg.Connection, rows: list[tuple[object, ...]]) -> None:
    """Bind a fresh database to the hash model (as its first store would), COPY ``rows`` in, and give the session
    the memory an index build over them wants: how the index benchmarks start."""
    async with conn.transaction():
        await settings_sql.bind_embedding_model(conn, DEFAULT_HASH_MODEL, 384)
    await copy_into_memories(conn, rows)
    await conn.execute("SET maintenance_work_mem = '512MB'")
