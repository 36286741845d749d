"""Synthetic corpora with structure, shared by the benchmarks and the search tests.

Uniform random vectors are the worst case of any IVF index and say nothing about real embeddings, which
cluster by topic. Here each row belongs to a topic: its vector is the topic's centre plus noise, and its text
draws most words from the topic's vocabulary, so vector, text and hybrid search all have something to find.
"""

from __future__ import annotations

import dataclasses
import hashlib

import asyncpg
import numpy as np
import numpy.typing as npt

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zu", "pe", "da", "go", "hi", "ju", "ba", "fe")


@dataclasses.dataclass
class Corpus:
    vectors: npt.NDArray[np.float32]
    texts: list[str]
    topics: npt.NDArray[np.int64]
    scope_ids: npt.NDArray[np.int64]
    importance: npt.NDArray[np.float32]
    """Uniform in [0, 1): ``min_importance = 0.99`` keeps about 1% of the rows, with no index to help."""
    centres: npt.NDArray[np.float32]
    vocabulary: list[list[str]]

    def __len__(self) -> int:
        return len(self.texts)


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))


def clustered(
    rows: int, *, dim: int = 384, topics: int = 200, scopes: int = 100, noise: float = 0.6, seed: int = 7
) -> Corpus:
    """``rows`` memories in ``topics`` clusters; ``scope_id = row % scopes`` so one scope is a 1/scopes filter."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic_of = rng.integers(0, topics, size=rows)
    vectors = centres[topic_of] + noise * rng.normal(size=(rows, dim)).astype(np.float32) / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vocabulary = [[_word(rng) for _ in range(12)] for _ in range(topics)]
    common = [_word(rng) for _ in range(400)]
    texts = []
    for row in range(rows):
        words = list(rng.choice(vocabulary[topic_of[row]], size=5)) + list(rng.choice(common, size=7))
        rng.shuffle(words)
        texts.append(f"note {row}: " + " ".join(words))
    return Corpus(
        vectors=vectors.astype(np.float32),
        texts=texts,
        topics=topic_of,
        scope_ids=np.arange(rows, dtype=np.int64) % scopes,
        importance=rng.uniform(0, 1, size=rows).astype(np.float32),
        centres=centres,
        vocabulary=vocabulary,
    )


def queries(corpus: Corpus, count: int, *, seed: int = 11) -> tuple[npt.NDArray[np.float32], list[str]]:
    """Query vectors near topic centres, and query texts made of two topic words."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, len(corpus.centres), size=count)
    dim = corpus.vectors.shape[1]
    vectors = corpus.centres[topic] + 0.6 * rng.normal(size=(count, dim)).astype(np.float32) / np.sqrt(dim)
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
