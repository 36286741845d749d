"""What the exact tail costs a search: VECTOR candidates through an HNSW graph plus tails of growing size.

    python -m bench.hnsw_tail_search --base 20000 --tails 0,2500,5000,10000 --queries 100

``--base`` rows of the ``hard`` corpus are copied in and an HNSW graph is built over them up to their watermark
(``HNSW_TAIL_ROWS``' partial index), then rows are added above it until the tail holds each size of ``--tails``;
at each, ``--queries`` searches (the service's candidates statement, top 10, ef_search 40, iterative scans) run on
one connection, unfiltered and in a 1% scope. Printed per tail: the backend's CPU per search (from /proc, which the
load of a shared machine does not stretch) and the wall-clock p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import asyncpg

from bench.datasets import copy_into_memories, corpus, records
from bench.harness import loaded_for_index, print_table
from memory_service.config.settings import DEFAULT_HASH_MODEL
from memory_service.models import MemoryFilter, Scope, ScopeRef
from memory_service.search.tuning import scan_settings
from memory_service.storage import index_sql, search_sql


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _searches(
    conn: asyncpg.Connection, vectors: list[object], memory_filter: MemoryFilter, w: int
) -> list[float]:
    """CPU ms per search of the backend, and the wall ms of each search."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    walls = []
    cpu = _cpu_seconds(pid)
    for vector in vectors:
        started = time.perf_counter()
        await search_sql.candidates(
            conn, memory_filter, vector=vector, text=None, limit=10, exact=False, full_rows=True, watermark=w
        )
        walls.append(1000 * (time.perf_counter() - started))
    return [1000 * (_cpu_seconds(pid) - cpu) / len(vectors), statistics.median(walls)]


async def run(args: argparse.Namespace) -> None:
    tails = [int(t) for t in args.tails.split(",")]
    data = corpus("hard", args.base + max(tails))
    rows = records(data, model=DEFAULT_HASH_MODEL)
    queries = [data.vectors[i] for i in range(0, args.base + max(tails), (args.base + max(tails)) // args.queries)]
    scope = MemoryFilter(scopes=(ScopeRef(scope=Scope.PROJECT, scope_id=7),))
    table = []
    async with loaded_for_index(rows[: args.base]) as conn:
        for name, value in scan_settings("hnsw", 40, iterative=True, limit=10, filtered=False).items():
            await conn.execute(f"SET {name} = '{value}'")
        # First a complete graph over the same rows and the statement without a tail: the floor.
        await index_sql.rebuild(conn, index_sql.IndexSpec("hnsw"))
        await conn.execute("VACUUM ANALYZE memory.memories")
        await _searches(conn, queries[:10], MemoryFilter(), None)
        floor = [
            *await _searches(conn, queries, MemoryFilter(), None),
            *await _searches(conn, queries, scope, None),
        ]
        table.append(["complete graph, no tail statement", *floor])
        print(table[-1], flush=True)
        w = await index_sql.next_watermark(conn)
        await index_sql.rebuild(conn, index_sql.IndexSpec("hnsw", watermark=w))
        loaded = 0
        for tail in tails:
            await copy_into_memories(conn, rows[args.base + loaded : args.base + tail])
            loaded = tail
            await conn.execute("VACUUM ANALYZE memory.memories")
            await _searches(conn, queries[:10], MemoryFilter(), w)  # warm the caches and the plan
            everything = await _searches(conn, queries, MemoryFilter(), w)
            scoped = await _searches(conn, queries, scope, w)
            table.append([tail, *everything, *scoped])
            print(table[-1], flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.base} hard rows in the graph, {args.queries} searches per row; load average {load}\n")
    headers = ["graph, tail rows", "CPU ms/search", "p50 ms", "1% scope: CPU ms/search", "p50 ms"]
    print_table(headers, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=20_000)
    parser.add_argument("--tails", default="0,2500,5000,10000")
    parser.add_argument("--queries", type=int, default=100)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
