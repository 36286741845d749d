"""The memory.settings table: facts about this database that every instance must agree on."""

from __future__ import annotations

import asyncpg

from memory_service.errors import EmbeddingConfigMismatch

# Serialises binding the embedding model between transactions and instances; its bytes spell "memsvcb".
BIND_LOCK_KEY = 0x6D656D73766362


async def read_settings(conn: asyncpg.Connection) -> dict[str, str]:
    return {r["key"]: r["value"] for r in await conn.fetch("SELECT key, value FROM memory.settings")}


async def write_settings(conn: asyncpg.Connection, values: dict[str, str]) -> None:
    await conn.executemany(
        """
        INSERT INTO memory.settings (key, value) VALUES ($1, $2)
        ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = clock_timestamp()
        """,
        list(values.items()),
    )


async def read_binding(conn: asyncpg.Connection) -> tuple[str, int] | None:
    """The (model, dimension) the database is bound to, or None before its first stored embedding."""
    stored = await read_settings(conn)
    model, dimension = stored.get("embedding_model"), stored.get("embedding_dim")
    return None if model is None or dimension is None else (model, int(dimension))


async def bind_if_unbound(conn: asyncpg.Connection, model: str, dimension: int) -> tuple[tuple[str, int], bool]:
    """The pair the database is bound to, binding it to (model, dimension) first when it has none; and whether
    this call did the binding.

    Runs inside the caller's transaction, before it touches memory.memories: a transaction-level advisory lock
    serialises binders, and the re-read after it (a new snapshot under READ COMMITTED) sees a binding that another
    transaction committed while this one waited. The ALTER takes an exclusive lock on the table until commit.
    """
    stored = await read_binding(conn)
    if stored is None:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", BIND_LOCK_KEY)
        stored = await read_binding(conn)
    if stored is not None:
        return stored, False
    # Typmod on the column lets ivfflat index it and makes PostgreSQL reject vectors of another size.
    # Changing the type resets the column's storage to the type's (EXTERNAL); keep the vectors in the row
    # (migrations/0009_embedding_inline.sql says why).
    await conn.execute(
        f"ALTER TABLE memory.memories ALTER COLUMN embedding TYPE vector({int(dimension)}), "
        "ALTER COLUMN embedding SET STORAGE MAIN"
    )
    await write_settings(conn, {"embedding_model": model, "embedding_dim": str(dimension)})
    return (model, dimension), True


async def bind_embedding_model(conn: asyncpg.Connection, model: str, dimension: int) -> bool:
    """Bind now, for loaders that write rows behind the service's back (benchmarks); refuse a different pair.

    Returns True when this call did the binding. Runs inside the caller's transaction.
    """
    stored, bound = await bind_if_unbound(conn, model, dimension)
    if stored != (model, dimension):
        raise EmbeddingConfigMismatch(
            f"this database stores embeddings of model {stored[0]!r} with dimension {stored[1]}, "
            f"not model {model!r} and dimension {dimension}"
        )
    return bound


async def server_versions(conn: asyncpg.Connection) -> tuple[str, str]:
    """(PostgreSQL version, pgvector version)."""
    row = await conn.fetchrow(
        "SELECT current_setting('server_version') AS pg, "
        "(SELECT extversion FROM pg_extension WHERE extname = 'vector') AS vector"
    )
    assert row is not None
    return row["pg"], row["vector"] or ""
