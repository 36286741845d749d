"""What the service adds to a call: its p50 less the p50 of the very SQL statement it runs, and calls/s by processes.

    python -m bench.overhead --rows 20000 --index hnsw --processes 1,2

Loads the ``hard`` corpus through BulkStore and builds the index (``bench.scale.build``), then, for each
``SERVER_PROCESSES`` value, starts the server and times, alternating call by call from one client:

* **Get** through gRPC against ``memories_sql.get``'s statement on one asyncpg connection of the client's;
* **unfiltered VECTOR** (top 10) through gRPC against ``search_sql.candidates``'s statement, run on that
  connection with the scan settings the service reported (``probes``) set once for the session; every request
  names that setting, so a recalibration on the measured searches does not change it midway.

The difference of the p50s is the service's own cost per call: gRPC on both ends, conversions, validation, the
interceptor, the pool. With ``--floor``, the bare floor (``bench.floor`` on uvloop, at the same ``probes``) takes its
turn in the same alternation: the least any grpc.aio and asyncpg server adds to the same statement.
Each service path is also timed from grpc's blocking stub ("blocking client"): grpc.aio's client hands every
completion from its poller thread to the event loop, and that hop is the caller's cost, not the service's.
Then calls/s with 16 calls in flight (each in-flight caller its own channel, so the client's own Python is spread
over connections as real callers would be).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import numpy as np
import numpy.typing as npt
from grpc import aio

from bench.datasets import corpus, queries
from bench.harness import (
    ServerProcess,
    database_server,
    fresh_database,
    latencies,
    percentile_ms,
    print_table,
    server_processes,
    spread_channels,
)
from bench.harness import throughput as calls_per_second
from bench.scale import build, service_env
from memory_service.models import IndexKind, MemoryFilter
from memory_service.search.tuning import scan_settings
from memory_service.storage import index_sql, search_sql
from memory_service.storage.database import init_connection
from memory_service.storage.filters import LIVE
from memory_service.storage.memories_sql import COLUMNS
from memory_service.v1 import memory_pb2, memory_pb2_grpc

K = 10
IN_FLIGHT = 16


FLOOR = ("-c", "import uvloop; from bench.floor import serve; uvloop.run(serve())")


async def measure(
    dsn: str,
    env: dict[str, str],
    vectors: Any,
    ids: list[int],
    *,
    count: int,
    kind: IndexKind,
    total: int,
    floor: bool = False,
    probes_wanted: int = 0,
) -> list[list[object]]:
    server = ServerProcess(env)
    floor_server = ServerProcess(env, FLOOR) if floor else None
    conn = await asyncpg.connect(dsn)
    channels = []
    blocking_channels: list[grpc.Channel] = []
    try:
        await asyncio.to_thread(server.wait_ready, processes=server_processes(env))
        if floor_server is not None:
            await asyncio.to_thread(floor_server.wait_ready)
            channels.append(aio.insecure_channel(floor_server.address))
        floor_stub = memory_pb2_grpc.MemoryServiceStub(channels[0]) if floor_server is not None else None
        await init_connection(conn)
        service_channels = spread_channels(server.address, IN_FLIGHT)
        channels += service_channels
        stubs = [memory_pb2_grpc.MemoryServiceStub(c) for c in service_channels]
        stub = stubs[0]
        # The same calls from grpc's blocking stub, which waits in gRPC's core without an event loop: what a caller
        # that is not asyncio pays (grpc.aio's client hands every completion from its poller thread to the loop).
        # A channel of its own (not grpc's global subchannel pool), so it keeps to one server process as each of
        # the aio channels does.
        own = [("grpc.use_local_subchannel_pool", 1)]
        blocking_channels.append(grpc.insecure_channel(server.address, options=own))
        if floor_server is not None:
            blocking_channels.append(grpc.insecure_channel(floor_server.address, options=own))
        blocking = [memory_pb2_grpc.MemoryServiceStub(c) for c in blocking_channels]
        get_sql = f"SELECT {COLUMNS} FROM memory.memories m WHERE m.id = $1 AND {LIVE}"

        probes = probes_wanted

        def search_request(i: int) -> memory_pb2.SearchRequest:
            return memory_pb2.SearchRequest(
                mode=memory_pb2.SEARCH_MODE_VECTOR,
                top_k=K,
                query_embedding=vectors[i % len(vectors)].tolist(),
                probes=probes or None,
            )

        first = await stub.Search(search_request(0))
        # Every call at the setting of the first (or the one asked for): the server recalibrates on the searches
        # it serves.
        probes = first.probes
        exact = first.plan == "exact"
        for name, value in scan_settings(kind, first.probes, iterative=True, limit=K, filtered=False).items():
            if not exact:
                await conn.execute("SELECT set_config($1, $2, false)", name, value)
        # An HNSW graph up to a watermark is searched with its tail, as the service does.
        watermark = (await index_sql.index_info(conn, kind)).watermark
        vector_sql, _ = search_sql.candidates_statement(
            MemoryFilter(), vector=vectors[0], text=None, limit=K, exact=exact, full_rows=True, watermark=watermark
        )

        async def get_service(i: int) -> None:
            await stub.Get(memory_pb2.GetRequest(id=ids[i % len(ids)]))

        async def get_sql_only(i: int) -> None:
            await conn.fetchrow(get_sql, ids[i % len(ids)])

        async def search_service(i: int) -> None:
            await stub.Search(search_request(i))

        async def search_sql_only(i: int) -> None:
            await conn.fetch(vector_sql, vectors[i % len(vectors)])

        def get_on(s: Any) -> Callable[[int], Awaitable[object]]:
            return lambda i: s.Get(memory_pb2.GetRequest(id=ids[i % len(ids)]))

        def search_on(s: Any) -> Callable[[int], Awaitable[object]]:
            return lambda i: s.Search(search_request(i))

        rows: list[list[object]] = []
        pairs = [
            ("Get", get_service, get_sql_only, get_on),
            (f"VECTOR ({first.plan} {first.probes})", search_service, search_sql_only, search_on),
        ]
        for name, service, statement, on in pairs:
            paths: list[Callable[[int], Awaitable[object]]] = [service, statement, waiting(on(blocking[0]))]
            if floor_stub is not None:
                paths += [on(floor_stub), waiting(on(blocking[1]))]
            await latencies(*paths, count=50)
            timed = await latencies(*paths, count=count)
            service_p50, sql_p50 = percentile_ms(timed[0], 50), percentile_ms(timed[1], 50)
            per_stub = [on(s) for s in stubs]

            async def spread(i: int, per_stub: list[Callable[[int], Awaitable[object]]] = per_stub) -> None:
                await per_stub[i % IN_FLIGHT](i)

            rate = await calls_per_second(spread, in_flight=IN_FLIGHT, total=total)
            processes = env.get("SERVER_PROCESSES", "default")
            p99 = percentile_ms(timed[0], 99)
            blocking_p50 = percentile_ms(timed[2], 50)
            row: list[object] = [
                processes,
                name,
                service_p50,
                sql_p50,
                service_p50 - sql_p50,
                blocking_p50 - sql_p50,
                p99,
                rate,
            ]
            if floor_stub is not None:
                row += [percentile_ms(timed[3], 50) - sql_p50, percentile_ms(timed[4], 50) - sql_p50]
            rows.append(row)
        return rows
    finally:
        for channel in channels:
            await channel.close()
        for blocking_channel in blocking_channels:
            blocking_channel.close()
        await conn.close()
        await asyncio.to_thread(server.stop)
        if floor_server is not None:
            await asyncio.to_thread(floor_server.stop)


def waiting(call: Callable[[int], object]) -> Callable[[int], Awaitable[None]]:
    """A blocking stub's call as one of ``latencies``' paths: it holds the event loop while it waits, which is
    fine one call at a time."""

    async def path(i: int) -> None:
        call(i)

    return path


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A loaded and indexed database to time calls on: query vectors, ids to Get, and its row count."""

    dsn: str
    vectors: npt.NDArray[np.float32]
    ids: list[int]
    table_rows: int


async def prepare(stack: contextlib.AsyncExitStack, args: argparse.Namespace, dataset: str = "hard") -> Prepared:
    """``args.dsn`` as it is, or a new database (kept until ``stack`` closes) loaded with ``args.rows`` rows of
    ``dataset`` and indexed with ``args.index``; shared with ``bench.server_cpu``."""
    data = corpus(dataset, args.rows)
    vectors = queries(data, 200)[0]
    dsn = args.dsn
    if dsn is None:
        server_dsn = stack.enter_context(database_server())
        dsn = await stack.enter_async_context(fresh_database(server_dsn))
        built = await build(dsn, data, args.index)
        print(f"built: {built}", flush=True)
    conn = await asyncpg.connect(dsn)
    try:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM memory.memories ORDER BY random() LIMIT 500")]
        table_rows = await conn.fetchval("SELECT count(*) FROM memory.memories")
    finally:
        await conn.close()
    return Prepared(dsn, vectors, ids, table_rows)


async def run(args: argparse.Namespace) -> None:
    async with contextlib.AsyncExitStack() as stack:
        prepared = await prepare(stack, args)
        dsn, vectors, ids, table_rows = prepared.dsn, prepared.vectors, prepared.ids, prepared.table_rows
        rows: list[list[object]] = []
        for processes in args.processes.split(","):
            env = service_env(dsn, args.index, SERVER_PROCESSES=processes)
            kind: IndexKind = "hnsw" if args.index == "hnsw" else "ivfflat"
            rows += await measure(
                dsn,
                env,
                vectors,
                ids,
                count=args.queries,
                kind=kind,
                total=args.total,
                floor=args.floor,
                probes_wanted=args.probes,
            )
    print(f"\n{table_rows} rows of hard, VECTOR_INDEX={args.index}, load average {os.getloadavg()[0]:.2f}\n")
    print_table(
        [
            "SERVER_PROCESSES",
            "call",
            "service p50 ms",
            "SQL p50 ms",
            "service - SQL ms",
            "blocking client: service - SQL ms",
            "service p99 ms",
            f"calls/s at {IN_FLIGHT} in flight",
            *(["floor - SQL ms", "blocking client: floor - SQL ms"] if args.floor else []),
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--index", default="hnsw", choices=("ivfflat", "hnsw"))
    parser.add_argument("--processes", default="1", help="SERVER_PROCESSES values to measure, comma-separated")
    parser.add_argument("--queries", type=int, default=500, help="timed calls per path")
    parser.add_argument("--dsn", help="measure on this database as it is (loaded and indexed) instead of a new one")
    parser.add_argument("--total", type=int, default=3000, help="calls of the throughput run")
    parser.add_argument("--floor", action="store_true", help="also time bench.floor (uvloop) in the alternation")
    parser.add_argument(
        "--probes", type=int, default=0, help="ef_search (or probes) to search at (default: the first answer's)"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
