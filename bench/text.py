"""Text search latency on a large table: BM25 through gRPC, its SQL over asyncpg, and the old all-words query.

    python -m bench.text --rows 100000 --queries 100

The corpus is made of real sentences: each memory joins 2 to 6 sentences drawn from random SciFact abstracts
(``--data``), so word frequencies follow natural language. Queries of 2, 8 and 16 words are cut from the SciFact
claims (padded with words of a random abstract where a claim is short). For each length it prints p50 / p99 of one
client's TEXT search (top_k 10) through gRPC and of the same statement over plain asyncpg, next to the query the
service ran before BM25 (``websearch_to_tsquery``, every word required, ranked by ``ts_rank_cd``): how often that
one found anything, and how many memories hold any of the query's words, which BM25 must not all score.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import time
from pathlib import Path

import asyncpg
import numpy as np
from grpc import aio

from bench.datasets import copy_into_memories
from bench.harness import ServerProcess, database_server, fresh_database, latencies, percentile_ms, print_table
from memory_service.app.runtime import Runtime
from memory_service.config.settings import Settings
from memory_service.metrics import Metrics
from memory_service.models import MemoryFilter
from memory_service.search.tuning import TextRanking
from memory_service.storage import search_sql
from memory_service.storage.database import init_connection
from memory_service.v1 import memory_pb2, memory_pb2_grpc

K = 10
LENGTHS = (2, 8, 16)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9-]+")

OLD_ALL_WORDS = (
    "SELECT m.id, ts_rank_cd(m.search_tsv, q) AS text_score "
    "FROM memory.memories m, websearch_to_tsquery('english', $1) q "
    "WHERE m.search_tsv @@ q AND (m.expires_at IS NULL OR m.expires_at > now()) "
    "ORDER BY text_score DESC, m.id LIMIT $2"
)
ANY_WORD_COUNT = (
    "SELECT count(*) FROM memory.memories m WHERE m.search_tsv @@ "
    "memory.any_lexeme_query(tsvector_to_array(to_tsvector('english', $1)))"
)


def corpus(data: Path, rows: int, seed: int = 5) -> list[str]:
    sentences = []
    for line in (data / "corpus.jsonl").open():
        doc = json.loads(line)
        sentences.extend(s for s in _SENTENCE.split(doc["text"]) if len(s) > 20)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sentences), size=(rows, 6))
    counts = rng.integers(2, 7, size=rows)
    return [" ".join(sentences[j] for j in picks[i, : counts[i]]) for i in range(rows)]


def queries(data: Path, count: int, seed: int = 7) -> dict[int, list[str]]:
    claims = [json.loads(line)["text"] for line in (data / "queries.jsonl").open()]
    filler = [w for line in list((data / "corpus.jsonl").open())[:500] for w in _WORD.findall(json.loads(line)["text"])]
    rng = np.random.default_rng(seed)
    out: dict[int, list[str]] = {}
    for length in LENGTHS:
        chosen = []
        for i in rng.choice(len(claims), size=count, replace=False):
            words = _WORD.findall(claims[i])
            while len(words) < length:
                words.append(filler[int(rng.integers(len(filler)))])
            start = int(rng.integers(0, len(words) - length + 1))
            chosen.append(" ".join(words[start : start + length]))
        out[length] = chosen
    return out


async def load(dsn: str, texts: list[str]) -> None:
    settings = Settings.from_env({"DATABASE_URL": dsn, "DATABASE_POOL_MIN": "1", "DATABASE_POOL_MAX": "2"})
    runtime = Runtime(settings, Metrics())
    await runtime.start(background=False)
    try:
        await runtime.binding.bind_now()  # the rows are copied in behind the service's back
        rng = np.random.default_rng(3)
        vectors = rng.normal(size=(len(texts), settings.embedding_dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        records = []
        for i, text in enumerate(texts):
            digest = hashlib.sha256(text.encode()).digest()
            key = "sha256:" + digest.hex()  # a derived key carries no words into search_tsv
            records.append(("global", 0, key, text, vectors[i], digest, settings.embedding_model, 0.5))
        started = time.perf_counter()
        async with runtime.db.connection() as conn:
            await copy_into_memories(conn, records)  # rows in bench.datasets.COPY_COLUMNS order
            # VACUUM as autovacuum soon would: freshly copied rows carry no hint bits yet, and the first queries to
            # visit each page would pay for setting them (10x slower here), which is not what steady state costs.
            await conn.execute("VACUUM (ANALYZE) memory.memories")
        print(f"loaded {len(texts)} memories in {time.perf_counter() - started:.1f}s", flush=True)
        started = time.perf_counter()
        await runtime.text_stats.refresh()
        print(f"text statistics refreshed in {time.perf_counter() - started:.2f}s", flush=True)
    finally:
        await runtime.close()


async def measure(dsn: str, address: str, by_length: dict[int, list[str]], max_scored: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
    ranking = TextRanking(max_scored=max_scored).values
    rows = []
    async with aio.insecure_channel(address) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        for length, texts in by_length.items():

            async def via_grpc(i: int, texts: list[str] = texts) -> None:
                await stub.Search(memory_pb2.SearchRequest(query=texts[i], mode=memory_pb2.SEARCH_MODE_TEXT, top_k=K))

            async def via_sql(i: int, texts: list[str] = texts) -> None:
                async with pool.acquire() as conn:
                    await search_sql.candidates(
                        conn,
                        MemoryFilter(),
                        vector=None,
                        text=texts[i],
                        limit=K * 4,
                        exact=True,
                        full_rows=False,
                        text_ranking=ranking,
                    )

            async def old_all_words(i: int, texts: list[str] = texts) -> None:
                async with pool.acquire() as conn:
                    await conn.fetch(OLD_ALL_WORDS, texts[i], K)

            for i in range(3):  # warm the caches and the connections
                await via_grpc(i)
                await via_sql(i)
                await old_all_words(i)
            grpc_s, sql_s, old_s = await latencies(via_grpc, via_sql, old_all_words, count=len(texts))
            async with pool.acquire() as conn:
                found_old = [len(await conn.fetch(OLD_ALL_WORDS, t, K)) > 0 for t in texts]
                holding_any = [await conn.fetchval(ANY_WORD_COUNT, t) for t in texts]
            rows.append(
                [
                    length,
                    percentile_ms(grpc_s, 50),
                    percentile_ms(grpc_s, 99),
                    percentile_ms(sql_s, 50),
                    percentile_ms(sql_s, 99),
                    percentile_ms(old_s, 50),
                    percentile_ms(old_s, 99),
                    f"{100 * sum(found_old) / len(texts):.0f}%",
                    int(np.mean(holding_any)),
                    int(np.max(holding_any)),
                ]
            )
    await pool.close()
    print_table(
        [
            "words",
            "gRPC p50",
            "gRPC p99",
            "SQL p50",
            "SQL p99",
            "all-words p50",
            "all-words p99",
            "all-words found any",
            "memories holding a word (mean)",
            "(max)",
        ],
        rows,
    )


async def run(args: argparse.Namespace) -> None:
    texts = corpus(args.data, args.rows)
    by_length = queries(args.data, args.queries)
    with database_server() as server_dsn:
        async with fresh_database(server_dsn) as dsn:
            await load(dsn, texts)
            process = ServerProcess({"DATABASE_URL": dsn, "TEXT_MAX_SCORED": str(args.max_scored)})
            try:
                process.wait_ready()
                await measure(dsn, process.address, by_length, args.max_scored)
            finally:
                process.stop()
    print(f"{args.rows} memories, {args.queries} queries per length, TEXT_MAX_SCORED={args.max_scored}, ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/scifact"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--max-scored", type=int, default=Settings().text_max_scored)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
