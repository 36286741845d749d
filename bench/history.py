"""History benchmark: Store and BulkStore with versioning against the same run without it, and Watch latency.

    python -m bench.history --stores 2000 --bulk-rows 20000 --rounds 3 --watch-rate 500 --watch-seconds 10

Two server processes on one PostgreSQL, each with a fresh database: ``HISTORY_VERSIONS=on`` (a version and a
change-log row per change) and ``off`` (the plain statements). Rounds alternate on, off, on, off, ... so both see the
same machine; the table gives the median round. Stores carry their embeddings, so the numbers are database cost,
not embedding cost (the versioning overhead looks largest that way). Every write creates a new memory.

Watch: one watcher (filtered to the writer's scope) on the versioned server while a paced writer commits
``--watch-rate`` Stores per second; latency
is from the Store's reply (its commit) to the watcher receiving the change, and from the Store's start.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import numpy as np
from grpc import aio

from bench.harness import ServerProcess, database_server, fresh_database, percentile_ms, print_table, throughput
from memory_service.v1 import memory_pb2, memory_pb2_grpc

DIM = 384
WATCHED_SCOPE_ID = 1_000_000


def _vectors(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _memory(key: str, value: str, vector: np.ndarray, scope_id: int) -> memory_pb2.MemoryInput:
    return memory_pb2.MemoryInput(
        scope=memory_pb2.SCOPE_AGENT, scope_id=scope_id, key=key, value=value, embedding=vector.tolist()
    )


def _store_call(
    stub: memory_pb2_grpc.MemoryServiceStub, prefix: str, vectors: np.ndarray
) -> Callable[[int], Awaitable[object]]:
    requests = [
        memory_pb2.StoreRequest(memory=_memory(f"{prefix}-{i}", f"note {prefix} {i} about topic {i % 97}", v, i % 50))
        for i, v in enumerate(vectors)
    ]

    async def call(i: int) -> object:
        return await stub.Store(requests[i])

    return call


async def _bulk(stub: memory_pb2_grpc.MemoryServiceStub, prefix: str, vectors: np.ndarray) -> float:
    requests = []
    for start in range(0, len(vectors), 1000):
        items = [
            memory_pb2.BulkItem(
                sequence=i + 1, memory=_memory(f"{prefix}-{i}", f"bulk {prefix} {i} topic {i % 97}", vectors[i], i % 50)
            )
            for i in range(start, min(start + 1000, len(vectors)))
        ]
        requests.append(memory_pb2.BulkStoreRequest(items=items))
    started = time.perf_counter()
    async for _ in stub.BulkStore(iter(requests)):
        pass
    return len(vectors) / (time.perf_counter() - started)


def _idle_watcher(stub: memory_pb2_grpc.MemoryServiceStub) -> aio.UnaryStreamCall:
    """A watcher of a scope nobody writes: it costs the writers what any watcher does, and receives nothing."""
    request = memory_pb2.WatchRequest()
    request.filter.scopes.add(scope=memory_pb2.SCOPE_AGENT, scope_id=WATCHED_SCOPE_ID + 1)
    call: aio.UnaryStreamCall = stub.Watch(request)
    asyncio.get_running_loop().create_task(call.initial_metadata())
    return call


async def _watch_latency(
    stub: memory_pb2_grpc.MemoryServiceStub, rate: int, seconds: float
) -> tuple[list[float], list[float], int]:
    total = int(rate * seconds)
    vectors = _vectors(total, seed=99)
    sent: dict[int, float] = {}
    acked: dict[int, float] = {}
    received: dict[int, float] = {}
    # The watched writes go to a scope of their own, so the watcher skips the log the throughput rounds left.
    request = memory_pb2.WatchRequest()
    request.filter.scopes.add(scope=memory_pb2.SCOPE_AGENT, scope_id=WATCHED_SCOPE_ID)
    call = stub.Watch(request)
    # Let the stream open before the first write.
    await asyncio.sleep(0.5)

    async def watch() -> None:
        async for change in call:
            received.setdefault(change.memory_id, time.perf_counter())
            if len(received) >= total:
                return

    async def write(i: int) -> None:
        started = time.perf_counter()
        response = await stub.Store(
            memory_pb2.StoreRequest(memory=_memory(f"w-{i}", f"watched {i}", vectors[i], WATCHED_SCOPE_ID))
        )
        sent[response.id] = started
        acked[response.id] = time.perf_counter()

    watcher = asyncio.create_task(watch())
    begin = time.perf_counter()
    writes = []
    for i in range(total):
        delay = begin + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        writes.append(asyncio.create_task(write(i)))
    await asyncio.gather(*writes)
    achieved = total / (time.perf_counter() - begin)
    await asyncio.wait_for(watcher, timeout=60)
    call.cancel()
    from_ack = [max(0.0, received[i] - acked[i]) for i in acked]
    from_start = [received[i] - sent[i] for i in sent]
    return from_ack, from_start, round(achieved)


async def main(args: argparse.Namespace) -> None:
    with database_server() as server_dsn:
        async with fresh_database(server_dsn) as on_dsn, fresh_database(server_dsn) as off_dsn:
            common = {"EXACT_SEARCH_MAX_ROWS": "100000000", "DATABASE_POOL_MIN": "4", "DATABASE_POOL_MAX": "16"}
            servers = {
                "on": ServerProcess({**common, "DATABASE_URL": on_dsn, "HISTORY_VERSIONS": "true"}),
                "off": ServerProcess({**common, "DATABASE_URL": off_dsn, "HISTORY_VERSIONS": "false"}),
            }
            try:
                for process in servers.values():
                    process.wait_ready()
                channels = {name: aio.insecure_channel(p.address) for name, p in servers.items()}
                stubs = {name: memory_pb2_grpc.MemoryServiceStub(c) for name, c in channels.items()}
                store_rates: dict[str, list[float]] = {"on": [], "off": [], "watched": []}
                bulk_rates: dict[str, list[float]] = {"on": [], "off": []}
                for r in range(args.rounds):
                    for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
                        vectors = _vectors(args.stores, seed=r)
                        call = _store_call(stubs[name], f"s{r}", vectors)
                        store_rates[name].append(await throughput(call, in_flight=16, total=args.stores))
                        bulk_rates[name].append(
                            await _bulk(stubs[name], f"b{r}", _vectors(args.bulk_rows, seed=100 + r))
                        )
                    # The versioned server again with a watcher open, so writers NOTIFY (and the feed probes).
                    watch = _idle_watcher(stubs["on"])
                    await asyncio.sleep(0.2)
                    call = _store_call(stubs["on"], f"sw{r}", _vectors(args.stores, seed=200 + r))
                    store_rates["watched"].append(await throughput(call, in_flight=16, total=args.stores))
                    watch.cancel()
                rows = []
                for label, rates, on_key in (
                    ("Store calls/s @16", store_rates, "on"),
                    ("Store calls/s @16, a watcher open", store_rates, "watched"),
                    ("BulkStore rows/s", bulk_rates, "on"),
                ):
                    on, off = statistics.median(rates[on_key]), statistics.median(rates["off"])
                    # Each round's runs were back to back; the median of their ratios resists load spikes from
                    # whatever else shares the machine better than a ratio of medians.
                    ratios = sorted(a / b for a, b in zip(rates[on_key], rates["off"], strict=True))
                    spread = f"{(ratios[0] - 1) * 100:+.0f}% .. {(ratios[-1] - 1) * 100:+.0f}%"
                    change = f"{(statistics.median(ratios) - 1) * 100:+.1f}%"
                    rows.append((label, off, on, f"{(on / off - 1) * 100:+.1f}%", change, spread))
                print_table(
                    ("path", "off (median)", "on (median)", "change of medians", "median round ratio", "round range"),
                    rows,
                )
                from_ack, from_start, achieved = await _watch_latency(stubs["on"], args.watch_rate, args.watch_seconds)
                print()
                print_table(
                    ("watch latency", "p50 ms", "p99 ms", "changes/s achieved"),
                    [
                        (
                            "Store reply -> change received",
                            percentile_ms(from_ack, 50),
                            percentile_ms(from_ack, 99),
                            achieved,
                        ),
                        (
                            "Store start -> change received",
                            percentile_ms(from_start, 50),
                            percentile_ms(from_start, 99),
                            achieved,
                        ),
                    ],
                )
                for channel in channels.values():
                    await channel.close()
            finally:
                for process in servers.values():
                    process.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", type=int, default=2000)
    parser.add_argument("--bulk-rows", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--watch-rate", type=int, default=500)
    parser.add_argument("--watch-seconds", type=float, default=10.0)
    asyncio.run(main(parser.parse_args()))
