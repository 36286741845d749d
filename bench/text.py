"""TEXT search at 100k and 1M memories: the service against exact BM25, the SQL statement it used before, its floor,
and tantivy and bm25s.

    python -m bench.text --rows 100000,1000000 --queries 100
    python -m bench.text --rows 100000 --hybrid          # also HYBRID against its VECTOR and TEXT parts

The corpus is made of real sentences: each memory joins 2 to 6 sentences drawn from random SciFact abstracts
(``--data``), so word frequencies follow natural language. Queries of 2, 8 and 16 words are cut from the SciFact
claims (padded with words of a random abstract where a claim is short). Memories 0..9,999 are in scope 0 (10k rows),
the rest spread over scopes 1..100 (about 1% each). For each size, in one run:

* **overlap@10** against exact BM25 computed by the benchmark itself (``bench.text_peers.ExactBM25``: every memory
  holding a query lexeme scored over the stored ``search_tsv`` with the service's statistics snapshot); a hit that
  ties the 10th exact score counts as found;
* **p50 / p99** of one client's TEXT search (top_k 10) through gRPC, alternating with the SQL statement the service
  ran before the index (``search_sql.candidates``, ``TEXT_MAX_SCORED`` 2000) over plain asyncpg;
* **calls/s** with 16 calls in flight, to one server process (``SERVER_PROCESSES=1``: its RSS is then the one
  process holding the index; each process holds its own);
* scoped searches (the 1% scope and the 10k scope) against ``bench.floor``, the bare gRPC server;
* tantivy and bm25s in process (``--peers``), over the raw texts with their own English stemming;
* with ``--hybrid`` (the ``clustered`` synthetic vectors of ``bench.datasets`` loaded, index built): HYBRID against
  VECTOR and TEXT alone, with query vectors of the same distribution.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
from grpc import aio

from bench import datasets
from bench.datasets import copy_into_memories
from bench.harness import (
    ServerProcess,
    database_server,
    fresh_database,
    latencies,
    percentile_ms,
    print_table,
    reindex,
    throughput,
)
from bench.text_peers import ExactBM25, build_peers, overlap, peer_rows
from memory_service.app.runtime import Runtime
from memory_service.config.settings import Settings
from memory_service.metrics import Metrics
from memory_service.models import MemoryFilter
from memory_service.search.tuning import TextRanking
from memory_service.storage import search_sql, text_index_sql
from memory_service.storage.database import init_connection
from memory_service.v1 import memory_pb2, memory_pb2_grpc

K = 10
LENGTHS = (2, 8, 16)
SCOPE_10K_ROWS = 10_000
SCOPES = 100
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9-]+")


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


def scope_of(i: int) -> int:
    return 0 if i < SCOPE_10K_ROWS else 1 + i % SCOPES


async def load(dsn: str, texts: list[str], *, vectors: bool) -> None:
    settings = Settings.from_env({"DATABASE_URL": dsn, "DATABASE_POOL_MIN": "1", "DATABASE_POOL_MAX": "2"})
    runtime = Runtime(settings, Metrics())
    await runtime.start(background=False)
    try:
        await runtime.binding.bind_now()  # the rows are copied in behind the service's back
        vectors_of = datasets.synthetic(len(texts), datasets.SHAPES["clustered"]).vectors if vectors else None
        started = time.perf_counter()
        async with runtime.db.connection() as conn:
            for first in range(0, len(texts), 50_000):
                records = []
                for i in range(first, min(first + 50_000, len(texts))):
                    # A derived key carries no words into search_tsv; the row number keeps repeated texts apart.
                    digest = hashlib.sha256(f"{i}:{texts[i]}".encode()).digest()
                    vector = None if vectors_of is None else vectors_of[i]
                    model = settings.embedding_model if vectors else None
                    records.append(
                        ("project", scope_of(i), "sha256:" + digest.hex(), texts[i], vector, digest, model, 0.5)
                    )
                await copy_into_memories(conn, records)
            # VACUUM as autovacuum soon would: freshly copied rows carry no hint bits yet, and the first queries to
            # visit each page would pay for setting them (10x slower here), which is not what steady state costs.
            await conn.execute("VACUUM (ANALYZE) memory.memories")
        print(f"loaded {len(texts)} memories in {time.perf_counter() - started:.1f}s", flush=True)
        started = time.perf_counter()
        await runtime.text_stats.refresh()
        print(f"text statistics refreshed in {time.perf_counter() - started:.2f}s", flush=True)
    finally:
        await runtime.close()


def scoped(scope_id: int) -> memory_pb2.MemoryFilter:
    return memory_pb2.MemoryFilter(scopes=[memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_PROJECT, scope_id=scope_id)])


class Measure:
    def __init__(
        self, dsn: str, service: str, floor: str, by_length: dict[int, list[str]], args: Any, *, hybrid: bool
    ) -> None:
        self.dsn, self.service_address, self.floor_address = dsn, service, floor
        self.by_length = by_length
        self.args = args
        self.hybrid = hybrid
        self.rows: list[list[object]] = []
        self.other: list[list[object]] = []

    async def run(self, rows: int, texts: list[str], server: ServerProcess) -> None:
        pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, init=init_connection)
        async with pool.acquire() as conn:
            started = time.perf_counter()
            exact = await ExactBM25.read(conn)
            print(f"exact BM25: postings read in {time.perf_counter() - started:.1f}s", flush=True)
        peers = build_peers(range(1, rows + 1), texts, self.args.peers) if self.args.peers else []
        ranking = TextRanking().values
        async with (
            aio.insecure_channel(self.service_address) as channel,
            aio.insecure_channel(self.floor_address) as floor_channel,
        ):
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            floor = memory_pb2_grpc.MemoryServiceStub(floor_channel)
            for length, texts_of_length in self.by_length.items():
                truth = []
                async with pool.acquire() as conn:
                    for text in texts_of_length:
                        terms = await text_index_sql.query_terms(conn, text, after=2**62)
                        truth.append(
                            exact.top(terms.lexemes, terms.dfs, terms.docs, terms.total_length, k1=1.2, b=0.75, k=K)
                        )
                got_service: list[list[tuple[int, float]]] = [[] for _ in texts_of_length]
                got_sql: list[list[tuple[int, float]]] = [[] for _ in texts_of_length]

                async def via_grpc(i: int, texts: list[str] = texts_of_length, out: list[Any] = got_service) -> None:
                    i %= len(texts)
                    response = await stub.Search(
                        memory_pb2.SearchRequest(query=texts[i], mode=memory_pb2.SEARCH_MODE_TEXT, top_k=K)
                    )
                    out[i] = [(h.memory.id, h.text_score) for h in response.hits]

                async def via_sql(i: int, texts: list[str] = texts_of_length, out: list[Any] = got_sql) -> None:
                    async with pool.acquire() as conn:
                        found = await search_sql.candidates(
                            conn, MemoryFilter(), vector=None, text=texts[i], limit=K, exact=True,
                            full_rows=False, text_ranking=ranking,
                        )  # fmt: skip
                    out[i] = sorted(((c.id, c.text_score or 0.0) for c in found), key=lambda s: (-s[1], s[0]))

                for i in range(3):
                    await via_grpc(i)
                    await via_sql(i)
                grpc_s, sql_s = await latencies(via_grpc, via_sql, count=len(texts_of_length))
                rate = await throughput(via_grpc, in_flight=16, total=self.args.total)
                row: list[object] = [
                    rows,
                    length,
                    round(float(np.mean([overlap(g, t) for g, t in zip(got_service, truth, strict=True)])), 3),
                    percentile_ms(grpc_s, 50),
                    percentile_ms(grpc_s, 99),
                    rate,
                    round(float(np.mean([overlap(g, t) for g, t in zip(got_sql, truth, strict=True)])), 3),
                    percentile_ms(sql_s, 50),
                ]
                for peer in peers:
                    seconds, agreement = peer_rows(peer, texts_of_length, [[i for i, _ in t] for t in truth])
                    ratio = percentile_ms(grpc_s, 50) / percentile_ms(seconds, 50)
                    row += [percentile_ms(seconds, 50), f"{ratio:.1f}x", round(agreement, 3)]
                self.rows.append(row)
            await self._scoped(rows, stub, floor)
            if self.hybrid:
                await self._hybrid(rows, stub)
        self.other.append(
            [rows, "server RSS MB now / at its peak", f"{server.rss_mb():.0f} / {server.rss_mb('VmHWM'):.0f}"]
        )
        await pool.close()

    async def _scoped(self, rows: int, stub: Any, floor: Any) -> None:
        texts = self.by_length[8]
        for label, scope_id in (("1% scope", 1), ("10k scope", 0)):

            async def service(i: int, scope_id: int = scope_id) -> None:
                await stub.Search(
                    memory_pb2.SearchRequest(
                        query=texts[i], mode=memory_pb2.SEARCH_MODE_TEXT, top_k=K, filter=scoped(scope_id)
                    )
                )

            async def bare(i: int, scope_id: int = scope_id) -> None:
                await floor.Search(
                    memory_pb2.SearchRequest(
                        query=texts[i], mode=memory_pb2.SEARCH_MODE_TEXT, top_k=K, filter=scoped(scope_id)
                    )
                )

            for i in range(3):
                await service(i)
                await bare(i)
            service_s, floor_s = await latencies(service, bare, count=len(texts))
            ratio = percentile_ms(service_s, 50) / percentile_ms(floor_s, 50)
            self.other.append(
                [
                    rows,
                    f"TEXT {label}, 8 words: service / floor p50 ms",
                    f"{percentile_ms(service_s, 50):.2f} / {percentile_ms(floor_s, 50):.2f} ({ratio:.2f}x)",
                ]
            )

    async def _hybrid(self, rows: int, stub: Any) -> None:
        texts = self.by_length[8]
        # Queries of the stored vectors' own distribution (topic centre plus noise, never a stored row).
        vectors, _ = datasets.queries(datasets.synthetic(rows, datasets.SHAPES["clustered"]), len(texts))

        def call(mode: int) -> Any:
            async def search(i: int) -> None:
                await stub.Search(
                    memory_pb2.SearchRequest(
                        query=texts[i] if mode != memory_pb2.SEARCH_MODE_VECTOR else "",
                        query_embedding=vectors[i].tolist() if mode != memory_pb2.SEARCH_MODE_TEXT else [],
                        mode=mode,
                        top_k=K,
                    )
                )

            return search

        modes = (memory_pb2.SEARCH_MODE_VECTOR, memory_pb2.SEARCH_MODE_TEXT, memory_pb2.SEARCH_MODE_HYBRID)
        for i in range(3):
            for mode in modes:
                await call(mode)(i)
        vector_s, text_s, hybrid_s = await latencies(*(call(m) for m in modes), count=len(texts))
        parts = percentile_ms(vector_s, 50) + percentile_ms(text_s, 50)
        self.other.append(
            [
                rows,
                "HYBRID, 8 words: p50 ms / VECTOR p50 + TEXT p50",
                f"{percentile_ms(hybrid_s, 50):.2f} / {percentile_ms(vector_s, 50):.2f} + "
                f"{percentile_ms(text_s, 50):.2f} ({percentile_ms(hybrid_s, 50) / parts:.2f}x the sum)",
            ]
        )


@contextlib.asynccontextmanager
async def kept_database(server_dsn: str, name: str) -> AsyncIterator[str]:
    """A database that outlives the run (``--keep``): a second run measures again without loading again."""
    conn = await asyncpg.connect(server_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield urlunsplit(urlsplit(server_dsn)._replace(path="/" + name))


async def holds_rows(dsn: str, rows: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass('memory.memories') IS NOT NULL"):
            return False
        count: int = await conn.fetchval("SELECT count(*) FROM memory.memories")
        return count == rows
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> None:
    by_length = queries(args.data, args.queries)
    measures: list[Measure] = []
    with database_server() as server_dsn:
        for rows in args.rows:
            texts = corpus(args.data, rows)
            hybrid = args.hybrid and rows <= args.hybrid_upto
            async with (
                kept_database(server_dsn, f"bench_text_{rows}_{int(hybrid)}")
                if args.keep
                else fresh_database(server_dsn) as dsn
            ):
                if not await holds_rows(dsn, rows):
                    await load(dsn, texts, vectors=hybrid)
                    env = {"DATABASE_URL": dsn}
                    if hybrid:
                        said, seconds = reindex(env)
                        print(f"reindex: {said} ({seconds:.0f}s)", flush=True)
                # One server process, so its RSS is the index's process (each of SERVER_PROCESSES holds its own).
                env = {"DATABASE_URL": dsn, "SERVER_PROCESSES": "1"}
                process = ServerProcess(env)
                floor = ServerProcess({"DATABASE_URL": dsn}, command=("-m", "bench.floor"))
                try:
                    process.wait_ready()
                    floor.wait_ready()
                    started = time.perf_counter()
                    said = process.wait_for("text index loaded", timeout=3600)
                    print(f"text index ready {time.perf_counter() - started:.1f}s after the server: {said}", flush=True)
                    measure = Measure(dsn, process.address, floor.address, by_length, args, hybrid=hybrid)
                    await measure.run(rows, texts, process)
                    measures.append(measure)
                finally:
                    process.stop()
                    floor.stop()
            del texts
    headers = [
        "rows",
        "words",
        "overlap@10",
        "gRPC p50",
        "gRPC p99",
        "calls/s @16",
        "SQL before: overlap@10",
        "SQL before: p50",
    ]
    for name in args.peers:
        headers += [f"{name} p50", f"service / {name} p50", f"{name} overlap@10"]
    print_table(headers, [row for m in measures for row in m.rows])
    print_table(["rows", "measure", "value"], [row for m in measures for row in m.other])
    print(
        f"{args.queries} queries per length, top_k {K}, ms; load average {os.getloadavg()[0]:.1f} at the end",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/scifact"))
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[100_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--total", type=int, default=1000, help="calls for the calls/s column")
    parser.add_argument("--peers", type=lambda s: [p for p in s.split(",") if p], default=["tantivy", "bm25s"])
    parser.add_argument("--hybrid", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep each size's database and reuse it next time")
    parser.add_argument("--hybrid-upto", type=int, default=100_000, help="largest table loaded with vectors")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
