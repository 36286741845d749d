"""Operator commands. ``reindex`` works on the database directly; ``stats`` and ``search`` ask a running server."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import grpc

from memory_service.app.runtime import Runtime
from memory_service.cli.remote import add_server_flags, failed, read_ca
from memory_service.config.settings import Settings
from memory_service.metrics import Metrics
from memory_service.v1 import memory_pb2


def register(commands: Any) -> None:
    reindex = commands.add_parser(
        "reindex",
        help="(database) rebuild the vector index concurrently when due (or with --force) and calibrate it",
        description="Works on the database directly, not through a server: name it with --database-url "
        "(DATABASE_URL), or --data-dir (MEMORY_SERVICE_DATA_DIR) for an embedded one.",
    )
    reindex.add_argument("--force", action="store_true", help="rebuild even when the index is up to date")
    reindex.add_argument("--database-url", metavar="DSN", help="PostgreSQL DSN (DATABASE_URL)")
    reindex.add_argument(
        "--data-dir", metavar="DIR", help="the embedded PostgreSQL's data dir (MEMORY_SERVICE_DATA_DIR)"
    )
    reindex.set_defaults(run=_reindex, needs_database=True)

    stats = commands.add_parser("stats", help="(server) counts, model, index state and versions, from a server")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_server_flags(stats)
    stats.set_defaults(run=_stats)

    search = commands.add_parser("search", help="(server) search a running server and print the hits")
    search.add_argument("query", help="what to look for")
    search.add_argument("--mode", default="hybrid", choices=("hybrid", "vector", "text"))
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument(
        "--scope", type=_scope, help="restrict to a scope, e.g. agent or agent:42 (global, circle, agent, ...)"
    )
    add_server_flags(search)
    search.set_defaults(run=_search)


def _scope(text: str) -> tuple[str, int | None]:
    from memory_service.client import SCOPES

    name, colon, number = text.partition(":")
    if name.lower() not in SCOPES:
        raise argparse.ArgumentTypeError(f"unknown scope {name!r}; expected one of {', '.join(SCOPES)}")
    if not colon:
        return name.lower(), None
    try:
        scope_id = int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the scope id after ':' must be an integer (got {number!r})") from None
    if scope_id < 0:
        raise argparse.ArgumentTypeError(f"the scope id must not be negative (got {scope_id})")
    return name.lower(), scope_id


def _reindex(settings: Settings, args: argparse.Namespace) -> int:
    async def reindex() -> str:
        runtime = Runtime(settings, Metrics())
        index = await runtime.start_index_care()  # the database and the index care, nothing else
        try:
            return await index.maintain(force=args.force)
        finally:
            await runtime.close()

    print(asyncio.run(reindex()))
    return 0


def _client(args: argparse.Namespace) -> Any:
    from memory_service.client import MemoryClient

    return MemoryClient(args.address, token=args.token, root_certificates=read_ca(args), attempts=2)


def _calibration_report(index: memory_pb2.IndexState) -> dict[str, Any]:
    if not index.HasField("calibration"):
        return {"calibrated_at": None}
    calibration = index.calibration
    name = "ef_search" if index.kind == "hnsw" else "probes"
    report: dict[str, Any] = {
        name: calibration.probes,
        "estimated_recall": round(calibration.recall, 4),
        "calibrated_on": f"{calibration.queries} {calibration.source}",
    }
    if calibration.HasField("filtered_probes"):
        report["filtered_" + name] = calibration.filtered_probes
        report["filtered_estimated_recall"] = round(calibration.filtered_recall, 4)
    report["calibrated_at"] = calibration.calibrated_at.ToDatetime().isoformat()
    report["calibration_seconds"] = calibration.seconds
    return report


def _stats(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> dict[str, Any] | int:
        async with _client(args) as client:
            try:
                stats = await client.stats()
            except grpc.RpcError as error:
                return failed("stats", error)
        return {
            "memories": stats.memories,
            "by_scope": {
                client_scope_name(entry.scope): entry.memories
                for entry in sorted(stats.by_scope, key=lambda e: e.scope)
            },
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
                "built_at": stats.index.built_at.ToDatetime().isoformat() if stats.index.HasField("built_at") else None,
                "exact_search_below_rows": stats.index.exact_threshold,
                "kind": stats.index.kind or None,
                "rows_estimated": stats.index.rows,
                "tail_rows": stats.index.tail_rows,
                "target_recall": stats.index.target_recall,
                **_calibration_report(stats.index),
            },
            "embedding_cache_entries": stats.embedding_cache_entries,
            "counts_estimated": stats.counts_estimated,
            "writes_refused": (
                {
                    "since": stats.writes_refused.since.ToDatetime().isoformat(),
                    "reason": stats.writes_refused.reason,
                    "refused_calls": stats.writes_refused.refused_calls,
                }
                if stats.HasField("writes_refused")
                else None
            ),
        }

    report = asyncio.run(run())
    if isinstance(report, int):
        return report
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


def client_scope_name(value: int) -> str:
    from memory_service.client import SCOPES

    return next((name for name, number in SCOPES.items() if number == value), str(value))


def _search(settings: Settings, args: argparse.Namespace) -> int:
    scope, scope_id = args.scope or (None, None)

    async def run() -> int:
        async with _client(args) as client:
            try:
                response = await client.search(
                    args.query, mode=args.mode, top_k=args.top_k, scope=scope, scope_id=scope_id
                )
            except grpc.RpcError as error:
                return failed("search", error)
        for hit in response.hits:
            print(f"{hit.score:8.4f}  #{hit.memory.id:<8} {hit.memory.value}")
        plan = f"{response.plan}, probes {response.probes}" if response.probes else response.plan
        print(f"({len(response.hits)} hits; {'exact' if response.exact else 'approximate'}; {plan})")
        return 0

    return asyncio.run(run())
