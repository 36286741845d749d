"""What the TEXT benchmark measures the service against: exact BM25 computed here, and tantivy and bm25s in process.

* ``ExactBM25``: every memory's lexemes and frequencies read from PostgreSQL (the stored ``search_tsv``, the same
  terms the service ranks), every memory holding a query lexeme scored with the statistics snapshot the service
  uses (``memory.text_terms`` / ``memory.text_corpus``). No pruning, no index code of the service: numpy over the
  raw postings. The truth for overlap@10.
* ``Tantivy``: the Rust search library's Python binding, English stemming tokenizer, default BM25, one segment.
* ``BM25S``: the sparse-matrix BM25 library, PyStemmer's English stemmer and its English stopwords.

The peers tokenize the raw text their own way, so their overlap with exact BM25 over ``tsvector`` terms says how
much two good tokenizers disagree, not that either is wrong. ``bench.peers`` can call ``peer_rows`` for its table.

    pip install -e '.[bench]'     # tantivy, bm25s, PyStemmer
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import numpy as np

from memory_service.storage import text_index_sql

K = 10


class ExactBM25:
    """Exhaustive BM25 over postings read straight from PostgreSQL."""

    def __init__(self, postings: dict[str, tuple[np.ndarray, np.ndarray]], lengths: dict[int, int]) -> None:
        self.postings = postings
        self.ids = np.array(sorted(lengths), dtype=np.int64)
        self.lengths = np.array([lengths[i] for i in self.ids.tolist()], dtype=np.float64)

    @classmethod
    async def read(cls, conn: asyncpg.Connection) -> ExactBM25:
        ids_parts: dict[str, list[np.ndarray]] = {}
        tf_parts: dict[str, list[np.ndarray]] = {}
        lengths: dict[int, int] = {}
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            async for loaded in text_index_sql.load(conn):
                chunk = loaded.postings
                lengths.update(zip(loaded.ids.tolist(), loaded.lengths.tolist(), strict=True))
                order = np.argsort(chunk.term, kind="stable")
                bounds = np.searchsorted(chunk.term[order], np.arange(len(chunk.lexemes) + 1))
                for t, lexeme in enumerate(chunk.lexemes):
                    part = order[bounds[t] : bounds[t + 1]]
                    ids_parts.setdefault(lexeme, []).append(chunk.ids[part])
                    tf_parts.setdefault(lexeme, []).append(chunk.tfs[part])
        postings = {
            lexeme: (np.concatenate(parts), np.concatenate(tf_parts[lexeme]).astype(np.float64))
            for lexeme, parts in ids_parts.items()
        }
        return cls(postings, lengths)

    def top(
        self, lexemes: Sequence[str], dfs: Sequence[int], docs: int, total_length: int, *, k1: float, b: float, k: int
    ) -> list[tuple[int, float]]:
        """The best ``k`` by BM25 over the given statistics (as the service reads them), ties by id."""
        avgdl = total_length / docs if docs else 1.0
        scores = np.zeros(len(self.ids), dtype=np.float64)
        for lexeme, df in zip(lexemes, dfs, strict=True):
            if lexeme not in self.postings:
                continue
            ids, tf = self.postings[lexeme]
            at = np.searchsorted(self.ids, ids)
            idf = math.log(1 + (max(docs, df) - df + 0.5) / (df + 0.5))
            scores[at] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * self.lengths[at] / avgdl))
        held = np.flatnonzero(scores > 0)
        order = np.lexsort((self.ids[held], -scores[held]))[:k]
        return list(zip(self.ids[held][order].tolist(), scores[held][order].tolist(), strict=True))


def overlap(got: Sequence[tuple[int, float]], truth: Sequence[tuple[int, float]]) -> float:
    """Share of the true top-k found, counting a hit whose exact score ties the k-th as found (ties have no order)."""
    if not truth:
        return 1.0
    kth = truth[-1][1]
    exact = {i for i, _ in truth}
    found = sum(1 for i, s in got if i in exact or abs(s - kth) <= 1e-9 * max(1.0, kth))
    return min(found, len(truth)) / len(truth)


def id_overlap(got: Sequence[int], truth: Sequence[int]) -> float:
    """Plain top-k overlap of ids (for peers, whose scores are on another scale)."""
    return len(set(got) & set(truth)) / len(truth) if truth else 1.0


class Tantivy:
    name = "tantivy"

    def __init__(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        import tantivy

        builder = tantivy.SchemaBuilder()
        builder.add_integer_field("id", stored=True, indexed=False, fast=False)
        builder.add_text_field("body", stored=False, tokenizer_name="en_stem")
        schema = builder.build()
        self._dir = tempfile.TemporaryDirectory(prefix="bench-tantivy-")
        self.index = tantivy.Index(schema, path=self._dir.name)
        writer = self.index.writer(heap_size=512_000_000, num_threads=1)
        for memory_id, text in zip(ids, texts, strict=True):
            writer.add_document(tantivy.Document(id=memory_id, body=text))
        writer.commit()
        writer.wait_merging_threads()
        self.index.reload()
        self.searcher = self.index.searcher()
        self.version = getattr(tantivy, "__version__", "")

    def search(self, query: str) -> list[int]:
        # Any word may match, as in the service: tantivy's default query parser ORs the words; its syntax
        # characters are dropped so every query parses.
        clean = " ".join("".join(c if c.isalnum() else " " for c in query).split())
        if not clean:
            return []
        parsed = self.index.parse_query(clean, ["body"])
        hits = self.searcher.search(parsed, K).hits
        return [int(self.searcher.doc(address)["id"][0]) for _, address in hits]


class BM25S:
    name = "bm25s"

    def __init__(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        import bm25s
        import Stemmer

        self._bm25s = bm25s
        self.stemmer = Stemmer.Stemmer("english")
        self.ids = np.asarray(ids, dtype=np.int64)
        tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=self.stemmer, show_progress=False)
        self.retriever = bm25s.BM25(k1=1.2, b=0.75)
        self.retriever.index(tokens, show_progress=False)
        self.version = getattr(bm25s, "__version__", "")

    def search(self, query: str) -> list[int]:
        tokens = self._bm25s.tokenize([query], stopwords="en", stemmer=self.stemmer, show_progress=False)
        if not tokens.vocab:
            return []
        found, scores = self.retriever.retrieve(tokens, k=K, show_progress=False, n_threads=1)
        return [int(self.ids[i]) for i, s in zip(found[0], scores[0], strict=True) if s > 0]


def build_peers(ids: Sequence[int], texts: Sequence[str], names: Sequence[str]) -> list[Any]:
    peers: list[Any] = []
    for name in names:
        started = time.perf_counter()
        peer = Tantivy(ids, texts) if name == "tantivy" else BM25S(ids, texts)
        print(f"{name} {peer.version}: indexed {len(ids)} texts in {time.perf_counter() - started:.1f}s", flush=True)
        peers.append(peer)
    return peers


def peer_rows(peer: Any, queries: Sequence[str], truth: Sequence[Sequence[int]]) -> tuple[list[float], float]:
    """Seconds per query (one at a time, in process) and mean top-10 id overlap with ``truth``."""
    seconds, overlaps = [], []
    for query in queries[:3]:
        peer.search(query)  # warm
    for query, exact in zip(queries, truth, strict=True):
        started = time.perf_counter()
        found = peer.search(query)
        seconds.append(time.perf_counter() - started)
        overlaps.append(id_overlap(found, exact))
    return seconds, float(np.mean(overlaps))
