"""What a search pays around its SQL: round trips and planning, measured on one connection.

    python -m bench.search_overhead --rows 100000 --queries 1000

Loads the same corpus as ``bench.search`` (and builds the index), then times the unfiltered VECTOR statement at
probes = 1 (cheap, so the overhead shows) on one pooled connection, the variants alternating call by call:

* **transaction**: ``BEGIN READ ONLY; SET LOCAL ivfflat.*`` in one simple query, the statement, ``COMMIT``
  (what a search sent before);
* **session**: ``Database.settings_connection``: the statement alone, the settings sent once per connection;
* **LIMIT $n** / **literal**: the statement with its LIMIT as a parameter or as a literal, under PostgreSQL's
  default plan cache and under ``plan_cache_mode = force_generic_plan``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from bench.harness import database_server, fresh_database, latencies, percentile_ms, print_table
from bench.search import prepare
from memory_service.models import MemoryFilter
from memory_service.storage import search_sql
from memory_service.storage.database import Database
from memory_service.storage.session import begin_statement

SETTINGS = {"ivfflat.probes": "1", "ivfflat.iterative_scan": "relaxed_order"}


def limit_as_parameter(sql: str, values: list[Any], limit: int) -> tuple[str, list[Any]]:
    """The statement as it was: its LIMIT a ``$n`` parameter."""
    return re.sub(rf" LIMIT {limit}\)", f" LIMIT ${len(values) + 1})", sql), [*values, limit]


async def measure(dsn: str, count: int, vectors: Any) -> None:
    db = await Database.connect(dsn, min_size=1, max_size=1)
    literal = search_sql.candidates_statement(
        MemoryFilter(), vector=vectors[0], text=None, limit=10, exact=False, full_rows=True
    )[0]
    parameter = limit_as_parameter(literal, [vectors[0]], 10)[0]

    def statement(sql: str, *, limit_param: bool) -> Callable[[int], Awaitable[object]]:
        async def call(i: int) -> object:
            values: list[Any] = [vectors[i % len(vectors)]] + ([10] if limit_param else [])
            async with db.settings_connection(SETTINGS) as conn:
                return await conn.fetch(sql, *values)

        return call

    async def in_transaction(i: int) -> object:
        async with db.connection() as conn:
            await conn.execute(begin_statement(SETTINGS, readonly=True))
            rows = await conn.fetch(literal, vectors[i % len(vectors)])
            await conn.execute("COMMIT")
            return rows

    rows: list[list[object]] = []
    try:
        trips = await latencies(in_transaction, statement(literal, limit_param=False), count=count)
        rows += [["transaction (BEGIN; SET LOCAL / COMMIT)", "auto", *_stats(trips[0])]]
        rows += [["session settings, one statement", "auto", *_stats(trips[1])]]
        for mode in ("auto", "force_generic_plan"):
            SETTINGS["plan_cache_mode"] = mode
            plans = await latencies(
                statement(parameter, limit_param=True), statement(literal, limit_param=False), count=count
            )
            rows += [["LIMIT $n", mode, *_stats(plans[0])], ["LIMIT literal", mode, *_stats(plans[1])]]
    finally:
        del SETTINGS["plan_cache_mode"]
        await db.close()
    print_table(["statement", "plan_cache_mode", "p50 ms", "p90 ms", "p99 ms"], rows)


def _stats(samples: list[float]) -> list[float]:
    return [percentile_ms(samples, 50), percentile_ms(samples, 90), percentile_ms(samples, 99)]


async def run(rows: int, count: int) -> None:
    with database_server() as server_dsn:
        async with fresh_database(server_dsn) as dsn:
            workload = await prepare(dsn, rows)
            await measure(dsn, count, workload.vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000, help="calls per variant")
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.queries))


if __name__ == "__main__":
    main()
