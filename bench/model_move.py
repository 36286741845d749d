"""A move to another embedding model: how fast the backfill writes, and what it costs the searches meanwhile.

Two measurements, each against a floor taken in the same run:

- **throughput**: the backfill's database side with precomputed vectors (the next model's vectors are in the
  embedding cache, as a provider's answers would be after a first pass), unthrottled, against BulkStore loading the
  same rows with their vectors supplied. Target: at least half of BulkStore's rows/s.
- **searches**: p50 of the scale benchmark's kinds of searches (vector unfiltered, vector in a 1% scope, hybrid)
  through a server before the move, and through a server running the backfill at the default rate
  (MODEL_BACKFILL_RATE, 250; ``--rate``). Target: within 1.5x.

    python -m bench.model_move --rows 100000 --throughput-rows 20000
    python -m bench.model_move --rows 0 --throughput-rows 2000 --next local --texts scifact   # MiniLM's own time
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
import numpy as np
from grpc import aio

from bench import minilm
from bench.corpus import Corpus
from bench.datasets import queries
from bench.harness import ServerProcess, database_server, fresh_database, latencies, percentile_ms, print_table
from bench.scale import SCOPE_1PCT, build, load_corpus, service_env
from memory_service.models import content_hash
from memory_service.storage import embedding_cache_sql
from memory_service.storage.database import init_connection
from memory_service.v1 import memory_pb2, memory_pb2_grpc

NEXT_MODEL = "bench-next-model"
DIM = 384


def next_env(rate: float, provider: str = "precomputed") -> dict[str, str]:
    """The next model: ``precomputed`` and ``hash`` are the hash embedder under a model name of its own (its
    vectors put in the cache beforehand, or computed), ``local`` the all-MiniLM-L6-v2 model of ../shared/models."""
    if provider == "local":
        return {
            "EMBEDDING_NEXT_PROVIDER": "local",
            "EMBEDDING_NEXT_MODEL_PATH": str(minilm.MODEL),
            "MODEL_BACKFILL_RATE": str(rate),
        }
    return {
        "EMBEDDING_NEXT_PROVIDER": "hash",
        "EMBEDDING_NEXT_MODEL": NEXT_MODEL,
        "EMBEDDING_NEXT_DIM": str(DIM),
        "MODEL_BACKFILL_RATE": str(rate),
    }


def scifact_texts(rows: int) -> list[str]:
    """``rows`` SciFact abstracts (``title + " " + text``, about 250 tokens), numbered past the 5,183 there are."""
    with (minilm.DATA / "corpus.jsonl").open() as handle:
        docs = [f"{d['title']} {d['text']}".strip() for d in map(json.loads, handle)]
    return [docs[i % len(docs)] if i < len(docs) else f"{docs[i % len(docs)]} ({i})" for i in range(rows)]


async def precompute(dsn: str, data: Corpus) -> None:
    """The next model's vectors of every stored text, in the embedding cache (another model: rows permuted)."""
    vectors = np.roll(data.vectors, 1, axis=0)
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)
        entries = [(content_hash(text), vectors[i]) for i, text in enumerate(data.texts)]
        for start in range(0, len(entries), 10_000):
            await embedding_cache_sql.insert(conn, NEXT_MODEL, DIM, entries[start : start + 10_000])
    finally:
        await conn.close()


async def progress(conn: asyncpg.Connection) -> dict[str, object]:
    raw = await conn.fetchval("SELECT value FROM memory.settings WHERE key = 'embedding_backfill'")
    return {} if raw is None else dict(json.loads(raw))


async def backfill_rate(
    dsn: str, *, during: Callable[[], Coroutine[Any, Any, None]] | None = None
) -> tuple[float, float]:
    """Rows per second between the first checkpoint and completion, and the seconds that took; runs ``during``
    (searches) from the first checkpoint until completion."""
    conn = await asyncpg.connect(dsn)
    try:
        while not (first := await progress(conn)).get("after_id"):  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.02)
        started = time.perf_counter()
        task = asyncio.create_task(during()) if during is not None else None
        while not (last := await progress(conn)).get("complete"):  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await conn.close()
    done = int(str(last["total"])) - int(str(first["done"]))
    return done / seconds, seconds


def search_calls(stub: memory_pb2_grpc.MemoryServiceStub, data: Corpus) -> list[Callable[[int], Awaitable[object]]]:
    vectors, texts = queries(data, 200)

    def vector(scope_id: int | None) -> Callable[[int], Awaitable[object]]:
        async def call(i: int) -> object:
            request = memory_pb2.SearchRequest(
                query_embedding=vectors[i % len(vectors)].tolist(), mode=memory_pb2.SEARCH_MODE_VECTOR
            )
            if scope_id is not None:
                request.filter.scopes.add(scope=memory_pb2.SCOPE_PROJECT, scope_id=scope_id)
            return await stub.Search(request)

        return call

    async def hybrid(i: int) -> object:
        return await stub.Search(memory_pb2.SearchRequest(query=texts[i % len(texts)]))

    return [vector(None), vector(SCOPE_1PCT), hybrid]


NAMES = ("vector, unfiltered", "vector, 1% scope", "hybrid")


async def searches_during(
    dsn: str, data: Corpus, count: int, rate: float
) -> tuple[list[list[float]], list[list[float]], float]:
    """Search latencies before the move, during its backfill at the default rate, and the backfill's seconds."""
    before = ServerProcess(service_env(dsn, "ivfflat"))
    try:
        await asyncio.to_thread(before.wait_ready)
        async with aio.insecure_channel(before.address) as channel:
            calls = search_calls(memory_pb2_grpc.MemoryServiceStub(channel), data)
            await latencies(*calls, count=20)
            baseline = await latencies(*calls, count=count)
    finally:
        await asyncio.to_thread(before.stop)
    moving = ServerProcess(service_env(dsn, "ivfflat", **next_env(rate)))  # the default rate unless --rate
    measured: list[list[float]] = [[] for _ in NAMES]
    try:
        await asyncio.to_thread(moving.wait_ready)
        async with aio.insecure_channel(moving.address) as channel:
            calls = search_calls(memory_pb2_grpc.MemoryServiceStub(channel), data)
            await latencies(*calls, count=20)

            async def during() -> None:
                while True:
                    for bucket, samples in zip(measured, await latencies(*calls, count=10), strict=True):
                        bucket.extend(samples)

            _, seconds = await backfill_rate(dsn, during=during)
    finally:
        await asyncio.to_thread(moving.stop)
    return baseline, measured, seconds


async def throughput(
    server_dsn: str, rows: int, batch: int, *, provider: str, texts: str
) -> tuple[float, float, float]:
    """(BulkStore rows/s with vectors supplied, backfill rows/s, mean characters of a text), on the same rows: with
    the next model's vectors precomputed, or computed by the next model (``provider``) as the backfill goes."""
    data, _ = load_corpus("hard", rows)
    if texts == "scifact":
        data.texts = scifact_texts(rows)
    async with fresh_database(server_dsn) as dsn:
        built = await build(dsn, data, "ivfflat")
        if provider == "precomputed":
            await precompute(dsn, data)
        env = service_env(dsn, "ivfflat", MODEL_BACKFILL_BATCH=str(batch), **next_env(0, provider))
        moving = ServerProcess(env)
        try:
            await asyncio.to_thread(moving.wait_ready)
            rate, _ = await backfill_rate(dsn)
        finally:
            await asyncio.to_thread(moving.stop)
    return built.ingest_rows_per_s, rate, sum(map(len, data.texts)) / len(data.texts)


async def run(args: argparse.Namespace) -> None:
    with database_server() as server_dsn:
        if args.throughput_rows:
            bulk, backfill, chars = await throughput(
                server_dsn, args.throughput_rows, args.batch, provider=args.next, texts=args.texts
            )
            per_100k = 100_000 / backfill
            print_table(
                [
                    "rows",
                    "texts (mean chars)",
                    "batch",
                    "BulkStore rows/s (vectors supplied)",
                    f"backfill rows/s ({args.next})",
                    "ratio",
                    "backfill of 100k",
                ],
                [
                    [
                        args.throughput_rows,
                        f"{args.texts} ({chars:.0f})",
                        args.batch,
                        bulk,
                        backfill,
                        f"{backfill / bulk:.2f} (target >= 0.5)",
                        f"{per_100k / 60:.1f} min",
                    ]
                ],
            )
        if not args.rows:
            return
        data, _ = load_corpus("hard", args.rows)
        async with fresh_database(server_dsn) as dsn:
            await build(dsn, data, "ivfflat")
            await precompute(dsn, data)
            before, during, seconds = await searches_during(dsn, data, args.searches, args.rate)
        print(f"backfill of {args.rows} rows at MODEL_BACKFILL_RATE={args.rate:g}: {seconds:.0f}s", flush=True)
        rows = []
        for name, a, b in zip(NAMES, before, during, strict=True):
            ratio = percentile_ms(b, 50) / percentile_ms(a, 50)
            rows.append([name, percentile_ms(a, 50), percentile_ms(b, 50), len(b), f"{ratio:.2f}x", "<= 1.5x"])
        print_table(["search", "p50 ms before", "p50 ms during backfill", "searches during", "ratio", "target"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the search measurement")
    parser.add_argument("--throughput-rows", type=int, default=20_000, help="rows of the throughput measurement")
    parser.add_argument("--batch", type=int, default=256, help="MODEL_BACKFILL_BATCH of the throughput run")
    parser.add_argument(
        "--next",
        choices=("precomputed", "hash", "local"),
        default="precomputed",
        help="the next model's vectors: in the embedding cache already, computed by the hash embedder, or by MiniLM",
    )
    parser.add_argument(
        "--texts",
        choices=("corpus", "scifact"),
        default="corpus",
        help="the stored texts of the throughput run: the synthetic corpus's short ones, or SciFact abstracts",
    )
    parser.add_argument("--searches", type=int, default=200, help="searches of each kind before the move")
    parser.add_argument("--rate", type=float, default=250, help="MODEL_BACKFILL_RATE of the search measurement")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
