"""Operator commands: reindex and stats work on the database directly; search asks a running server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import grpc

from memory_service.config import Settings
from memory_service.metrics import Metrics
from memory_service.runtime import Runtime

# sysexits.h: the service could not be reached.
EX_UNAVAILABLE = 69


def register(commands: Any) -> None:
    reindex = commands.add_parser(
        "reindex",
        help="rebuild the ivfflat index (concurrently) when the table has outgrown it, or always with --force",
    )
    reindex.add_argument("--force", action="store_true", help="rebuild even when the index is up to date")
    reindex.add_argument("--database-url", metavar="DSN", help="PostgreSQL DSN (DATABASE_URL); unset: embedded")
    reindex.set_defaults(run=_reindex)

    stats = commands.add_parser("stats", help="counts, model, index state and versions of the database")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.add_argument("--database-url", metavar="DSN", help="PostgreSQL DSN (DATABASE_URL); unset: embedded")
    stats.set_defaults(run=_stats)

    search = commands.add_parser("search", help="search a running server and print the hits")
    search.add_argument("query", help="what to look for")
    search.add_argument("--mode", default="hybrid", choices=("hybrid", "vector", "text"))
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--scope", help="restrict to a scope, e.g. agent or agent:42")
    search.add_argument("--address", default=os.environ.get("MEMORY_SERVICE_ADDRESS", "localhost:50051"))
    search.set_defaults(run=_search, client=True)


async def _with_runtime(settings: Settings, work: Any) -> Any:
    runtime = Runtime(settings, Metrics())
    await runtime.start(background=False)
    try:
        return await work(runtime)
    finally:
        await runtime.close()


def _reindex(settings: Settings, args: argparse.Namespace) -> int:
    async def work(runtime: Runtime) -> str:
        return await runtime.index.maintain(force=args.force)

    print(asyncio.run(_with_runtime(settings, work)))
    return 0


def _stats(settings: Settings, args: argparse.Namespace) -> int:
    async def work(runtime: Runtime) -> dict[str, Any]:
        stats = await runtime.stats()
        return {
            "memories": stats.memories,
            "by_scope": {scope.value: count for scope, count in sorted(stats.by_scope.items())},
            "expired_pending_purge": stats.expired_pending_purge,
            "embedding_model": stats.embedding_model,
            "dimension": stats.dimension,
            "postgres": stats.postgres_version,
            "pgvector": stats.pgvector_version,
            "iterative_scan": stats.iterative_scan,
            "index": {
                "exists": stats.index.exists,
                "valid": stats.index.valid,
                "lists": stats.index.lists,
                "rows_at_build": stats.index.rows_at_build,
                "built_at": stats.index.built_at.isoformat() if stats.index.built_at else None,
                "exact_search_below_rows": stats.exact_threshold,
            },
            "embedding_cache_entries": stats.embedding_cache_entries,
        }

    report = asyncio.run(_with_runtime(settings, work))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if isinstance(value, dict):
                for inner, inner_value in value.items():
                    print(f"{key + '.' + inner:<32} {inner_value}")
            else:
                print(f"{key:<32} {value}")
    return 0


def _search(settings: Settings, args: argparse.Namespace) -> int:
    from memory_service.client import MemoryClient

    scope, _, scope_id = (args.scope or "").partition(":")

    async def run() -> int:
        async with MemoryClient(args.address, token=os.environ.get("MEMORY_SERVICE_TOKEN")) as client:
            try:
                response = await client.search(
                    args.query,
                    mode=args.mode,
                    top_k=args.top_k,
                    scope=scope or None,
                    scope_id=int(scope_id) if scope_id else None,
                )
            except grpc.RpcError as error:
                print(f"memory-service: search failed: {error.code().name}: {error.details()}", file=sys.stderr)
                return EX_UNAVAILABLE if error.code() is grpc.StatusCode.UNAVAILABLE else 1
        for hit in response.hits:
            print(f"{hit.score:8.4f}  #{hit.memory.id:<8} {hit.memory.value}")
        plan = f"{response.plan}, probes {response.probes}" if response.probes else response.plan
        print(f"({len(response.hits)} hits; {'exact' if response.exact else 'approximate'}; {plan})")
        return 0

    return asyncio.run(run())
