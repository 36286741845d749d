"""The text index's ranking alone, in process: CPU time per search, which the machine's load does not stretch.

    BENCH_DATABASE_URL=... python -m bench.text_rank --rows 100000,1000000
    BENCH_DATABASE_URL=... python -m bench.text_rank --rows 1000000 --against 256428f   # and an older segment

Reads a database ``bench.text --keep`` loaded (``bench_text_<rows>_<0|1>``), builds the index as the server does
(``text_index_sql.load``), then for the same queries as ``bench.text`` times ``TextIndex.top`` (unfiltered, top 10)
and ``TextIndex.score_ids`` over the 1% scope's and the 10k scope's ids (8 words) with ``time.process_time``: the
median of three runs per query, then p50 / p90 over the queries. Every answer is checked against the exhaustive
top 10 (every matching document scored; a document tying the 10th score may stand in for another).

``--against REV`` also builds ``memory_service/search/text_segment.py`` as it was at git revision REV over the same
postings and times its unfiltered ``top`` and its ``score_local`` over the scopes' documents against the current
segment's, alternating query by query so both see the same load ("segment only": without the index's mapping of
ids to slots and its final sort, which the first columns include).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np

from bench.harness import database_server, print_table
from bench.text import LENGTHS, queries
from memory_service.search.text_blocks import Scoring
from memory_service.search.text_index import TextIndex
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


def segment_at(revision: str) -> ModuleType:
    """``text_segment`` as it was at ``revision`` (a module of its own; it must import nothing from the package)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:memory_service/search/text_segment.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "text_segment_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("text_segment_then", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cpu_ms(call: object) -> float:
    runs = []
    for _ in range(_RUNS):
        started = time.process_time()
        call()  # type: ignore[operator]
        runs.append(time.process_time() - started)
    return 1000 * float(np.median(runs))


async def measure(dsn: str, rows: int, by_length: dict[int, list[str]], against: str | None) -> list[list[object]]:
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
        then = None
        segment = index.segments[0]
        if against is not None:
            then = segment_at(against).Segment(
                slots=segment.slots, lengths=segment.lengths, lexemes=segment.lexemes, docs=segment.docs,
                tfs=segment.tfs, offsets=segment.offsets, avgdl=float(segment.lengths.mean()),
            )  # fmt: skip
        cases: list[tuple[str, int, np.ndarray | None]] = [("unfiltered", n, None) for n in LENGTHS]
        cases += [(label, 8, np.array(sorted(ids), dtype=np.int64)) for label, ids in scopes.items()]
        for label, length, ids in cases:
            times, segment_times, before, exact = [], [], [], 0
            local = None if ids is None else index.slots_of(ids)
            for text in by_length[length]:
                query = scoring(await text_index_sql.query_terms(conn, text, after=2**62))
                if not query.lexemes:
                    continue
                if ids is None:
                    got = index.top(query, K, now)
                    times.append(cpu_ms(lambda q=query: index.top(q, K, now)))
                    if then is not None:
                        segment_times.append(cpu_ms(lambda q=query: segment.top(q, K, None)))
                        before.append(cpu_ms(lambda q=query: then.top(q, K, None)))
                else:
                    got = index.score_ids(ids, query, now, k=K)
                    times.append(cpu_ms(lambda q=query, i=ids: index.score_ids(i, q, now, k=K)))
                    if then is not None:
                        segment_times.append(cpu_ms(lambda q=query, s=local: segment.score_local(s, q)))
                        before.append(cpu_ms(lambda q=query, s=local: then.score_local(s, q)))
                exact += same_top(got, exhaustive(index, query, ids))
            p50, p90 = (round(float(np.percentile(times, p)), 3) for p in (50, 90))
            now_p50, then_p50 = (round(float(np.percentile(t, 50)), 3) if t else "" for t in (segment_times, before))
            out.append([rows, label, length, f"{exact}/{len(times)}", p50, p90, now_p50, then_p50])
        out.append([rows, "index MB", "", "", index.nbytes >> 20, "", "", ""])
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
            table += await measure(dsn, rows, by_length, args.against)
    headers = ["rows", "search", "words", "exact top 10", "CPU p50 ms", "CPU p90 ms"]
    headers += ["segment only: p50 ms", f"{args.against}: p50 ms"]
    print_table(headers, table)
    print(f"{args.queries} queries per length, top {K}; load average {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/scifact"))
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[100_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--hybrid-upto", type=int, default=100_000, help="as bench.text's: which database to read")
    parser.add_argument("--against", help="a git revision whose text_segment.py to time alongside")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
