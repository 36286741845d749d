"""The migration runner: idempotent, safe under concurrency, and strict about edited history."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from memory_service.errors import MigrationError
from memory_service.storage.migrations import apply_migrations, load_migrations, migrations_dir


async def _schema_snapshot(dsn: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT c.relname, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'memory' ORDER BY 1
            """
        )
        return [(r[0], r[1]) for r in rows]
    finally:
        await conn.close()


async def _applied(dsn: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT name, checksum FROM memory.schema_migrations ORDER BY name")
        return [(r[0], r[1]) for r in rows]
    finally:
        await conn.close()


async def test_applies_every_file_then_nothing(empty_database_url: str) -> None:
    names = [m.name for m in load_migrations()]
    assert await apply_migrations(empty_database_url) == names
    before = await _schema_snapshot(empty_database_url)
    applied = await _applied(empty_database_url)

    assert await apply_migrations(empty_database_url) == []
    assert await _schema_snapshot(empty_database_url) == before
    assert await _applied(empty_database_url) == applied
    assert ("memories", "r") in before and ("leases", "r") in before


async def test_concurrent_migrators_apply_each_file_once(empty_database_url: str) -> None:
    # The migrations are not idempotent SQL (CREATE TYPE fails the second time), so a double application
    # would fail one of the runners rather than pass silently.
    results = await asyncio.gather(*(apply_migrations(empty_database_url) for _ in range(4)))
    names = [m.name for m in load_migrations()]
    assert sorted(results, key=len, reverse=True)[0] == names
    assert sum(len(r) for r in results) == len(names)
    assert [name for name, _ in await _applied(empty_database_url)] == names


async def test_edited_applied_migration_is_refused_by_name(empty_database_url: str, tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), copy)
    await apply_migrations(empty_database_url, directory=copy)

    edited = copy / "0002_memories.sql"
    edited.write_text(edited.read_text() + "\n-- a harmless-looking edit\n")
    with pytest.raises(MigrationError) as caught:
        await apply_migrations(empty_database_url, directory=copy)
    assert "0002_memories.sql" in str(caught.value)
    assert "changed after it was applied" in str(caught.value)


async def test_new_file_is_applied_after_existing_ones(empty_database_url: str, tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), copy)
    await apply_migrations(empty_database_url, directory=copy)
    (copy / "9999_extra.sql").write_text("CREATE TABLE memory.extra (id int);")
    assert await apply_migrations(empty_database_url, directory=copy) == ["9999_extra.sql"]


async def test_the_tidy_migration_states_the_rules_in_the_schema(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'") == 0
        assert await conn.fetchval("SELECT to_regclass('memory.memories_memory_type')") is None
        async with conn.transaction():
            with pytest.raises(asyncpg.CheckViolationError, match="leases_name_length"):
                await conn.execute(
                    "INSERT INTO memory.leases (namespace, name, lock_key, lease_id, holder, owner, fencing_token, "
                    "ttl, acquired_at, renewed_at, expires_at) VALUES ('ns', repeat('n', 201), 0, gen_random_uuid(), "
                    "'', '', 0, '1 second', now(), now(), now())"
                )
        async with conn.transaction():
            with pytest.raises(asyncpg.CheckViolationError, match="memories_embedding_model"):
                await conn.execute(
                    "INSERT INTO memory.memories (scope, scope_id, key, value, content_hash, embedding_model) "
                    "VALUES ('global', 0, 'tidy-check', 'v', '\\x00', 'some-model')"
                )
    finally:
        await conn.close()
