"""BulkStore into a table that already has its vector index: ivfflat against HNSW (why ivfflat is the default).

    python -m bench.indexed_ingest --base 20000 --extra 10000

``--base`` rows of the ``hard`` corpus are copied in and indexed (``maintenance_work_mem`` 512 MB, the build's
own parallel workers), then a server (``SERVER_PROCESSES=1``, the index kept whatever the size) takes ``--extra``
more rows through BulkStore with their embeddings, 1,000 a message, and the rows/s are printed per index. Every
row written into an HNSW index is inserted into its graph, a search at ``ef_construction`` of its own, so the
second half of the table is the cost of keeping HNSW up to date rather than of building it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time

import asyncpg

from bench.datasets import copy_into_memories, corpus, records
from bench.harness import ServerProcess, database_server, fresh_database, print_table
from bench.ingest import bulk_store, requests
from memory_service.config.settings import DEFAULT_HASH_MODEL
from memory_service.models import IndexKind
from memory_service.storage import index_sql, settings_sql
from memory_service.storage.database import init_connection
from memory_service.storage.migrations import apply_migrations

CASES: tuple[tuple[IndexKind, int], ...] = (("ivfflat", 0), ("hnsw", 64), ("hnsw", 32))
"""Index kind and HNSW ef_construction (m 16 throughout)."""


async def one(
    server_dsn: str, kind: IndexKind, ef_construction: int, base: int, extra: int
) -> tuple[str, float, float]:
    data = corpus("hard", base + extra)
    rows = records(data, model=DEFAULT_HASH_MODEL)
    # The loaded rows: the rest of the corpus, under other keys and texts so none is a duplicate of an indexed row.
    tail = dataclasses.replace(
        data,
        vectors=data.vectors[base:],
        texts=["more " + t for t in data.texts[base:]],
        topics=data.topics[base:],
        scope_ids=data.scope_ids[base:],
        importance=data.importance[base:],
    )
    async with fresh_database(server_dsn) as dsn:
        await apply_migrations(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await init_connection(conn)
            async with conn.transaction():
                await settings_sql.bind_embedding_model(conn, DEFAULT_HASH_MODEL, 384)
            await copy_into_memories(conn, rows[:base])
            await conn.execute("SET maintenance_work_mem = '512MB'")
            started = time.perf_counter()
            spec = index_sql.IndexSpec(kind, lists=max(10, base // 1000), ef_construction=ef_construction or 64)
            await index_sql.rebuild(conn, spec)
            build = time.perf_counter() - started
        finally:
            await conn.close()
        env = {
            "DATABASE_URL": dsn,
            "VECTOR_INDEX": kind,
            "SERVER_PROCESSES": "1",
            "EXACT_SEARCH_MAX_ROWS": "1000000000",
        }
        server = ServerProcess(env)
        server.wait_ready()
        try:
            seconds = await bulk_store(server.address, requests(tail, 1000, embedded=True))
        finally:
            server.stop()
    name = kind if kind == "ivfflat" else f"hnsw m 16, ef_construction {ef_construction}"
    print(f"{name}: built in {build:.1f} s, {extra / seconds:.0f} rows/s", flush=True)
    return name, build, extra / seconds


async def run(args: argparse.Namespace) -> None:
    results = []
    with database_server() as server:
        for kind, ef_construction in CASES:
            results.append(await one(server, kind, ef_construction, args.base, args.extra))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.base} hard rows indexed, then {args.extra} through BulkStore; load average {load}\n")
    floor = results[0][2]
    table = [[name, build, rate, floor / rate] for name, build, rate in results]
    print_table(["index", "build s", "BulkStore rows/s", "ivfflat / this"], table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=20_000, help="rows indexed before the load")
    parser.add_argument("--extra", type=int, default=10_000, help="rows then loaded through BulkStore")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
