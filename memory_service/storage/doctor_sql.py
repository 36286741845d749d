"""What ``memory-service doctor`` reads: versions, extensions, applied migrations, dead tuples. Catalog reads only."""

from __future__ import annotations

import dataclasses

import asyncpg


@dataclasses.dataclass(frozen=True)
class Versions:
    postgres: str
    postgres_num: int
    pgvector: str | None
    pgvector_available: str | None
    """The version ``CREATE EXTENSION vector`` would install, when it is not installed yet."""


async def versions(conn: asyncpg.Connection) -> Versions:
    row = await conn.fetchrow(
        "SELECT current_setting('server_version') AS pg, current_setting('server_version_num')::int AS num, "
        "(SELECT extversion FROM pg_extension WHERE extname = 'vector') AS vector, "
        "(SELECT default_version FROM pg_available_extensions WHERE name = 'vector') AS available"
    )
    return Versions(row["pg"], row["num"], row["vector"], row["available"])


async def applied_migrations(conn: asyncpg.Connection) -> dict[str, str] | None:
    """Applied migration names and checksums; None when the bookkeeping table does not exist yet."""
    if not await conn.fetchval("SELECT to_regclass('memory.schema_migrations') IS NOT NULL"):
        return None
    return {r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM memory.schema_migrations")}


@dataclasses.dataclass(frozen=True)
class TableHealth:
    table: str
    live: int
    dead: int
    last_vacuum: str | None


async def dead_tuples(conn: asyncpg.Connection) -> list[TableHealth]:
    rows = await conn.fetch(
        "SELECT relname, n_live_tup, n_dead_tup, greatest(last_vacuum, last_autovacuum)::text AS vacuumed "
        "FROM pg_stat_user_tables WHERE schemaname = 'memory' ORDER BY n_dead_tup DESC"
    )
    return [TableHealth(r["relname"], r["n_live_tup"], r["n_dead_tup"], r["vacuumed"]) for r in rows]
