"""SQL for bulk ingest: one batch written through a staging table.

A batch is copied (binary COPY) into a temporary staging table and moved into ``memory.memories`` by one
``INSERT ... SELECT ... ON CONFLICT`` statement, the same upsert a single Store runs, so both paths agree on what
"created", "updated" and "unchanged" mean.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import asyncpg
import pgvector

from memory_service.models import NewMemory, Vector, WriteContext
from memory_service.storage import columns
from memory_service.storage.memories_sql import UPSERT_TAIL, UPSERT_TAIL_VERSIONED, WRITE_COLUMNS, write_values
from memory_service.storage.versions_sql import UPSERT_KIND, context_values, record

STAGING = "memory_bulk_staging"

# Temporary tables live as long as the session: the pool's reset only rolls back a transaction left open
# (``session.reset_connection``), so each pooled connection creates its staging table once; ON COMMIT DELETE ROWS
# empties it at every commit, and a rolled-back batch leaves nothing behind either. The role that creates it owns it,
# and one pooled connection serves full-access calls (the login role) and scoped ones (the calls roles, which may not
# touch a table they do not own): so the table is granted to every role as it is made. Only its own session can
# read a temporary table, so the grant opens nothing to anyone else. Enums and JSON travel as text: asyncpg has no
# binary COPY encoder for jsonb.
_STAGED = tuple(c for c in columns.WRITTEN if c.name != "embedding_model")
"""What a staging row holds of a write (besides its order and TTL); the model is the batch's, a parameter."""
_STAGED_DEFINITIONS = ",\n    ".join(f"{c.name} {c.staged_type}{'' if c.nullable else ' NOT NULL'}" for c in _STAGED)
_CREATE_STAGING = f"""
DO $staging$
BEGIN
    IF to_regclass('pg_temp.{STAGING}') IS NULL THEN
        CREATE TEMP TABLE {STAGING} (
            ord integer NOT NULL,
            {_STAGED_DEFINITIONS},
            ttl_seconds float8
        ) ON COMMIT DELETE ROWS;
        GRANT SELECT, INSERT, DELETE, TRUNCATE ON pg_temp.{STAGING} TO PUBLIC;
    END IF;
END
$staging$
"""

_STAGING_COLUMNS = ("ord", *(c.name for c in _STAGED), "ttl_seconds")

# Rows go in staging order, which the caller sorts by identity: concurrent loads that touch the same memories
# then lock them in the same order and cannot deadlock.
_INSERT_FROM_STAGING = f"""
INSERT INTO memory.memories AS m ({WRITE_COLUMNS})
SELECT {write_values(lambda c: "$1::text" if c.name == "embedding_model" else c.staged("s"), "s.ttl_seconds")}
FROM pg_temp.{STAGING} s
WHERE memory.embedding_generation_is($2)
ORDER BY s.ord
"""
_UPSERT_FROM_STAGING = _INSERT_FROM_STAGING + UPSERT_TAIL
# With history: the batch's versions and change-log rows are two set-based INSERT ... SELECTs over what the upsert
# returned, in the same statement.
_UPSERT_FROM_STAGING_VERSIONED = f"""
WITH w AS ({_INSERT_FROM_STAGING} {UPSERT_TAIL_VERSIONED}),
{record("w", kind=UPSERT_KIND, changed_at="updated_at", context_params=("$3", "$4", "$5"))}
SELECT id, created FROM w
"""


@dataclasses.dataclass(frozen=True)
class WriteCounts:
    created: int
    updated: int
    unchanged: int


StagingRecord = tuple[object, ...]


def staging_records(
    memories: Sequence[NewMemory], embeddings: Sequence[Vector], others: Sequence[Vector | None] | None = None
) -> list[StagingRecord]:
    """COPY rows for ``memories`` (distinct identities, in the order they are to be written).

    Built apart from ``write_batch`` so the pipeline can do it while the previous batch's transaction runs; vectors
    are wrapped here for the same reason, leaving only their byte encoding to the COPY itself.
    """
    records = []
    for ord_, (m, embedding, other) in enumerate(
        zip(memories, embeddings, others or [None] * len(memories), strict=True)
    ):
        values = columns.written_values(m, embedding, "", other)
        values["embedding"] = pgvector.Vector(embedding)
        values["embedding_alt"] = None if other is None else pgvector.Vector(other)
        values["metadata"] = json.dumps(m.metadata)
        records.append((ord_, *(values[c.name] for c in _STAGED), m.ttl_seconds))
    return records


async def stage(conn: asyncpg.Connection, records: Sequence[StagingRecord]) -> None:
    """Binary COPY of the rows into this connection's staging table, inside the caller's transaction."""
    await conn.execute(_CREATE_STAGING)
    await conn.copy_records_to_table(STAGING, schema_name="pg_temp", columns=_STAGING_COLUMNS, records=records)


async def upsert_staged(
    conn: asyncpg.Connection, staged: int, model: str, *, history: WriteContext | None, generation: int = 0
) -> WriteCounts:
    """Move the ``staged`` rows into memory.memories with one upsert and count the outcomes; ``generation`` is the
    embedding epoch their vectors were made for (a cut-over or rollback since fails the statement)."""
    if history is None:
        returned = await conn.fetch(_UPSERT_FROM_STAGING, model, generation)
    else:
        returned = await conn.fetch(_UPSERT_FROM_STAGING_VERSIONED, model, generation, *context_values(history))
    created = sum(1 for r in returned if r["created"])
    return WriteCounts(created=created, updated=len(returned) - created, unchanged=staged - len(returned))
