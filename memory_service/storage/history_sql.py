"""SQL for reading the past (History, as-of Get and List), erasing, and the retention purge of versions."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from memory_service.history.types import ChangeKind, EraseReceipt, Version
from memory_service.models import Memory, MemoryFilter, WriteContext
from memory_service.storage import columns
from memory_service.storage.command_tag import rows_affected
from memory_service.storage.filters import Params, where_clause
from memory_service.storage.memories_sql import memory_from_row

# A version row read as a memory: the columns memory_from_row expects, and the version's own.
VERSION_COLUMNS = (
    f"m.memory_id AS id, {columns.readable('m')}, m.changed_at AS updated_at, m.version, m.kind::text AS kind, "
    "m.changed_at, m.principal, m.fencing_token, m.request_id"
)

PURGED_THROUGH = "changes_purged_through"
"""memory.settings key: the highest change-log seq the retention purge has deleted."""

# Live at $T: created or updated, and not expired then.
_LIVE_AT = "m.kind IN ('created', 'updated') AND (m.expires_at IS NULL OR m.expires_at > {at})"


def version_from_row(row: asyncpg.Record) -> Version:
    return Version(
        memory=memory_from_row(row),
        version=row["version"],
        kind=ChangeKind(row["kind"]),
        changed_at=row["changed_at"],
        context=WriteContext(
            principal=row["principal"], request_id=row["request_id"], fencing_token=row["fencing_token"]
        ),
    )


async def history_page(conn: asyncpg.Connection, memory_id: int, *, before: int, limit: int) -> list[Version]:
    """Versions of one memory below version ``before``, newest first."""
    rows = await conn.fetch(
        f"SELECT {VERSION_COLUMNS} FROM memory.memory_versions m WHERE m.memory_id = $1 AND m.version < $2 "
        "ORDER BY m.version DESC LIMIT $3",
        memory_id,
        before,
        limit,
    )
    return [version_from_row(row) for row in rows]


async def get_as_of(conn: asyncpg.Connection, memory_id: int, at: datetime) -> Memory | None:
    """The memory as it was live at ``at``, or None when it was not (not yet created, deleted, expired)."""
    row = await conn.fetchrow(
        f"""
        SELECT * FROM (
            SELECT {VERSION_COLUMNS} FROM memory.memory_versions m
            WHERE m.memory_id = $1 AND m.changed_at <= $2 ORDER BY m.version DESC LIMIT 1
        ) m WHERE {_LIVE_AT.format(at="$2")}
        """,
        memory_id,
        at,
    )
    return None if row is None else memory_from_row(row)


async def list_as_of(
    conn: asyncpg.Connection, memory_filter: MemoryFilter, at: datetime, *, after_id: int, limit: int
) -> list[Memory]:
    """One page, in id order, of the memories live at ``at`` that matched the filter then."""
    params = Params(at, after_id)
    # Scope never changes for a memory, so it narrows the versions before the latest one per memory is chosen.
    scopes = where_clause(MemoryFilter(scopes=memory_filter.scopes), params, live_only=False)
    where = where_clause(memory_filter, params, live_only=False)
    rows = await conn.fetch(
        f"""
        SELECT {VERSION_COLUMNS} FROM (
            SELECT DISTINCT ON (m.memory_id) m.* FROM memory.memory_versions m
            WHERE m.changed_at <= $1 AND m.memory_id > $2 AND {scopes}
            ORDER BY m.memory_id, m.version DESC
        ) m
        WHERE {_LIVE_AT.format(at="$1")} AND {where}
        ORDER BY m.memory_id LIMIT {params.add(limit)}
        """,
        *params.values,
    )
    return [memory_from_row(row) for row in rows]


async def erase(conn: asyncpg.Connection, memory_filter: MemoryFilter, memory_id: int | None) -> EraseReceipt:
    """Remove the matching memories, every version of them, their change-log entries and their cached embeddings.

    A memory matches when its live row or any of its versions does. The caller's transaction runs this as two
    statements: the first locks the live rows, so a concurrent write to one waits for the erase instead of adding a
    version the erase's snapshot cannot see; the second (a fresh snapshot) removes everything and logs an
    'erased' change per memory, which carries no content.
    """
    params = Params()
    where = where_clause(memory_filter, params, live_only=False)
    by_id_memories = by_id_versions = ""
    if memory_id is not None:
        placeholder = params.add(memory_id)
        by_id_memories, by_id_versions = f" AND m.id = {placeholder}", f" AND m.memory_id = {placeholder}"
    await conn.execute(
        f"SELECT 1 FROM memory.memories m WHERE {where}{by_id_memories} ORDER BY m.id FOR UPDATE", *params.values
    )
    row = await conn.fetchrow(
        f"""
        WITH t AS (
            SELECT m.memory_id AS id FROM memory.memory_versions m WHERE {where}{by_id_versions}
            UNION
            SELECT m.id FROM memory.memories m WHERE {where}{by_id_memories}
        ),
        dm AS (
            DELETE FROM memory.memories x USING t WHERE x.id = t.id
            RETURNING x.id, x.scope, x.scope_id, x.version, x.content_hash
        ),
        dv AS (
            DELETE FROM memory.memory_versions x USING t WHERE x.memory_id = t.id
            RETURNING x.memory_id AS id, x.scope, x.scope_id, x.version, x.content_hash
        ),
        dc AS (DELETE FROM memory.changes x USING t WHERE x.memory_id = t.id),
        hashes AS (SELECT content_hash FROM dm UNION SELECT content_hash FROM dv),
        de AS (
            DELETE FROM memory.embedding_cache e USING hashes h WHERE e.content_hash = h.content_hash RETURNING 1
        ),
        gone AS (
            SELECT id, scope, scope_id, max(version) + 1 AS version
            FROM (SELECT id, scope, scope_id, version FROM dm UNION ALL SELECT id, scope, scope_id, version FROM dv) g
            GROUP BY id, scope, scope_id
        ),
        logged AS (
            INSERT INTO memory.changes (memory_id, scope, scope_id, kind, version, changed_at)
            SELECT id, scope, scope_id, 'erased', version, clock_timestamp() FROM gone
        )
        SELECT (SELECT coalesce(array_agg(id ORDER BY id), '{{}}') FROM gone) AS ids,
               (SELECT count(*) FROM dv) AS versions,
               (SELECT count(*) FROM de) AS cached,
               clock_timestamp() AS erased_at
        """,
        *params.values,
    )
    assert row is not None
    return EraseReceipt(
        memory_ids=tuple(row["ids"]),
        versions=row["versions"],
        cached_embeddings=row["cached"],
        erased_at=row["erased_at"],
    )


async def purge_history(conn: asyncpg.Connection, retention: timedelta, *, batch: int) -> int:
    """Delete up to ``batch`` versions and change-log entries that ``retention`` no longer covers.

    A version older than the cutoff goes when a later version also predates the cutoff (an as-of read at or after
    the cutoff never reaches it), or when it is a tombstone; a live memory's latest version is always kept.
    """
    versions = await conn.execute(
        """
        DELETE FROM memory.memory_versions WHERE ctid = ANY(ARRAY(
            SELECT v.ctid FROM memory.memory_versions v
            WHERE v.changed_at < clock_timestamp() - $1::interval
              AND (v.kind IN ('deleted', 'expired')
                   OR EXISTS (SELECT 1 FROM memory.memory_versions w
                              WHERE w.memory_id = v.memory_id AND w.version > v.version
                                AND w.changed_at < clock_timestamp() - $1::interval))
            LIMIT $2))
        """,
        retention,
        batch,
    )
    # The log is in about changed_at order: walk it from the oldest seq and stop at the first entry still kept.
    # The highest seq purged is recorded, so Watch can refuse a cursor from before it (PURGED_THROUGH).
    changes: int = await conn.fetchval(
        f"""
        WITH gone AS (
            DELETE FROM memory.changes WHERE seq = ANY(ARRAY(
                SELECT seq FROM (SELECT seq, changed_at FROM memory.changes ORDER BY seq LIMIT $2) oldest
                WHERE changed_at < clock_timestamp() - $1::interval))
            RETURNING seq
        ),
        mark AS (
            INSERT INTO memory.settings (key, value)
            SELECT '{PURGED_THROUGH}', max(seq)::text FROM gone HAVING count(*) > 0
            ON CONFLICT (key) DO UPDATE
            SET value = greatest(memory.settings.value::bigint, EXCLUDED.value::bigint)::text,
                updated_at = clock_timestamp()
        )
        SELECT count(*) FROM gone
        """,
        retention,
        batch,
    )
    return rows_affected(versions) + changes


async def purged_through(conn: asyncpg.Connection) -> int:
    """The highest change-log seq the retention purge has deleted (0: none yet)."""
    value = await conn.fetchval("SELECT value FROM memory.settings WHERE key = $1", PURGED_THROUGH)
    return 0 if value is None else int(value)
