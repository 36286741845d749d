"""What the calibration's choice costs and risks with a given ladder of ef_search settings.

    python -m bench.calibration_ladder --rows 100000 --queries 1200
    python -m bench.calibration_ladder --dsn DSN --samples 200,400
    python -m bench.calibration_ladder --dataset minilm --queries 1109 --samples 200,400   # SciFact's own queries

The calibration (``search.calibration``) walks up a ladder of settings on half of its sample of searches and
stops at the first whose one-sided 95% lower bound of mean recall@10 reaches the target, confirmed by the other
half. A finer ladder overshoots less, but each extra step is one more chance for a sample to pass by luck. This
measures recall@10 and PostgreSQL's CPU time of ``--queries`` fresh queries (never stored rows) at every setting
of both ladders on an HNSW index (``bench.overhead``'s database: ``--dataset``, ``hard`` by default, or ``--dsn``
as it is), then replays the calibration's rule on ``--draws`` random samples of each size in ``--samples`` and
reports, per ladder: the settings it picks, PostgreSQL's mean CPU per search at them, and how often the pick's
recall over every fresh query falls below the target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os

import asyncpg
import numpy as np
import numpy.typing as npt

from bench.datasets import NAMES, corpus, queries
from bench.harness import print_table
from bench.overhead import prepare
from bench.peers import exact_top
from bench.server_cpu import cpu_seconds
from memory_service.models import MemoryFilter
from memory_service.search.calibration import HNSW_LADDER, RECALL_AT, Z95
from memory_service.search.tuning import scan_settings
from memory_service.storage import index_sql, search_sql
from memory_service.storage.database import init_connection

FINER = (16, 20, 24, 28, 32, 36, 40, 44, 48, 56, 64, 72, 80, 88, 100)


async def measure(
    dsn: str, settings: list[int], query_vectors: npt.NDArray[np.float32], truth: list[set[int]]
) -> tuple[dict[int, npt.NDArray[np.float64]], dict[int, float]]:
    """Per-query recall@10 and PostgreSQL's mean CPU ms per search at each setting, through the service's statement."""
    conn = await asyncpg.connect(dsn)
    try:
        await init_connection(conn)
        row_of = {r["id"]: int(r["key"].split("-")[1]) for r in await conn.fetch("SELECT id, key FROM memory.memories")}
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        watermark = (await index_sql.index_info(conn, "hnsw")).watermark
        sql, _ = search_sql.candidates_statement(
            MemoryFilter(), vector=query_vectors[0], text=None, limit=RECALL_AT, exact=False, full_rows=False,
            watermark=watermark,
        )  # fmt: skip
        recalls, costs = {}, {}
        for setting in settings:
            for name, value in scan_settings(
                "hnsw", setting, iterative=True, limit=RECALL_AT + 1, filtered=False
            ).items():
                await conn.execute("SELECT set_config($1, $2, false)", name, value)
            started = cpu_seconds(backend)
            per_query = []
            for vector, nearest in zip(query_vectors, truth, strict=True):
                found = {row_of[r["id"]] for r in await conn.fetch(sql, vector)}
                per_query.append(len(found & nearest) / RECALL_AT)
            costs[setting] = (cpu_seconds(backend) - started) / len(query_vectors) * 1000
            recalls[setting] = np.array(per_query)
            print(f"ef_search {setting}: recall {recalls[setting].mean():.4f}, {costs[setting]:.3f} ms", flush=True)
        return recalls, costs
    finally:
        await conn.close()


def choose(ladder: tuple[int, ...], recalls: dict[int, npt.NDArray[np.float64]], sample: npt.NDArray[np.int64],
           target: float) -> int:  # fmt: skip
    """The calibration's rule (``calibration._curve`` and ``Curve.chosen``) on one sample of query indexes."""
    fit, held_out = sample[0::2], sample[1::2]
    for setting in ladder:
        found = recalls[setting][fit]
        bound = found.mean() - Z95 * found.std(ddof=1) / math.sqrt(len(found))
        if bound >= target and recalls[setting][held_out].mean() >= target:
            return setting
    return ladder[-1]


async def run(args: argparse.Namespace) -> None:
    ladders = {"current": tuple(s for s in HNSW_LADDER if s <= FINER[-1]), "finer": FINER}
    async with contextlib.AsyncExitStack() as stack:
        prepared = await prepare(stack, args, args.dataset)
        data = corpus(args.dataset, prepared.table_rows)
        query_vectors = queries(data, args.queries)[0]
        truth = exact_top(data.vectors, query_vectors)
        settings = sorted(set(ladders["current"]) | set(FINER))
        recalls, costs = await measure(prepared.dsn, settings, query_vectors, truth)
    rng = np.random.default_rng(args.seed)
    rows = []
    for size in args.samples:
        for name, ladder in ladders.items():
            picks = [
                choose(ladder, recalls, rng.choice(len(query_vectors), size, replace=False), args.target)
                for _ in range(args.draws)
            ]
            values, counts = np.unique(picks, return_counts=True)
            spread = ", ".join(
                f"{v}: {c / len(picks):.0%}" for v, c in zip(values, counts, strict=True) if c >= 0.02 * len(picks)
            )
            below = float(np.mean([recalls[p].mean() < args.target for p in picks]))
            rows.append([size, name, float(np.mean([costs[p] for p in picks])), below, spread])
    print(
        f"\n{prepared.table_rows} rows of {args.dataset}, {len(query_vectors)} fresh queries, target {args.target}, "
        f"{args.draws} draws; load average {os.getloadavg()[0]:.2f}\n"
    )
    print_table(["sample", "ladder", "PostgreSQL ms a search", "picks below target", "picks (2% or more)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dataset", default="hard", choices=NAMES)
    parser.add_argument("--dsn", help="measure on this database as it is (loaded and indexed) instead of a new one")
    parser.add_argument("--queries", type=int, default=1200)
    parser.add_argument("--samples", type=lambda v: [int(x) for x in v.split(",")], default=[126, 200])
    parser.add_argument("--draws", type=int, default=3000)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.index = "hnsw"
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
