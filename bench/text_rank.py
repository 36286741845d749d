"""The text index's ranking alone, in process: CPU time per search, which the machine's load does not stretch.

    BENCH_DATABASE_URL=... python -m bench.text_rank --rows 100000,1000000

Reads a database ``bench.text --keep`` loaded (``bench_text_<rows>_<0|1>``), builds the index as the server does
(``text_index_sql.load``), then for the same queries as ``bench.text`` times ``TextIndex.top`` (unfiltered, top 10)
and ``TextIndex.score_ids`` over the 1% scope's and the 10k scope's ids (8 words) with ``time.process_time``: the
median of three runs per query, then p50 / p90 over the queries. Every answer is checked against the exhaustive
top 10 (every matching document scored; a document tying the 10th score may stand in for another).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np

from bench.harness import database_server, print_table
from bench.text import LENGTHS, queries
from memory_service.search.text_index import TextIndex
from memory_service.search.text_segment import Scoring
from memory_service.storage import text_index_sql
from memory_service.storage.database import init_connection

K = 10
_RUNS = 3


async def build(conn: asyncpg.Connection) -> TextIndex:
    index = TextIndex()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for part in text_index_sql.load(conn):
            index.add_loaded(part)
        docs, total_length = await text_index_sql.corpus(conn)
    index.finish_load(total_length / docs)
    return index


def scoring(terms: text_index_sql.QueryTerms) -> Scoring:
    idf = tuple(float(np.log(1 + (max(terms.docs, df) - df + 0.5) / (df + 0.5))) for df in terms.dfs)
    return Scoring(tuple(terms.lexemes), idf, terms.total_length / terms.docs, 1.2, 0.75)


def exhaustive(index: TextIndex, query: Scoring, ids: np.ndarray | None) -> list[tuple[int, float]]:
    """Every matching document scored (the segments' exhaustive path), restricted to ``ids`` when given."""
    slots, scores = [], []
    for segment in index.segments:
        local, score = segment.exhaustive(query)
        slots.append(segment.slots[local])
        scores.append(score)
    all_slots, all_scores = np.concatenate(slots), np.concatenate(scores)
    found = index.ids[all_slots]
    keep = index.alive[all_slots] if ids is None else np.isin(found, ids) & index.alive[all_slots]
    found, all_scores = found[keep], all_scores[keep]
    order = np.lexsort((found, -all_scores))[:K]
    return list(zip(found[order].tolist(), all_scores[order].tolist(), strict=True))


def same_top(got: list[tuple[int, float]], truth: list[tuple[int, float]]) -> bool:
    if len(got) != len(truth):
        return False
    if not np.allclose([s for _, s in got], [s for _, s in truth], rtol=1e-9):
        return False
    last = truth[-1][1] if truth else 0.0
    return {i for i, s in got if s > last + 1e-9} == {i for i, s in truth if s > last + 1e-9}


def cpu_ms(call: object) -> float:
    runs = []
    for _ in range(_RUNS):
        started = time.process_time()
        call()  # type: ignore[operator]
        runs.append(time.process_time() - started)
    return 1000 * float(np.median(runs))


async def measure(dsn: str, rows: int, by_length: dict[int, list[str]]) -> list[list[object]]:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    try:
        started = time.perf_counter()
        index = await build(conn)
        print(f"{rows}: index built in {time.perf_counter() - started:.1f}s, {index.nbytes >> 20} MB", flush=True)
        scopes = {
            "1% scope": await conn.fetchval("SELECT array_agg(id) FROM memory.memories WHERE scope_id = 1"),
            "10k scope": await conn.fetchval("SELECT array_agg(id) FROM memory.memories WHERE scope_id = 0"),
        }
        out: list[list[object]] = []
        now = time.time()
        cases: list[tuple[str, int, np.ndarray | None]] = [("unfiltered", n, None) for n in LENGTHS]
        cases += [(label, 8, np.array(sorted(ids), dtype=np.int64)) for label, ids in scopes.items()]
        for label, length, ids in cases:
            times, exact = [], 0
            for text in by_length[length]:
                query = scoring(await text_index_sql.query_terms(conn, text, after=2**62))
                if not query.lexemes:
                    continue
                if ids is None:
                    got = index.top(query, K, now)
                    times.append(cpu_ms(lambda q=query: index.top(q, K, now)))
                else:
                    got = index.score_ids(ids, query, now, k=K)
                    times.append(cpu_ms(lambda q=query, i=ids: index.score_ids(i, q, now, k=K)))
                exact += same_top(got, exhaustive(index, query, ids))
            p50, p90 = (round(float(np.percentile(times, p)), 3) for p in (50, 90))
            out.append([rows, label, length, f"{exact}/{len(times)}", p50, p90])
        out.append([rows, "index MB", "", "", index.nbytes >> 20, ""])
        return out
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> None:
    by_length = queries(args.data, args.queries)
    table: list[list[object]] = []
    with database_server() as server_dsn:
        for rows in args.rows:
            name = f"bench_text_{rows}_{int(rows <= args.hybrid_upto)}"
            dsn = urlunsplit(urlsplit(server_dsn)._replace(path="/" + name))
            table += await measure(dsn, rows, by_length)
    print_table(["rows", "search", "words", "exact top 10", "CPU p50 ms", "CPU p90 ms"], table)
    print(f"{args.queries} queries per length, top {K}; load average {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/scifact"))
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[100_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--hybrid-upto", type=int, default=100_000, help="as bench.text's: which database to read")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
