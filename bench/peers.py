"""Unfiltered VECTOR and TEXT against what a user would pick instead: chromadb's server and faiss in process for
VECTOR; tantivy and bm25s in process for TEXT (``bench.text``'s run, with exact BM25 as the truth).

    pip install -e '.[bench]'
    python -m bench.peers --rows 100000 --dataset hard               # VECTOR, then TEXT
    python -m bench.peers --rows 100000 --modes text                 # TEXT only

One corpus (``bench.datasets``; ``minilm`` for real MiniLM vectors), the same queries (never stored rows) and the
same exact top 10 (numpy) for every system:

* **memory-service**: loaded through BulkStore and indexed by ``memory-service reindex`` (``bench.scale.build``),
  then a server with its defaults (``SERVER_PROCESSES`` = the cores, ``VECTOR_INDEX``'s default unless the
  environment sets either), called through
  gRPC; timed twice: cold, on the build's calibration, and warm, once its processes have recalibrated on the
  searches they served (``INDEX_CHECK_INTERVAL`` 5 s so that it comes soon); the ratios are the warm ones;
* **chromadb**: ``chroma run`` as its own process (client and server, as the service is), cosine HNSW with
  chromadb's defaults (ef_search 100; 1.5.9 ignores a change of it on a loaded collection);
* **faiss** (``IndexHNSWFlat``, inner product on unit vectors, ``efSearch`` raised until recall@10 reaches 0.95), the
  limit of an HNSW search in process, with no process boundary and no database.

Each system is timed one call at a time (p50, p99) and with 16 calls in flight (calls/s), and the table gives the
service's ratios to chromadb. The load average and the versions are printed with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from grpc import aio

from bench import text as text_bench
from bench.datasets import NAMES, queries
from bench.harness import (
    ServerProcess,
    database_server,
    fresh_database,
    percentile_ms,
    print_table,
    server_processes,
    spread_channels,
    throughput,
)
from bench.scale import K, build, load_corpus, service_env
from memory_service.config.settings import Settings
from memory_service.v1 import memory_pb2, memory_pb2_grpc

TARGET = 0.95
IN_FLIGHT = 16
EF_LADDER = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def exact_top(vectors: npt.NDArray[np.float32], query_vectors: npt.NDArray[np.float32]) -> list[set[int]]:
    truth = []
    for start in range(0, len(query_vectors), 64):
        similarity = query_vectors[start : start + 64] @ vectors.T
        truth += [set(np.argpartition(-row, K)[:K].tolist()) for row in similarity]
    return truth


def recall(found: Sequence[set[int]], truth: Sequence[set[int]]) -> float:
    return float(np.mean([len(f & t) / K for f, t in zip(found, truth, strict=True)]))


class Timing:
    def __init__(self, name: str) -> None:
        self.name = name
        self.samples: list[float] = []
        self.rate = 0.0
        self.recall = 0.0
        self.setting = ""

    async def run(
        self,
        call: Callable[[int], Awaitable[set[int]]],
        spread: Callable[[int], Awaitable[object]],
        truth: Sequence[set[int]],
        *,
        count: int,
    ) -> None:
        found: list[set[int]] = []
        for i in range(len(truth)):
            found.append(await call(i))
        self.recall = recall(found, truth)
        for i in range(count):
            started = time.perf_counter()
            await call(i % len(truth))
            self.samples.append(time.perf_counter() - started)
        self.rate = await throughput(spread, in_flight=IN_FLIGHT, total=max(count, 2000))


async def warm_calibration(stub: Any, *, quiet: float = 30.0, limit: float = 900.0) -> str:
    """Wait until the index is calibrated on searches and no process has recalibrated for ``quiet`` seconds."""
    started = last_change = time.perf_counter()
    seen = None
    while time.perf_counter() - started < limit:
        calibration = (await stub.Stats(memory_pb2.StatsRequest())).index.calibration
        stamp = (calibration.calibrated_at.seconds, calibration.calibrated_at.nanos, calibration.probes)
        if stamp != seen:
            seen, last_change = stamp, time.perf_counter()
        if calibration.source == "searches" and time.perf_counter() - last_change >= quiet:
            return f"{calibration.probes} (recall {calibration.recall:.3f} on {calibration.queries} searches)"
        await asyncio.sleep(2.0)
    return "no calibration on searches in time"


async def memory_service(
    dsn: str, index: str, query_vectors: npt.NDArray[np.float32], truth: list[set[int]], count: int
) -> tuple[Timing, Timing]:
    """The service cold (on the build's calibration: recall and timing) and warm (recalibrated on its searches)."""
    # Index care checks every 5 s instead of every minute, so the warm calibration comes soon after the traffic.
    env = service_env(dsn, index, INDEX_CHECK_INTERVAL="5s")
    del env["SERVER_PROCESSES"]  # the service's default (one process per core) unless the environment sets it
    if "SERVER_PROCESSES" in os.environ:
        env["SERVER_PROCESSES"] = os.environ["SERVER_PROCESSES"]
    server = ServerProcess(env)
    channels: list[aio.Channel] = []
    try:
        await asyncio.to_thread(server.wait_ready, processes=server_processes(env))
        channels = spread_channels(server.address, IN_FLIGHT)
        stubs = [memory_pb2_grpc.MemoryServiceStub(c) for c in channels]
        requests = [
            memory_pb2.SearchRequest(mode=memory_pb2.SEARCH_MODE_VECTOR, top_k=K, query_embedding=v.tolist())
            for v in query_vectors
        ]
        plans: set[str] = set()

        async def call(i: int, stub: Any = stubs[0]) -> set[int]:
            response = await stub.Search(requests[i])
            plans.add(f"{response.plan} {response.probes}")
            return {int(h.memory.key.split("-")[1]) for h in response.hits}

        async def spread(i: int) -> object:
            return await call(i % len(requests), stubs[i % IN_FLIGHT])

        cold = Timing("memory-service, cold")
        await cold.run(call, spread, truth, count=count)
        cold.setting = ", ".join(sorted(plans))
        # Enough searches that every process fills its sample (SEARCH_CALIBRATION_QUERIES) and calibrates on it.
        await throughput(spread, in_flight=IN_FLIGHT, total=4 * len(requests) * server_processes(env))
        print(f"memory-service: warm calibration {await warm_calibration(stubs[0])}", flush=True)
        plans.clear()
        warm = Timing("memory-service, warm")
        await warm.run(call, spread, truth, count=count)
        warm.setting = ", ".join(sorted(plans))
        return cold, warm
    finally:
        for channel in channels:
            await channel.close()
        await asyncio.to_thread(server.stop)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_chroma(path: str, port: int) -> subprocess.Popen[bytes]:
    command = shutil.which("chroma") or os.path.join(os.path.dirname(sys.executable), "chroma")
    return subprocess.Popen(
        [command, "run", "--path", path, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def chroma(
    vectors: npt.NDArray[np.float32], query_vectors: npt.NDArray[np.float32], truth: list[set[int]], count: int
) -> Timing:
    import chromadb

    path = tempfile.mkdtemp(prefix="bench-chroma-")
    port = _free_port()
    process = _start_chroma(path, port)
    try:
        client = None
        for _ in range(300):
            try:
                client = await chromadb.AsyncHttpClient(host="127.0.0.1", port=port)
                await client.heartbeat()
                break
            except Exception:
                await asyncio.sleep(0.2)
        assert client is not None, "chroma did not start"
        collection = await client.create_collection("bench", metadata={"hnsw:space": "cosine"})
        ids = [str(i) for i in range(len(vectors))]
        started = time.perf_counter()
        for start in range(0, len(vectors), 5000):
            await collection.add(ids=ids[start : start + 5000], embeddings=vectors[start : start + 5000])
        print(f"chromadb: loaded {len(vectors)} rows in {time.perf_counter() - started:.0f}s", flush=True)

        async def call(i: int) -> set[int]:
            result = await collection.query(query_embeddings=query_vectors[i : i + 1], n_results=K, include=[])
            return {int(x) for x in result["ids"][0]}

        timing = Timing("chromadb")
        # chromadb's defaults: changing ef_search on a loaded collection (metadata or configuration) is stored but
        # did not change a single result in chromadb 1.5.9 (recall 0.989 at 10, 100 and 200 on 10k hard rows).
        hnsw = (collection.configuration_json or {}).get("hnsw") or {}
        timing.setting = f"defaults (ef_search {hnsw.get('ef_search')}, M {hnsw.get('max_neighbors')})"

        async def spread(i: int) -> object:
            return await call(i % len(truth))

        await timing.run(call, spread, truth, count=count)
        return timing
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)
        shutil.rmtree(path, ignore_errors=True)


async def faiss_hnsw(
    vectors: npt.NDArray[np.float32], query_vectors: npt.NDArray[np.float32], truth: list[set[int]], count: int
) -> Timing:
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 64
    index.add(vectors)

    def search(i: int) -> set[int]:
        _, found = index.search(query_vectors[i : i + 1], K)
        return {int(x) for x in found[0]}

    timing = Timing("faiss HNSW (in process)")
    for ef in EF_LADDER:
        index.hnsw.efSearch = ef
        timing.setting = f"efSearch {ef}"
        if recall([search(i) for i in range(len(truth))], truth) >= TARGET:
            break

    async def call(i: int) -> set[int]:
        return search(i % len(truth))

    await timing.run(call, call, truth, count=count)
    return timing


def report(timing: Timing) -> None:
    p50, rate = percentile_ms(timing.samples, 50), timing.rate
    said = f"{timing.name}: {timing.setting}, recall {timing.recall:.3f}, p50 {p50:.2f} ms, {rate:.0f} calls/s"
    print(said, flush=True)


def versions() -> str:
    found = []
    for package in ("grpcio", "asyncpg", "pgvector", "chromadb", "faiss-cpu"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return ", ".join(found)


async def run(args: argparse.Namespace) -> None:
    if "vector" in args.modes:
        await run_vector(args)
    if "text" in args.modes:
        # TEXT against tantivy and bm25s in process, and against exact BM25: bench.text's own run at these rows.
        await text_bench.run(
            argparse.Namespace(
                data=args.data, rows=[args.rows], queries=args.text_queries, total=args.count,
                peers=["tantivy", "bm25s"], hybrid=False, keep=False, hybrid_upto=0,
            )
        )  # fmt: skip


async def run_vector(args: argparse.Namespace) -> None:
    data, used = load_corpus(args.dataset, args.rows)
    query_vectors = queries(data, args.queries)[0]
    truth = exact_top(data.vectors, query_vectors)
    timings: list[Timing] = []
    index = os.environ.get("VECTOR_INDEX") or Settings.from_env({}).vector_index
    with database_server() as server_dsn:
        async with fresh_database(server_dsn) as dsn:
            built = await build(dsn, data, index)
            print(f"memory-service: {built}", flush=True)
            timings.extend(await memory_service(dsn, index, query_vectors, truth, args.count))
    report(timings[0])
    report(timings[1])
    timings.append(await chroma(data.vectors, query_vectors, truth, args.count))
    report(timings[-1])
    timings.append(await faiss_hnsw(data.vectors, query_vectors, truth, args.count))
    report(timings[-1])
    service, peer = timings[1], timings[2]
    print(
        f"\n{args.rows} rows of {used}, unfiltered VECTOR top {K}, {len(truth)} queries; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {versions()}\n"
    )
    rows = [
        [
            t.name,
            t.setting,
            t.recall,
            percentile_ms(t.samples, 50),
            percentile_ms(t.samples, 99),
            t.rate,
        ]
        for t in timings
    ]
    print_table(["system", "setting", "recall@10", "p50 ms", "p99 ms", f"calls/s at {IN_FLIGHT} in flight"], rows)
    p50_ratio = percentile_ms(service.samples, 50) / percentile_ms(peer.samples, 50)
    print(
        f"\nmemory-service (warm) / chromadb: p50 {p50_ratio:.2f}x (target <= 1.2x), "
        f"calls/s {service.rate / peer.rate:.2f}x (target >= 2x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dataset", default="hard", choices=NAMES)
    parser.add_argument(
        "--queries",
        type=int,
        default=1000,
        help="distinct queries (recall is measured on them); more than a calibration samples, so that each "
        "process's sample of its searches holds distinct ones, as real traffic's would",
    )
    parser.add_argument("--count", type=int, default=500, help="timed calls one at a time, per system")
    parser.add_argument(
        "--modes", type=lambda v: v.split(","), default=["vector", "text"], help="vector, text, or both (vector,text)"
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/scifact"), help="text corpus (SciFact)")
    parser.add_argument("--text-queries", type=int, default=100, help="TEXT queries per length")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
