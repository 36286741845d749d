"""The columns of a memory are declared once (``storage/columns.py``) and every statement derives its list from there;
these tests hold that declaration to the table itself (``memory.memories``, ``memory.memory_versions``) and to the
``Memory`` / ``NewMemory`` dataclasses, so a column added in one place and forgotten in another fails here.
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
# Which HNSW graph holds the row (migration 0013): drawn from a sequence on every insert and rewrite, never a field.
GRAPH = {"graph_seq"}


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
    assert set(_set_list()) - GRAPH == set(written) - IDENTITY - GENERATIONS
    assert "embedding_alt = CASE WHEN m.content_hash = EXCLUDED.content_hash" in memories_sql.UPSERT_TAIL
    assert set(columns.IDENTITY.split(", ")) == IDENTITY
    memory = NewMemory(scope=Scope.GLOBAL, scope_id=1, key="k", value="v", content_hash=b"h")
    assert list(columns.written_values(memory, [0.0], "m")) == [c.name for c in columns.WRITTEN]


def test_unchanged_detection_compares_every_updated_column() -> None:
    tail = memories_sql.UPSERT_TAIL
    where = tail[tail.index("WHERE") : tail.index("RETURNING")]
    old = re.findall(r"\bm\.(\w+)", where)
    new = re.findall(r"\bEXCLUDED\.(\w+)", where)
    assert old == new
    # value is compared through content_hash, which is computed from it; embedding_model follows the embedding
    # generation, which a move of models changes without changing a memory (the vector itself is compared).
    assert set(old) == set(_set_list()) - {"value", "embedding_model"} - GRAPH


def test_bulk_staging_matches_the_write_columns() -> None:
    created = re.findall(r"(?:\(|,)\s*(\w+) [\w\[\]]+(?: NOT NULL)?(?=,|\s*\))", ingest_sql._CREATE_STAGING)
    assert created == list(ingest_sql._STAGING_COLUMNS)
    # Staging carries the order and the relative expiry besides what a write sets.
    # (the model is one parameter for the whole batch).
    assert created == ["ord", *(n for n in _names(memories_sql.WRITE_COLUMNS) if n != "embedding_model"), "ttl_seconds"]
    memory = NewMemory(scope=Scope.GLOBAL, scope_id=1, key="k", value="v", content_hash=b"h")
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
    assert stored - BOOKKEEPING - GENERATIONS - GRAPH == set(_fields(Memory))


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
    assert memory - set(columns.CONTENT) == {"id", "embedding", "version", "updated_at"} | GENERATIONS | GRAPH


async def test_declared_types_and_nullability_are_the_tables(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT a.attname AS name, a.atttypid::regtype::text AS type, NOT a.attnotnull AS nullable "
            "FROM pg_attribute a WHERE a.attrelid = 'memory.memories'::regclass AND a.attnum > 0 "
            "AND NOT a.attisdropped"
        )
        declared = {c.name: await conn.fetchval("SELECT $1::regtype::text", c.type) for c in columns.MEMORY}
    finally:
        await conn.close()
    table = {r["name"]: r for r in rows}
    for name, type_ in declared.items():
        # key is varchar(200) in the table; statements pass it as text, and the length is validated before.
        assert type_ == ("text" if name == "key" else table[name]["type"]), name
        # A write may leave NULL only where the table allows it.
        if columns.BY_NAME[name].nullable:
            assert table[name]["nullable"], name
