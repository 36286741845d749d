"""BulkStore into a table that already has its vector index: ivfflat against HNSW (why ivfflat is the default).

    python -m bench.indexed_ingest --base 20000 --extra 10000

``--base`` rows of the ``hard`` corpus are copied in and indexed (``maintenance_work_mem`` 512 MB, the build's
own parallel workers), then a server (``SERVER_PROCESSES=1``, the index kept whatever the size) takes ``--extra``
new rows through BulkStore with their embeddings, 1,000 a message, then as many rewrites of indexed rows (new
texts and vectors under their keys), and the rows/s of each are printed per index. With
``HNSW_TAIL_ROWS`` 0 every row written into an HNSW index is inserted into its graph, a search at
``ef_construction`` of its own; by default the graph covers the rows up to its build's watermark and the loaded
rows are its tail, searched exactly until the next build (``search.index_care``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import time

import asyncpg

from bench.datasets import corpus, load_for_index, records
from bench.harness import ServerProcess, database_server, fresh_database, print_table
from bench.ingest import bulk_store, requests
from memory_service.config.settings import DEFAULT_HASH_MODEL
from memory_service.models import IndexKind
from memory_service.storage import index_sql, settings_sql
from memory_service.storage.database import init_connection
from memory_service.storage.migrations import apply_migrations
from memory_service.v1 import memory_pb2

CASES: tuple[tuple[IndexKind, int, int], ...] = (
    ("ivfflat", 0, 0),
    ("hnsw", 64, 5000),
    ("hnsw", 64, 0),
    ("hnsw", 32, 0),
)
"""Index kind, HNSW ef_construction (m 16 throughout) and HNSW_TAIL_ROWS (0: every row into the graph)."""


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _timed(dsn: str, server: ServerProcess, messages: list[memory_pb2.BulkStoreRequest]) -> tuple[float, float]:
    """Seconds of a BulkStore, and the CPU seconds the server and its database backends spent on it (what the load
    of a shared machine does not stretch; the server must be local)."""
    conn = await asyncpg.connect(dsn)
    try:
        query = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        before = {pid: _cpu_seconds(pid) for pid in [server.process.pid, *[r[0] for r in await conn.fetch(query)]]}
        seconds = await bulk_store(server.address, messages)
        after = {pid: _cpu_seconds(pid) for pid in [server.process.pid, *[r[0] for r in await conn.fetch(query)]]}
    finally:
        await conn.close()
    return seconds, sum(after[pid] - before.get(pid, 0.0) for pid in after)


def _case_name(kind: IndexKind, ef_construction: int, tail_rows: int) -> str:
    name = kind if kind == "ivfflat" else f"hnsw m 16, ef_construction {ef_construction}"
    if kind == "hnsw":
        name += f", tail up to {tail_rows}" if tail_rows else ", every row into the graph"
    return name


async def one(
    server_dsn: str,
    kind: IndexKind,
    ef_construction: int,
    base: int,
    extra: int,
    *,
    tail_rows: int,
    maintain: bool = False,
) -> tuple[str, float, float, float, float, float]:
    """Build seconds, then rows/s and CPU ms per row of ``extra`` new rows through BulkStore, then of ``extra``
    rewrites of indexed rows (new texts and vectors under their keys)."""
    data = corpus("hard", base + extra)
    rows = records(data, model=DEFAULT_HASH_MODEL)
    # The rest of the corpus, under other texts: rewrites of the first rows under their own keys, then new rows.
    more = dataclasses.replace(
        data,
        vectors=data.vectors[base:],
        texts=["more " + t for t in data.texts[base:]],
        topics=data.topics[base:],
        scope_ids=data.scope_ids[base:],
        importance=data.importance[base:],
    )
    rewrites = requests(more, 1000, embedded=True)
    created = requests(more, 1000, embedded=True)
    for message in created:
        for item in message.items:
            item.memory.key = item.memory.key.replace("row-", "new-")
    async with fresh_database(server_dsn) as dsn:
        await apply_migrations(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await init_connection(conn)
            await load_for_index(conn, rows[:base])
            started = time.perf_counter()
            watermark = await index_sql.next_watermark(conn) if tail_rows else None
            spec = index_sql.IndexSpec(
                kind, lists=max(10, base // 1000), ef_construction=ef_construction or 64, watermark=watermark
            )
            built_at = await index_sql.rebuild(conn, spec)
            build = time.perf_counter() - started
            # What index care records of a build, so that its checks (--maintain) judge this one as their own.
            await settings_sql.write_settings(
                conn, {"vector_index_rows_at_build": str(base), "vector_index_built_at": built_at.isoformat()}
            )
        finally:
            await conn.close()
        env = {
            "DATABASE_URL": dsn,
            "VECTOR_INDEX": kind,
            "SERVER_PROCESSES": "1",
            "EXACT_SEARCH_MAX_ROWS": "1000" if maintain else "1000000000",
            "HNSW_TAIL_ROWS": str(tail_rows),
        }
        if maintain:
            env["INDEX_CHECK_INTERVAL"] = "1s"  # rebuilds and calibrations run during the load, as they would
        server = ServerProcess(env)
        server.wait_ready()
        try:
            new_seconds, new_cpu = await _timed(dsn, server, created)
            rewrite_seconds, rewrite_cpu = await _timed(dsn, server, rewrites)
        finally:
            server.stop()
    name = _case_name(kind, ef_construction, tail_rows)
    new, rewritten = extra / new_seconds, extra / rewrite_seconds
    new_ms, rewrite_ms = 1000 * new_cpu / extra, 1000 * rewrite_cpu / extra
    print(
        f"{name}: built in {build:.1f} s, new rows {new:.0f}/s ({new_ms:.2f} CPU ms each), "
        f"rewrites {rewritten:.0f}/s ({rewrite_ms:.2f} CPU ms each)",
        flush=True,
    )
    return name, build, new, new_ms, rewritten, rewrite_ms


async def run(args: argparse.Namespace) -> None:
    runs: dict[str, list[tuple[float, ...]]] = {}
    with database_server() as server:
        # Cases alternate, round after round, so a busy spell of a shared machine falls on all of them.
        for _ in range(args.repeat):
            for kind, ef_construction, tail_rows in CASES:
                if args.cases and not any(
                    _case_name(kind, ef_construction, tail_rows).find(c) >= 0 for c in args.cases.split("|")
                ):
                    continue
                name, *measured = await one(
                    server, kind, ef_construction, args.base, args.extra, tail_rows=tail_rows, maintain=args.maintain
                )
                runs.setdefault(name, []).append(tuple(measured))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    maintained = ", index care checking every second" if args.maintain else ""
    print(f"\n{args.base} hard rows indexed, then {args.extra} new rows and {args.extra} rewrites of indexed rows")
    print(f"(the index kept whatever the size{maintained})")
    print(f"through BulkStore; medians of {args.repeat} alternating runs; load average {load}\n")
    medians = {
        name: [statistics.median(column) for column in zip(*values, strict=True)] for name, values in runs.items()
    }
    _, new_floor, new_ms_floor, rewrite_floor, _ = next(iter(medians.values()))
    table = [
        [name, build, new, new_floor / new, new_ms / new_ms_floor, rw, rewrite_floor / rw, rw_ms]
        for name, (build, new, new_ms, rw, rw_ms) in medians.items()
    ]
    headers = [
        "index",
        "build s",
        "new rows/s",
        "ivfflat / this",
        "CPU / ivfflat's",
        "rewrites/s",
        "ivfflat / this",
        "rewrite CPU ms",
    ]
    print_table(headers, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=20_000, help="rows indexed before the load")
    parser.add_argument("--extra", type=int, default=10_000, help="rows then loaded through BulkStore")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the cases, alternating")
    parser.add_argument(
        "--maintain", action="store_true", help="index care checks every second, rebuilding during the load"
    )
    parser.add_argument("--cases", help="only the cases whose name holds this (e.g. 'tail' or 'ivfflat|tail')")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
