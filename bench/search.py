"""Search benchmark: recall, latency and throughput through gRPC, against the same SQL through plain asyncpg.

    python -m bench.search --rows 100000

For VECTOR, TEXT and HYBRID, unfiltered and with a 1% filter (one scope_id of 100), it prints recall@10 against
exact search, the share of searches that were complete (as many hits as exact search: k, or every match when
fewer match), p50/p99 latency at one client, and calls/s
at 16 in flight; the "sql" columns run the very statements the service runs (built by
memory_service.storage.search_sql, with the same scan settings, set once per pooled connection, and no
transaction) over a plain asyncpg pool.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from typing import Any

import asyncpg
import numpy as np
from grpc import aio

from bench.corpus import Corpus
from bench.datasets import clustered, copy_into_memories, queries, records
from bench.harness import (
    ServerProcess,
    database_server,
    fresh_database,
    latencies,
    percentile_ms,
    print_table,
    throughput,
)
from memory_service.app.runtime import Runtime
from memory_service.config.settings import Settings
from memory_service.metrics import Metrics
from memory_service.models import Candidate, MemoryFilter, Scope, ScopeRef
from memory_service.search.index_policy import fitted_probes
from memory_service.search.tuning import DEFAULT_TEXT_RANKING, scan_settings
from memory_service.storage import search_sql
from memory_service.storage.database import init_connection
from memory_service.v1 import memory_pb2, memory_pb2_grpc

K = 10
MODES = {
    "vector": memory_pb2.SEARCH_MODE_VECTOR,
    "text": memory_pb2.SEARCH_MODE_TEXT,
    "hybrid": memory_pb2.SEARCH_MODE_HYBRID,
}
FILTER_SCOPE = 37


@dataclasses.dataclass
class Workload:
    corpus: Corpus
    vectors: np.ndarray
    texts: list[str]


async def prepare(dsn: str, rows: int) -> Workload:
    """Bind the model, load the corpus with binary COPY, ANALYZE, and build the index as `reindex` would."""
    settings = Settings.from_env({"DATABASE_URL": dsn, "DATABASE_POOL_MIN": "1", "DATABASE_POOL_MAX": "2"})
    runtime = Runtime(settings, Metrics())
    await runtime.start(background=False)
    try:
        await runtime.binding.bind_now()  # the rows are copied in behind the service's back
        corpus = clustered(rows)
        started = time.perf_counter()
        async with runtime.db.connection() as conn:
            await copy_into_memories(conn, records(corpus, model=settings.embedding_model))
            await conn.execute("ANALYZE memory.memories")
        print(f"loaded {rows} rows in {time.perf_counter() - started:.1f}s", flush=True)
        started = time.perf_counter()
        print(await runtime.index.maintain(), f"in {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        await runtime.close()
    vectors, texts = queries(corpus, 400)
    return Workload(corpus, vectors, texts)


def grpc_request(mode: str, vector: np.ndarray, text: str, filtered: bool, *, exact: bool = False) -> Any:
    request = memory_pb2.SearchRequest(mode=MODES[mode], top_k=K, exact=exact)
    if mode != "text":
        request.query_embedding.extend(vector.tolist())
    if mode != "vector":
        request.query = text
    if filtered:
        request.filter.scopes.add(scope=memory_pb2.SCOPE_PROJECT, scope_id=FILTER_SCOPE)
    return request


class PlainSql:
    """The service's statements, run by hand: the floor the gRPC path is measured against.

    The floor is the least a client could send: each pooled connection gets its scan settings once, when it is
    opened, and every search is its statements alone, with no transaction around them."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def search(self, mode: str, vector: np.ndarray, text: str, filtered: bool) -> list[Candidate]:
        memory_filter = (
            MemoryFilter(scopes=(ScopeRef(scope=Scope.PROJECT, scope_id=FILTER_SCOPE),)) if filtered else MemoryFilter()
        )
        limit = K if mode == "vector" else max(3 * K, 40)
        async with self.pool.acquire() as conn:
            # As the engine plans it: a narrow filter is scanned exactly, and every query term may bring in
            # text candidates (unpruned).
            narrow = filtered and await search_sql.count_matching(conn, memory_filter, cap=5000) < 5000
            found = await search_sql.candidates(
                conn,
                memory_filter,
                vector=None if mode == "text" else vector,
                text=None if mode == "vector" else text,
                limit=limit,
                exact=narrow or mode == "text",
                full_rows=mode == "vector",
                pruned=not narrow,
                text_ranking=DEFAULT_TEXT_RANKING.values,
            )
            if mode != "vector":
                # The service fetches the memories of the k winners after fusion; any k candidates cost the same.
                await search_sql.memories_by_id(conn, [c.id for c in found[:K]], with_embedding=False)
            return found


def truth(workload: Workload, mode: str, filtered: bool, i: int) -> set[int] | None:
    """Exact vector neighbours by numpy (row keys); None where the service's exact mode is the reference."""
    if mode != "vector":
        return None
    corpus = workload.corpus
    candidates = np.flatnonzero(corpus.scope_ids == FILTER_SCOPE) if filtered else np.arange(len(corpus))
    best = candidates[np.argsort(-(corpus.vectors[candidates] @ workload.vectors[i]))[:K]]
    return {int(x) for x in best}


async def run(rows: int, count: int, total: int) -> None:
    with database_server() as server_dsn:
        async with fresh_database(server_dsn) as dsn:
            workload = await prepare(dsn, rows)
            server = ServerProcess({"DATABASE_URL": dsn, "DATABASE_POOL_MIN": "4", "DATABASE_POOL_MAX": "20"})
            try:
                server.wait_ready()
                await measure(dsn, server.address, workload, count=count, total=total, rows=rows)
            finally:
                server.stop()


async def measure(dsn: str, address: str, workload: Workload, *, count: int, total: int, rows: int) -> None:
    lists = max(10, rows // 1000)
    channel = aio.insecure_channel(address)
    stub = memory_pb2_grpc.MemoryServiceStub(channel)
    # The plain SQL scans as the service's unfiltered searches do: at the probes the index's calibration chose
    # (sqrt(lists) before one exists), with the same scan settings.
    calibration = (await stub.Stats(memory_pb2.StatsRequest())).index.calibration
    probes = calibration.probes or fitted_probes(lists)
    # Startup settings, not SET: asyncpg's default reset runs RESET ALL on every release, which returns to these.
    scan = scan_settings("ivfflat", probes, iterative=True, limit=K, filtered=True)
    pool = await asyncpg.create_pool(dsn, min_size=16, max_size=16, init=init_connection, server_settings=scan)
    for _ in range(2):  # the second time after a release and its reset
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW ivfflat.probes") == str(probes), "the floor lost its scan settings"
    plain = PlainSql(pool)
    table = []
    p50: dict[tuple[str, bool], float] = {}
    try:
        for filtered in (False, True):
            for mode in MODES:

                def request(i: int, *, exact: bool = False, mode: str = mode, filtered: bool = filtered) -> Any:
                    j = i % len(workload.texts)
                    return grpc_request(mode, workload.vectors[j], workload.texts[j], filtered, exact=exact)

                recall_sum, complete = 0.0, 0
                for i in range(count):
                    response = await stub.Search(request(i))
                    got = {int(h.memory.key.removeprefix("row-")) for h in response.hits}
                    expected = truth(workload, mode, filtered, i % len(workload.texts))
                    if expected is None:
                        exact = await stub.Search(request(i, exact=True))
                        expected = {int(h.memory.key.removeprefix("row-")) for h in exact.hits}
                    # Complete: as many hits as exact search finds (k, or every match when fewer match).
                    complete += len(got) == len(expected)
                    recall_sum += len(got & expected) / len(expected) if expected else 1.0

                async def via_grpc(i: int, request: Any = request) -> None:
                    await stub.Search(request(i))

                async def via_sql(i: int, mode: str = mode, filtered: bool = filtered) -> None:
                    j = i % len(workload.texts)
                    await plain.search(mode, workload.vectors[j], workload.texts[j], filtered)

                await latencies(via_grpc, via_sql, count=20)  # warm up both paths
                grpc_lat, sql_lat = await latencies(via_grpc, via_sql, count=count)
                grpc_rate = await throughput(via_grpc, in_flight=16, total=total)
                sql_rate = await throughput(via_sql, in_flight=16, total=total)
                p50[(mode, filtered)] = percentile_ms(grpc_lat, 50)
                table.append(
                    [
                        mode,
                        "1%" if filtered else "none",
                        recall_sum / count,
                        f"{100 * complete / count:.0f}%",
                        percentile_ms(grpc_lat, 50),
                        percentile_ms(sql_lat, 50),
                        percentile_ms(grpc_lat, 99),
                        percentile_ms(sql_lat, 99),
                        grpc_rate,
                        sql_rate,
                    ]
                )
                print(f"  measured {mode} / {'1%' if filtered else 'no'} filter", flush=True)
    finally:
        await channel.close()
        await pool.close()
    print(f"\n{rows} rows, 384-d clustered vectors, lists={lists}, probes={probes}, k={K}, {count} queries per row\n")
    print_table(
        [
            "mode",
            "filter",
            "recall@10",
            "complete",
            "p50 ms grpc",
            "p50 ms sql",
            "p99 ms grpc",
            "p99 ms sql",
            "calls/s grpc @16",
            "calls/s sql @16",
        ],
        table,
    )
    for filtered in (False, True):
        ratio = p50[("hybrid", filtered)] / p50[("vector", filtered)]
        print(f"hybrid / vector p50 ({'1%' if filtered else 'no'} filter): {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200, help="queries per row for recall and latency")
    parser.add_argument("--total", type=int, default=1000, help="calls per throughput measurement")
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.queries, args.total))


if __name__ == "__main__":
    main()
