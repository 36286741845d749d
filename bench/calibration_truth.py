"""What a calibration's truth costs: one pass over the table for every query at once, against an exact scan each.

    python -m bench.calibration_truth --rows 1000000 --queries 400

A calibration needs the exact top 10 of each of its unfiltered queries (``SEARCH_CALIBRATION_QUERIES``). The
service reads the live rows' vectors once, a batch at a time, and ranks every query against each batch
(``search.exact_truth``); the alternative is PostgreSQL's exact scan per query, the statement exact searches run.
``--rows`` ``hard`` rows are copied into a new database (no index: neither way uses one), then both are timed
(wall time, this process's CPU, the backend's CPU): the pass for all ``--queries`` queries, and ``--scans``
per-query exact scans, from which the time for all queries is extrapolated. The scanned queries' top 10 are
compared with the pass's. Beside the pass a task asks the event loop to wake it every millisecond: the longest it
waited is how long a serving process's searches would have waited while a calibration found its truth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from bench.datasets import corpus, queries, records
from bench.harness import loaded_for_index, print_table
from bench.server_cpu import cpu_seconds
from memory_service.config.settings import DEFAULT_HASH_MODEL
from memory_service.models import MemoryFilter
from memory_service.search.calibration import RECALL_AT
from memory_service.search.exact_truth import exact_top
from memory_service.storage import calibration_sql


async def longest_pause(stop: asyncio.Event) -> float:
    """The longest the event loop kept a 1 ms sleeper waiting beyond its millisecond, until ``stop`` is set."""
    longest = 0.0
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        longest = max(longest, time.perf_counter() - before - 0.001)
    return longest


async def run(args: argparse.Namespace) -> None:
    data = corpus("hard", args.rows)
    query_vectors = list(queries(data, args.queries)[0])
    rows = records(data, model=DEFAULT_HASH_MODEL)
    del data
    async with loaded_for_index(rows) as conn:
        await conn.execute("VACUUM ANALYZE memory.memories")
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        stop = asyncio.Event()
        ticker = asyncio.create_task(longest_pause(stop))
        started, cpu, pg = time.perf_counter(), time.process_time(), cpu_seconds(backend)
        truth = await exact_top(query_vectors, calibration_sql.live_vectors(conn), RECALL_AT)
        one_pass = (
            time.perf_counter() - started,
            time.process_time() - cpu,
            cpu_seconds(backend) - pg,
        )
        stop.set()
        pause_ms = await ticker * 1000
        print(f"one pass: {one_pass}", flush=True)
        started, cpu, pg = time.perf_counter(), time.process_time(), cpu_seconds(backend)
        same = 0
        for i in range(args.scans):
            ids = await calibration_sql.nearest(conn, MemoryFilter(), query_vectors[i], limit=RECALL_AT, exact=True)
            same += set(ids) == set(truth[i])
        scale = args.queries / args.scans
        per_query = (
            (time.perf_counter() - started) * scale,
            (time.process_time() - cpu) * scale,
            (cpu_seconds(backend) - pg) * scale,
        )
    print(
        f"\n{args.rows} rows of hard, {args.queries} queries; {same} of {args.scans} scanned queries have the same "
        f"top {RECALL_AT} both ways; load average {os.getloadavg()[0]:.2f}\n"
    )
    print_table(
        ["truth", "wall s", "this process CPU s", "PostgreSQL CPU s", "longest event-loop pause ms"],
        [
            ["one pass, every query", *[f"{v:.1f}" for v in one_pass], f"{pause_ms:.0f}"],
            [f"exact scan per query ({args.scans} timed, scaled)", *[f"{v:.1f}" for v in per_query], "-"],
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--scans", type=int, default=10, help="per-query exact scans timed")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
