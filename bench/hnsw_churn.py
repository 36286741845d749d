"""Whether an HNSW graph that takes its tail by insertion keeps its recall while its rows are rewritten.

    python -m bench.hnsw_churn --rows 30000 --rounds 3 --share 0.5

A graph that takes its tail by insertion (``HNSW_GRAPH_INSERT_ROWS``) is rebuilt only when the table grows by half,
so under rewrites (same row count, new vectors) it keeps every old version's element until VACUUM marks it deleted
and repairs its neighbours' links. ``--rows`` rows of the ``hard`` corpus are copied in and a graph is built up to
their watermark; then, each round, ``--share`` of the rows (drawn at random) get the vectors of fresh rows of the
same distribution and a new ``graph_seq`` (as an upsert gives them), the tail is fed into the graph as index care
does (``index_sql.feed_tail``), and the table is vacuumed. After each round, recall@10 of 200 fresh queries
(never stored rows) against the exact top 10 of the rows as they are, at several ef_search, through the service's
candidates statement; at the end the same after a rebuild over the same rows, and the index's size each time.
"""

from __future__ import annotations

import argparse
import asyncio

import asyncpg
import numpy as np
import numpy.typing as npt

from bench.datasets import corpus, queries, records
from bench.harness import loaded_for_index, print_table
from memory_service.config.settings import DEFAULT_HASH_MODEL
from memory_service.models import MemoryFilter
from memory_service.search.tuning import scan_settings
from memory_service.storage import index_sql, search_sql

EF_SEARCH = (24, 40, 64, 100)
K = 10


def exact_top(vectors: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], query: npt.NDArray[np.float32]) -> set[int]:
    order = np.argpartition(-(vectors @ query), K)[:K]
    return set(ids[order].tolist())


async def recall_at(
    conn: asyncpg.Connection, ef: int, query_vectors: npt.NDArray[np.float32], truth: list[set[int]], w: int
) -> float:
    for name, value in scan_settings("hnsw", ef, iterative=True, limit=K, filtered=False).items():
        await conn.execute(f"SET {name} = '{value}'")
    found = 0
    for vector, expected in zip(query_vectors, truth, strict=True):
        rows = await search_sql.candidates(
            conn, MemoryFilter(), vector=vector, text=None, limit=K, exact=False, full_rows=False, watermark=w
        )
        found += len({c.id for c in rows} & expected)
    return found / (K * len(truth))


async def state(conn: asyncpg.Connection) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    rows = await conn.fetch("SELECT id, embedding FROM memory.memories ORDER BY id")
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    vectors = np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), ids


async def measure(
    conn: asyncpg.Connection, label: str, query_vectors: npt.NDArray[np.float32], w: int, table: list[list[object]]
) -> None:
    vectors, ids = await state(conn)
    truth = [exact_top(vectors, ids, q) for q in query_vectors]
    size = await conn.fetchval(
        "SELECT pg_relation_size(('memory.' || $1)::regclass) / 1048576.0", index_sql.index_name("embedding", "hnsw")
    )
    table.append(
        [label, f"{size:.1f}", *[f"{await recall_at(conn, ef, query_vectors, truth, w):.3f}" for ef in EF_SEARCH]]
    )
    print(table[-1], flush=True)


async def run(args: argparse.Namespace) -> None:
    fresh = args.rows * args.rounds
    data = corpus("hard", args.rows + int(fresh * args.share) + 1)
    rows = records(data, model=DEFAULT_HASH_MODEL)
    query_vectors = queries(data, args.queries)[0]
    rng = np.random.default_rng(3)
    table: list[list[object]] = []
    async with loaded_for_index(rows[: args.rows]) as conn:
        w = await index_sql.next_watermark(conn)
        await index_sql.rebuild(conn, index_sql.IndexSpec("hnsw", watermark=w))
        await conn.execute("VACUUM ANALYZE memory.memories")
        await measure(conn, "built", query_vectors, w, table)
        ids = np.array(await conn.fetchval("SELECT array_agg(id ORDER BY id) FROM memory.memories"))
        spare = iter(range(args.rows, len(data.vectors)))
        for round_ in range(1, args.rounds + 1):
            chosen = rng.choice(ids, size=int(args.share * len(ids)), replace=False)
            updates = [(int(i), data.vectors[next(spare)]) for i in chosen]
            await conn.executemany(
                "UPDATE memory.memories SET embedding = $2, graph_seq = nextval('memory.memories_graph_seq') "
                "WHERE id = $1",
                updates,
            )
            upto = await index_sql.next_watermark(conn)
            while await index_sql.feed_tail(conn, w, rows=200, upto=upto) == 200:
                pass
            await conn.execute("VACUUM memory.memories")
            await measure(
                conn,
                f"round {round_}: {round_ * args.share:.0%} rewritten, fed, vacuumed",
                query_vectors,
                w,
                table,
            )
        await index_sql.rebuild(conn, index_sql.IndexSpec("hnsw", watermark=w))
        await conn.execute("VACUUM ANALYZE memory.memories")
        await measure(conn, "rebuilt over the same rows", query_vectors, w, table)
    print()
    print(f"{args.rows} rows of hard, {args.queries} fresh queries, recall@10 through the candidates statement")
    print_table(["graph", "index MB", *[f"ef_search {ef}" for ef in EF_SEARCH]], table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--queries", type=int, default=200)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
