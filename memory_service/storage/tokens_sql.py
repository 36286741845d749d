"""SQL of the tokens table (migration 0011): create, list, revoke, and the lookup of a presented secret."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

_COLUMNS = (
    "name, scopes, permissions, lease_namespaces, max_memories, rate, created_at, expires_at, revoked_at, last_used_at"
)


async def create(
    conn: asyncpg.Connection,
    *,
    name: str,
    secret_sha256: bytes,
    scopes: list[str],
    permissions: list[str],
    lease_namespaces: list[str],
    max_memories: int | None,
    rate: float | None,
    expires_in: timedelta | None,
) -> bool:
    """Insert a token; False when the name is taken (revoked names stay taken: history names them)."""
    status: str = await conn.execute(
        """
        INSERT INTO memory.tokens
            (name, secret_sha256, scopes, permissions, lease_namespaces, max_memories, rate, expires_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp() + $8::interval)
        ON CONFLICT (name) DO NOTHING
        """,
        name,
        secret_sha256,
        scopes,
        permissions,
        lease_namespaces,
        max_memories,
        rate,
        expires_in,
    )
    return status.endswith(" 1")


async def list_all(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch(f"SELECT {_COLUMNS} FROM memory.tokens ORDER BY name"))


async def revoke(conn: asyncpg.Connection, name: str) -> bool:
    """Mark a token revoked; False when no token has that name. Revoking twice keeps the first time."""
    status: str = await conn.execute(
        "UPDATE memory.tokens SET revoked_at = coalesce(revoked_at, clock_timestamp()) WHERE name = $1", name
    )
    return status.endswith(" 1")


async def lookup(conn: asyncpg.Connection, secret_sha256: bytes) -> asyncpg.Record | None:
    """The live token with this secret hash, stamping its last use (at most once a minute, so a busy token does not
    rewrite its row on every cache refresh), and for a token with a memory quota the memories it counts; None when
    no live token has it."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""
        WITH t AS (
            SELECT {_COLUMNS}, secret_sha256 FROM memory.tokens
            WHERE secret_sha256 = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > clock_timestamp())
        ),
        stamp AS (
            UPDATE memory.tokens SET last_used_at = clock_timestamp()
            WHERE secret_sha256 = $1 AND name = (SELECT name FROM t)
              AND (last_used_at IS NULL OR last_used_at < clock_timestamp() - interval '1 minute')
        )
        SELECT t.*, CASE WHEN t.max_memories IS NOT NULL
                         THEN memory.usage_in(',' || array_to_string(t.scopes, ',') || ',') END AS memories
        FROM t
        """,
        secret_sha256,
    )
    return row


async def any_exist(conn: asyncpg.Connection) -> bool:
    """Whether a token was ever created (revoked ones count: revoking the last one must not turn auth off)."""
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM memory.tokens)"))
