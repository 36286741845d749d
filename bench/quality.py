"""Search quality on a BEIR-format labeled set, through the service's own gRPC, beside an in-process BM25.

    python -m bench.quality --data ../shared/data/scifact --model ../shared/models/all-MiniLM-L6-v2

For each embedding setup (the default hash embedder, and the local ONNX model when ``--model`` names one) it starts
a server on a fresh database, loads ``corpus.jsonl`` through BulkStore (``title + " " + text`` as the value, the
document id in metadata), waits until the text statistics cover the corpus, and runs every test query of
``qrels/test.tsv`` through Search in each mode and fusion. It prints nDCG@10 (graded gains, log2 discount, ideal
ranking from the qrels) and recall@100 next to bm25s (Lucene BM25, English stopwords, Snowball stemmer) run here
on the same texts.

With the local model, documents are sent with the vectors of ``all-MiniLM-L6-v2.npz`` when the set has it (the same
model: the bench checks that the service's own embeddings of a sample agree), because embedding 5,000 abstracts on
two cores takes minutes; ``--embed-corpus`` makes the service embed them instead. Queries are always embedded by
the service.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import asyncpg
import numpy as np
from google.protobuf import struct_pb2
from grpc import aio

from bench.harness import ServerProcess, database_server, fresh_database, print_table, reindex
from memory_service.v1 import memory_pb2, memory_pb2_grpc

TOP_K = 100
BATCH = 500
MODES = {
    "TEXT": dict(mode=memory_pb2.SEARCH_MODE_TEXT),
    "VECTOR": dict(mode=memory_pb2.SEARCH_MODE_VECTOR),
    "HYBRID (default)": dict(mode=memory_pb2.SEARCH_MODE_HYBRID),
    "HYBRID rrf k=60": dict(mode=memory_pb2.SEARCH_MODE_HYBRID, fusion=memory_pb2.FUSION_RRF),
}


@dataclasses.dataclass
class LabeledSet:
    docs: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    vectors: dict[str, np.ndarray] | None
    other_queries: list[str] = dataclasses.field(default_factory=list)
    """Queries without judgements (not test queries): real traffic for the index's calibration."""

    @classmethod
    def load(cls, root: Path) -> LabeledSet:
        docs = {}
        with (root / "corpus.jsonl").open() as corpus:
            for line in corpus:
                doc = json.loads(line)
                docs[doc["_id"]] = (doc.get("title", "") + " " + doc["text"]).strip()
        qrels: dict[str, dict[str, int]] = collections.defaultdict(dict)
        with (root / "qrels" / "test.tsv").open() as handle:
            next(handle)
            for line in handle:
                query_id, doc_id, score = line.rstrip("\n").split("\t")
                qrels[query_id][doc_id] = int(score)
        queries, others = {}, []
        with (root / "queries.jsonl").open() as lines:
            for line in lines:
                query = json.loads(line)
                if query["_id"] in qrels:
                    queries[query["_id"]] = query["text"]
                else:
                    others.append(query["text"])
        vectors = None
        npz = next(root.glob("*.npz"), None)
        if npz is not None:
            arrays = np.load(npz)
            vectors = dict(zip(arrays["corpus_ids"].tolist(), arrays["corpus_vectors"], strict=True))
        return cls(docs, queries, dict(qrels), vectors, others)


def ndcg_at(ranked: Sequence[str], relevant: dict[str, int], k: int = 10) -> float:
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    best = sum(gain / math.log2(i + 2) for i, gain in enumerate(ideal))
    return dcg / best if best > 0 else 0.0


def recall_at(ranked: Sequence[str], relevant: dict[str, int], k: int = 100) -> float:
    wanted = {doc for doc, gain in relevant.items() if gain > 0}
    return len(wanted & set(ranked[:k])) / len(wanted) if wanted else 0.0


def evaluate(runs: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> tuple[float, float]:
    ndcg = sum(ndcg_at(runs[q], qrels[q]) for q in qrels) / len(qrels)
    recall = sum(recall_at(runs[q], qrels[q]) for q in qrels) / len(qrels)
    return ndcg, recall


def bm25_baseline(data: LabeledSet) -> dict[str, list[str]]:
    """bm25s with Lucene's formula, k1 = 1.2, b = 0.75, English stopwords and the Snowball stemmer."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    ids = list(data.docs)
    retriever = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
    retriever.index(bm25s.tokenize([data.docs[i] for i in ids], stopwords="en", stemmer=stemmer, show_progress=False))
    query_ids = list(data.queries)
    tokens = bm25s.tokenize([data.queries[q] for q in query_ids], stopwords="en", stemmer=stemmer, show_progress=False)
    results, _ = retriever.retrieve(tokens, k=TOP_K, show_progress=False)
    return {q: [ids[j] for j in row] for q, row in zip(query_ids, results, strict=True)}


def items(data: LabeledSet, *, with_vectors: bool) -> Iterator[memory_pb2.BulkStoreRequest]:
    batch: list[memory_pb2.BulkItem] = []
    for sequence, (doc_id, text) in enumerate(data.docs.items(), start=1):
        metadata = struct_pb2.Struct()
        metadata.update({"_id": doc_id})
        memory = memory_pb2.MemoryInput(
            scope=memory_pb2.SCOPE_PROJECT, scope_id=1, value=text, metadata=metadata, importance=0.5
        )
        if with_vectors and data.vectors is not None:
            memory.embedding.extend(data.vectors[doc_id].tolist())
        batch.append(memory_pb2.BulkItem(sequence=sequence, memory=memory))
        if len(batch) == BATCH:
            yield memory_pb2.BulkStoreRequest(items=batch)
            batch = []
    if batch:
        yield memory_pb2.BulkStoreRequest(items=batch)


async def load(stub: memory_pb2_grpc.MemoryServiceStub, data: LabeledSet, *, with_vectors: bool) -> float:
    started = time.perf_counter()
    rejected = 0
    async for ack in stub.BulkStore(items(data, with_vectors=with_vectors)):
        rejected += ack.rejected
    if rejected:
        raise RuntimeError(f"{rejected} documents were rejected")
    return time.perf_counter() - started


async def wait_for_text_statistics(dsn: str, docs: int, timeout: float = 120.0) -> None:
    """The server refreshes them in the background; rankings are measured once they cover the whole corpus."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while await conn.fetchval("SELECT docs FROM memory.text_corpus") != docs:
            if time.monotonic() > deadline:
                raise RuntimeError("text statistics were not refreshed in time")
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def check_vectors_agree(stub: memory_pb2_grpc.MemoryServiceStub, data: LabeledSet, sample: int = 32) -> float:
    """Lowest cosine between the service's embeddings and the set's precomputed ones, over a sample."""
    assert data.vectors is not None
    ids = list(data.docs)[:sample]
    response = await stub.Embed(memory_pb2.EmbedRequest(texts=[data.docs[i] for i in ids]))
    return min(
        float(np.dot(np.asarray(e.values), data.vectors[i])) for e, i in zip(response.embeddings, ids, strict=True)
    )


async def search_all(
    stub: memory_pb2_grpc.MemoryServiceStub, data: LabeledSet, **options: float
) -> dict[str, list[str]]:
    runs = {}
    for query_id, text in data.queries.items():
        response = await stub.Search(memory_pb2.SearchRequest(query=text, top_k=TOP_K, **options))
        runs[query_id] = [hit.memory.metadata["_id"] for hit in response.hits]
    return runs


async def calibrate_on_traffic(stub: memory_pb2_grpc.MemoryServiceStub, data: LabeledSet) -> str:
    """Search with the set's unjudged queries (never the test queries) until the server has recalibrated its index
    on them, as it does on its own traffic; say what the calibration found."""
    for text in data.other_queries:
        await stub.Search(memory_pb2.SearchRequest(query=text, top_k=10, mode=memory_pb2.SEARCH_MODE_VECTOR))
    for _ in range(120):
        index = (await stub.Stats(memory_pb2.StatsRequest())).index
        if index.calibration.source == "searches":
            found = index.calibration
            return f"recalibrated on {found.queries} searches: probes {found.probes} (recall {found.recall:.3f})"
        await asyncio.sleep(1)
    raise TimeoutError("the server did not recalibrate on the searches it saw")


@contextlib.asynccontextmanager
async def served(server_dsn: str, env: dict[str, str]) -> AsyncIterator[tuple[str, memory_pb2_grpc.MemoryServiceStub]]:
    async with fresh_database(server_dsn) as dsn:
        process = ServerProcess({"DATABASE_URL": dsn, "TEXT_STATS_INTERVAL": "1s", **env})
        try:
            process.wait_ready()
            async with aio.insecure_channel(process.address) as channel:
                yield dsn, memory_pb2_grpc.MemoryServiceStub(channel)
        finally:
            process.stop()


async def measure(
    name: str,
    server_dsn: str,
    env: dict[str, str],
    data: LabeledSet,
    *,
    with_vectors: bool,
    alphas: Sequence[float] = (),
    index: bool = False,
) -> list[list[object]]:
    rows: list[list[object]] = []
    if index:
        env = {"EXACT_SEARCH_MAX_ROWS": "1000", "INDEX_CHECK_INTERVAL": "1s", **env}
    async with served(server_dsn, env) as (dsn, stub):
        seconds = await load(stub, data, with_vectors=with_vectors)
        print(f"{name}: loaded {len(data.docs)} documents in {seconds:.1f}s", flush=True)
        if with_vectors:
            print(f"{name}: lowest cosine, service vs precomputed vectors: {await check_vectors_agree(stub, data):.6f}")
        await wait_for_text_statistics(dsn, len(data.docs))
        modes = dict(MODES)
        if index:
            # The set is below the exact-search threshold: build and calibrate the index anyway, and compare.
            outcome, took = reindex({**env, "DATABASE_URL": dsn})
            print(f"{name}: {outcome} ({took:.1f}s)", flush=True)
            await stub.Stats(memory_pb2.StatsRequest())  # the server reads the new index and its calibration
            print(f"{name}: {await calibrate_on_traffic(stub, data)}", flush=True)
            modes["VECTOR (exact)"] = dict(mode=memory_pb2.SEARCH_MODE_VECTOR, exact=True)
        for alpha in alphas:
            modes[f"HYBRID alpha={alpha:g}"] = dict(mode=memory_pb2.SEARCH_MODE_HYBRID, alpha=alpha)
        for mode, options in modes.items():
            started = time.perf_counter()
            runs = await search_all(stub, data, **options)
            per_query_ms = (time.perf_counter() - started) * 1000 / len(data.queries)
            ndcg, recall = evaluate(runs, data.qrels)
            rows.append([f"service {mode}, {name}", ndcg, recall, per_query_ms])
    return rows


async def run(args: argparse.Namespace) -> None:
    data = LabeledSet.load(args.data)
    started = time.perf_counter()
    baseline = evaluate(bm25_baseline(data), data.qrels)
    rows: list[list[object]] = [
        ["bm25s (in process)", *baseline, (time.perf_counter() - started) * 1000 / len(data.queries)]
    ]
    with database_server() as server_dsn:
        extra = {f"{key}": value for key, value in (pair.split("=", 1) for pair in args.env)}
        rows += await measure(
            "hash embedder",
            server_dsn,
            {"EMBEDDING_PROVIDER": "hash", **extra},
            data,
            with_vectors=False,
            alphas=args.alphas,
            index=args.index,
        )
        if args.model is not None:
            env = {"EMBEDDING_PROVIDER": "local", "EMBEDDING_MODEL_PATH": str(args.model.resolve()), **extra}
            with_vectors = data.vectors is not None and not args.embed_corpus
            rows += await measure(
                "local MiniLM", server_dsn, env, data, with_vectors=with_vectors, alphas=args.alphas, index=args.index
            )
    print()
    print(f"{len(data.docs)} documents, {len(data.queries)} queries ({args.data.name})")
    print_table(["system", "nDCG@10", "recall@100", "ms/query"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/scifact"))
    parser.add_argument("--model", type=Path, default=None, help="a local ONNX model directory (EMBEDDING_MODEL_PATH)")
    parser.add_argument("--embed-corpus", action="store_true", help="let the service embed the documents too")
    parser.add_argument("--alphas", type=float, nargs="*", default=[], help="also run weighted hybrid at these alphas")
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE settings for the servers")
    parser.add_argument(
        "--index", action="store_true", help="search through the vector index (built and calibrated) and exactly"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
