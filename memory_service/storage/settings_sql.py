"""The memory.settings table: facts about this database that every instance must agree on."""

from __future__ import annotations

import asyncpg

from memory_service.errors import EmbeddingConfigMismatch

# Serialises first-start binding between instances; its bytes spell "memsvcb".
_BIND_LOCK_KEY = 0x6D656D73766362


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


async def bind_embedding_model(conn: asyncpg.Connection, model: str, dimension: int) -> bool:
    """Record model and dimension on first start and type the embedding column; refuse a different pair later.

    Returns True when this call did the binding. Runs inside the caller's transaction.
    """
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _BIND_LOCK_KEY)
    stored = await read_settings(conn)
    stored_model, stored_dim = stored.get("embedding_model"), stored.get("embedding_dim")
    if stored_model is not None and stored_dim is not None:
        if (stored_model, int(stored_dim)) != (model, dimension):
            raise EmbeddingConfigMismatch(
                f"this database stores embeddings of model {stored_model!r} with dimension {stored_dim}, "
                f"but the server is configured with model {model!r} and dimension {dimension} "
                "(EMBEDDING_MODEL/EMBEDDING_DIM); use the stored pair, or a new database for the new model"
            )
        return False
    # Typmod on the column lets ivfflat index it and makes PostgreSQL reject vectors of another size.
    await conn.execute(f"ALTER TABLE memory.memories ALTER COLUMN embedding TYPE vector({int(dimension)})")
    await write_settings(conn, {"embedding_model": model, "embedding_dim": str(dimension)})
    return True


async def server_versions(conn: asyncpg.Connection) -> tuple[str, str]:
    """(PostgreSQL version, pgvector version)."""
    row = await conn.fetchrow(
        "SELECT current_setting('server_version') AS pg, "
        "(SELECT extversion FROM pg_extension WHERE extname = 'vector') AS vector"
    )
    assert row is not None
    return row["pg"], row["vector"] or ""
