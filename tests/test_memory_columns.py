"""The columns of a memory are written out in several places for speed and clarity; these tests make them agree.

The definition they are held to is the table itself (``memory.memories``) and the ``Memory`` / ``NewMemory``
dataclasses; a column added in one place and forgotten in another fails here, not in production.
"""

from __future__ import annotations

import dataclasses
import re

import asyncpg

from memory_service.cli import jsonl
from memory_service.models import Memory, NewMemory, Scope
from memory_service.storage import columns, history_sql, ingest_sql, memories_sql

IDENTITY = {"scope", "scope_id", "key"}
# Set by the database, never by a write.
DATABASE_SET = {"id", "created_at", "updated_at"}
# The version counter the upsert bumps (migration 0007): history's bookkeeping, read through History, not a field.
BOOKKEEPING = {"version"}
# The other generation's vector during a move of embedding models (migration 0012): written, never read as a field.
GENERATIONS = {"embedding_alt"}


def _names(columns: str) -> list[str]:
    """Column names of a select or insert list, aliases and ``m.`` prefixes removed."""
    names = []
    for raw in columns.split(","):
        part = raw.strip()
        alias = re.search(r"\bAS\s+(\w+)$", part)
        names.append(alias.group(1) if alias else part.removeprefix("m."))
    return names


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _set_list() -> list[str]:
    return re.findall(r"^\s+(\w+) = EXCLUDED\.\1,?$", memories_sql.UPSERT_TAIL, flags=re.MULTILINE)


def test_reads_return_every_field_of_memory() -> None:
    assert sorted(_names(memories_sql.COLUMNS_WITH_EMBEDDING)) == sorted(_fields(Memory))
    # A version read as a memory has every field but the vector (versions do not keep it), and the version's own.
    read = _names(history_sql.VERSION_COLUMNS)
    assert len(read) == len(set(read))
    assert set(read) >= set(_fields(Memory)) - {"embedding"}


def test_writes_set_every_column_a_client_gives() -> None:
    written = _names(memories_sql.WRITE_COLUMNS)
    assert set(written) - GENERATIONS == set(_fields(Memory)) - DATABASE_SET
    # Everything but the identity is updated on conflict (the other generation's vector only with the content).
    assert set(_set_list()) == set(written) - IDENTITY - GENERATIONS
    assert "embedding_alt = CASE WHEN m.content_hash = EXCLUDED.content_hash" in memories_sql.UPSERT_TAIL


def test_unchanged_detection_compares_every_updated_column() -> None:
    tail = memories_sql.UPSERT_TAIL
    where = tail[tail.index("WHERE") : tail.index("RETURNING")]
    old = re.findall(r"\bm\.(\w+)", where)
    new = re.findall(r"\bEXCLUDED\.(\w+)", where)
    assert old == new
    # value is compared through content_hash, which is computed from it; embedding_model follows the embedding
    # generation, which a move of models changes without changing a memory (the vector itself is compared).
    assert set(old) == set(_set_list()) - {"value", "embedding_model"}


def test_bulk_staging_matches_the_write_columns() -> None:
    created = re.findall(r"^\s{4}(\w+)\s", ingest_sql._CREATE_STAGING, flags=re.MULTILINE)
    assert created == list(ingest_sql._STAGING_COLUMNS)
    # Staging carries the order and the relative expiry; the model is one parameter for the whole batch.
    assert set(created) - {"ord", "ttl_seconds"} == set(_names(memories_sql.WRITE_COLUMNS)) - {"embedding_model"}
    memory = NewMemory(
        scope=Scope.GLOBAL,
        scope_id=1,
        key="k",
        value="v",
        content_hash=b"h",
    )
    [record] = ingest_sql.staging_records([memory], [[0.0]])
    assert len(record) == len(created)


def test_jsonl_fields_are_what_a_client_may_write() -> None:
    assert set(jsonl._FIELDS) == set(_fields(NewMemory)) - {"content_hash"}


async def test_the_table_has_exactly_these_columns(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT column_name, is_generated FROM information_schema.columns "
            "WHERE table_schema = 'memory' AND table_name = 'memories'"
        )
    finally:
        await conn.close()
    stored = {r["column_name"] for r in rows if r["is_generated"] == "NEVER"}
    assert stored - BOOKKEEPING - GENERATIONS == set(_fields(Memory))


async def test_versions_hold_every_content_column(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        memory = {
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'memory' AND table_name = 'memories' AND is_generated = 'NEVER'"
            )
        }
        versions = {
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'memory' AND table_name = 'memory_versions'"
            )
        }
    finally:
        await conn.close()
    # What a memory holds but its versions do not: its id, vectors, version counter and last update (a version has
    # its memory_id, version and changed_at instead).
    assert set(columns.CONTENT) == memory & versions - {"version"}
    assert memory - set(columns.CONTENT) == {"id", "embedding", "version", "updated_at"} | GENERATIONS
