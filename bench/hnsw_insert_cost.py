"""Where an HNSW insert's time goes: rows/s, backend CPU and WAL bytes per row of a plain COPY into an indexed table.

    python -m bench.hnsw_insert_cost --base 20000 --extra 2000

``--base`` rows of the ``hard`` corpus are copied in and indexed, then ``--extra`` more are copied in 200-row
batches from one connection or split across two, with the index kinds and settings of ``CASES``. The backend's CPU
time (from /proc, so the embedded server must be local) and the WAL written (``pg_current_wal_lsn``) are per row;
CPU is what the load on a shared machine does not stretch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import asyncpg

from bench.datasets import copy_into_memories, corpus, load_for_index, records
from bench.harness import database_server, fresh_database, print_table
from memory_service.config.settings import DEFAULT_HASH_MODEL
from memory_service.storage import index_sql
from memory_service.storage.database import init_connection
from memory_service.storage.migrations import apply_migrations

CASES: tuple[tuple[str, str, int, str], ...] = (
    ("none", "none", 0, ""),
    ("ivfflat", "ivfflat", 0, ""),
    ("hnsw ef_c 64", "hnsw", 64, ""),
    ("hnsw ef_c 64, wal_compression", "hnsw", 64, "SET wal_compression = 'pglz'"),
    ("hnsw ef_c 32", "hnsw", 32, ""),
    ("hnsw ef_c 64, graph up to the load (HNSW_TAIL_ROWS)", "hnsw-tail", 64, ""),
    ("hnsw ef_c 64, tail fed into the graph afterwards (HNSW_GRAPH_INSERT_ROWS)", "hnsw-feed", 64, ""),
)
BATCH = 200


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _connect(dsn: str, setup: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    if setup:
        await conn.execute(setup)
    return conn


async def _load(
    conns: list[asyncpg.Connection], rows: list[tuple[object, ...]], watermark: int | None = None
) -> tuple[float, float, int]:
    """Seconds, backend CPU seconds and WAL bytes of copying ``rows`` split across ``conns`` or, given the graph's
    ``watermark``, of feeding as many tail rows into the graph (the rows were copied in beforehand, untimed)."""
    pids = [await c.fetchval("SELECT pg_backend_pid()") for c in conns]
    lsn = await conns[0].fetchval("SELECT pg_current_wal_lsn()::text")
    cpu = sum(_cpu_seconds(p) for p in pids)
    started = time.perf_counter()

    async def worker(i: int) -> None:
        mine = rows[i :: len(conns)]
        for at in range(0, len(mine), BATCH):
            if watermark is None:
                await copy_into_memories(conns[i], mine[at : at + BATCH])
            else:
                await index_sql.feed_tail(conns[i], watermark, rows=len(mine[at : at + BATCH]))

    await asyncio.gather(*(worker(i) for i in range(len(conns))))
    seconds = time.perf_counter() - started
    cpu = sum(_cpu_seconds(p) for p in pids) - cpu
    wal = await conns[0].fetchval("SELECT pg_current_wal_lsn() - $1::text::pg_lsn", lsn)
    return seconds, cpu, int(wal)


async def one(server: str, case: tuple[str, str, int, str], base: int, extra: int, parallel: int) -> list[object]:
    name, kind, ef_construction, setup = case
    data = corpus("hard", base + extra)
    rows = records(data, model=DEFAULT_HASH_MODEL)
    # Later rows under other keys, so none is a duplicate of a loaded one.
    more = [(r[0], r[1], "more " + str(r[2]), *r[3:]) for r in rows[base:]]
    async with fresh_database(server) as dsn:
        await apply_migrations(dsn)
        conn = await _connect(dsn, "")
        try:
            await load_for_index(conn, rows[:base])
            watermark = None
            if kind != "none":
                watermark = await index_sql.next_watermark(conn) if kind.startswith("hnsw-") else None
                spec = index_sql.IndexSpec(
                    "ivfflat" if kind == "ivfflat" else "hnsw",
                    lists=max(10, base // 1000),
                    ef_construction=ef_construction or 64,
                    watermark=watermark,
                )
                await index_sql.rebuild(conn, spec)
            if kind == "hnsw-feed":
                await copy_into_memories(conn, more)
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()
        conns = [await _connect(dsn, setup) for _ in range(parallel)]
        try:
            seconds, cpu, wal = await _load(conns, more, watermark if kind == "hnsw-feed" else None)
        finally:
            for c in conns:
                await c.close()
    line = [name, parallel, extra / seconds, 1000 * cpu / extra, wal / extra]
    print(line, flush=True)
    return line


async def run(args: argparse.Namespace) -> None:
    table = []
    with database_server() as server:
        for case in CASES:
            if args.only and args.only not in case[0]:
                continue
            for parallel in (1, 2):
                if parallel == 2 and case[1] not in ("hnsw", "hnsw-feed"):
                    continue
                table.append(await one(server, case, args.base, args.extra, parallel))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{args.base} hard rows indexed, then {args.extra} copied in {BATCH}-row batches; load average {load}\n")
    print_table(["index", "connections", "rows/s", "backend CPU ms/row", "WAL bytes/row"], table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=20_000)
    parser.add_argument("--extra", type=int, default=2_000)
    parser.add_argument("--only", help="run only the cases whose name contains this")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
