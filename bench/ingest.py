"""Bulk ingest benchmark: BulkStore against plain asyncpg into the same fully indexed table, in one run.

    python -m bench.ingest --rows 100000

Every path loads the same pre-embedded 384-d corpus into a fresh database whose memory.memories carries all its
indexes, the ivfflat one included (built with the lists a table of this size gets), each in transactions of
``--batch`` rows:

- asyncpg COPY: binary COPY straight into the table, the floor;
- asyncpg executemany: a prepared INSERT of the same rows;
- BulkStore: a client that sends pre-built requests as fast as gRPC flow control lets it, to a server process;
- Store loop: one unary Store after another (on ``--store-rows`` rows, it is slow);
- BulkStore with the hash embedder: the same rows without embeddings, so the server computes them;
- the ``memory-service ingest`` CLI on a JSONL file of those rows (no embeddings).

The server's resident memory is sampled during each load (the peak is reported), showing that a client sending
as fast as it can does not grow it with the size of the load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
from grpc import aio

from bench.corpus import Corpus
from bench.datasets import COPY_COLUMNS, clustered, copy_into_memories, records
from bench.harness import ServerProcess, database_server, fresh_database, print_table
from memory_service.config.settings import DEFAULT_HASH_MODEL
from memory_service.search.index_policy import fitted_lists
from memory_service.storage import index_sql, settings_sql
from memory_service.storage.database import init_connection
from memory_service.storage.migrations import apply_migrations
from memory_service.v1 import memory_pb2, memory_pb2_grpc

DIM = 384
_INSERT = (
    f"INSERT INTO memory.memories ({', '.join(COPY_COLUMNS)}) "
    "VALUES ($1::text::memory.scope, $2, $3, $4, $5, $6, $7, $8)"
)


async def prepare(dsn: str, rows: int) -> None:
    """Migrate, bind the model and dimension, and build the ivfflat index a table of ``rows`` rows gets."""
    await apply_migrations(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await settings_sql.bind_embedding_model(conn, DEFAULT_HASH_MODEL, DIM)
        await index_sql.rebuild(conn, index_sql.IndexSpec("ivfflat", lists=fitted_lists(rows)))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def indexed_database(server_dsn: str, rows: int) -> AsyncIterator[str]:
    async with fresh_database(server_dsn) as dsn:
        await prepare(dsn, rows)
        yield dsn


async def count_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM memory.memories"))
    finally:
        await conn.close()


async def plain_asyncpg(dsn: str, rows: list[tuple[object, ...]], batch: int, *, copy: bool) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)
        started = time.perf_counter()
        for start in range(0, len(rows), batch):
            async with conn.transaction():
                if copy:
                    await copy_into_memories(conn, rows[start : start + batch])
                else:
                    await conn.executemany(_INSERT, rows[start : start + batch])
        return time.perf_counter() - started
    finally:
        await conn.close()


def memory_input(corpus: Corpus, i: int, *, embedded: bool) -> memory_pb2.MemoryInput:
    message = memory_pb2.MemoryInput(
        scope=memory_pb2.SCOPE_PROJECT,
        scope_id=int(corpus.scope_ids[i]),
        key=f"row-{i}",
        value=corpus.texts[i],
        importance=float(corpus.importance[i]),
    )
    if embedded:
        message.embedding.extend(corpus.vectors[i].tolist())
    return message


class PeakRss:
    """Samples a process's resident set size every 20 ms."""

    def __init__(self, pid: int) -> None:
        self._path = Path(f"/proc/{pid}/status")
        self.start_mb = self._sample()
        self.peak_mb = self.start_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        for line in self._path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, self._sample())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def server(dsn: str, batch: int) -> Iterator[ServerProcess]:
    # No ivfflat rebuild in the middle of a load: the index was built up front.
    process = ServerProcess({"DATABASE_URL": dsn, "BULK_BATCH_ROWS": str(batch), "EXACT_SEARCH_MAX_ROWS": "1000000000"})
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


async def bulk_store(address: str, messages: list[memory_pb2.BulkStoreRequest]) -> float:
    async with aio.insecure_channel(address) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        await stub.Stats(memory_pb2.StatsRequest())  # connect before the clock starts
        started = time.perf_counter()
        last = 0
        async for ack in stub.BulkStore(iter(messages)):
            assert ack.rejected == 0, ack.rejections[0]
            last = ack.durable_sequence
        elapsed = time.perf_counter() - started
    assert last == sum(len(m.items) for m in messages)
    return elapsed


async def store_loop(address: str, corpus: Corpus, count: int) -> float:
    async with aio.insecure_channel(address) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        requests = [memory_pb2.StoreRequest(memory=memory_input(corpus, i, embedded=True)) for i in range(count)]
        await stub.Stats(memory_pb2.StatsRequest())
        started = time.perf_counter()
        for request in requests:
            await stub.Store(request)
        return time.perf_counter() - started


def requests(corpus: Corpus, batch: int, *, embedded: bool) -> list[memory_pb2.BulkStoreRequest]:
    items = [
        memory_pb2.BulkItem(sequence=i + 1, memory=memory_input(corpus, i, embedded=embedded))
        for i in range(len(corpus))
    ]
    return [memory_pb2.BulkStoreRequest(items=items[i : i + batch]) for i in range(0, len(items), batch)]


def cli_ingest(address: str, corpus: Corpus, batch: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as handle:
        for i, text in enumerate(corpus.texts):
            line = {"scope": "project", "scope_id": int(corpus.scope_ids[i]), "key": f"row-{i}", "value": text}
            handle.write(json.dumps(line) + "\n")
        handle.flush()
        command = [sys.executable, "-m", "memory_service", "ingest", handle.name, "--address", address, "-q"]
        started = time.perf_counter()
        subprocess.run([*command, "--batch-size", str(batch)], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started


@dataclasses.dataclass
class Result:
    name: str
    rows: int
    seconds: float = float("inf")
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


async def run(args: argparse.Namespace) -> None:
    corpus = clustered(args.rows, dim=DIM)
    rows = records(corpus, model=DEFAULT_HASH_MODEL)
    pre_embedded = requests(corpus, args.batch, embedded=True)
    unembedded = requests(corpus, args.batch, embedded=False)
    store_rows = min(args.store_rows, len(rows))

    def direct(copy: bool) -> Callable[[str], Awaitable[float]]:
        return lambda dsn: plain_asyncpg(dsn, rows, args.batch, copy=copy)

    scenarios: list[tuple[Result, bool, Callable[[str], Awaitable[float]]]] = [
        (Result("asyncpg COPY", len(rows)), False, direct(True)),
        (Result("asyncpg executemany", len(rows)), False, direct(False)),
        (Result("BulkStore", len(rows)), True, lambda address: bulk_store(address, pre_embedded)),
        (Result("Store loop", store_rows), True, lambda address: store_loop(address, corpus, store_rows)),
        (Result("BulkStore, hash embedder", len(rows)), True, lambda address: bulk_store(address, unembedded)),
        (
            Result("ingest CLI, hash embedder", len(rows)),
            True,
            lambda address: asyncio.to_thread(cli_ingest, address, corpus, 500),
        ),
    ]
    with database_server() as server_dsn:
        # Rounds interleave the paths, so a burst of load from elsewhere on the machine hits all of them alike;
        # each path reports its best round.
        for round_ in range(1, args.rounds + 1):
            for result, via_server, load in scenarios:
                async with indexed_database(server_dsn, args.rows) as dsn:
                    if via_server:
                        with server(dsn, args.batch) as process, PeakRss(process.process.pid) as rss:
                            seconds = await load(process.address)
                        result.rss_start_mb = rss.start_mb
                        result.rss_peak_mb = max(result.rss_peak_mb, rss.peak_mb)
                    else:
                        seconds = await load(dsn)
                    assert await count_rows(dsn) == result.rows
                result.seconds = min(result.seconds, seconds)
                print(f"round {round_}: {result.name}: {result.rows / seconds:,.0f} rows/s", flush=True)

    copy_rate, executemany_rate = scenarios[0][0].rate, scenarios[1][0].rate
    print()
    print_table(
        ["path", "rows", "seconds", "rows/s", "x COPY", "x executemany", "server RSS start -> peak (MB)"],
        [
            (
                r.name,
                r.rows,
                r.seconds,
                r.rate,
                r.rate / copy_rate,
                r.rate / executemany_rate,
                f"{r.rss_start_mb:.0f} -> {r.rss_peak_mb:.0f}" if r.rss_peak_mb else "",
            )
            for r, _, _ in scenarios
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="rows per transaction and per BulkStore request")
    parser.add_argument("--store-rows", type=int, default=5000, help="rows for the single-Store loop")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every path; each reports its best")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
