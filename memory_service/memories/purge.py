"""Purging expired memories and old embedding-cache entries, in batches; each instance runs it in the background."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from memory_service.metrics import Metrics
from memory_service.storage import embedding_cache_sql, memories_sql, usage_sql
from memory_service.storage.database import Connection, Database

log = logging.getLogger(__name__)

PURGE_BATCH = 5000

EMBEDDING_CACHE_RETENTION = timedelta(days=30)
"""How long an embedding-cache entry is kept. The cache saves provider calls for texts seen again soon (a reloaded
file, a retried batch); past a month an entry is more likely dead weight, and evicting a live one costs one call."""


async def in_batches(
    db: Database, delete: Callable[[Connection, int], Awaitable[int]], *, counted: Callable[[int], object] | None = None
) -> int:
    """Run ``delete(conn, batch)`` in its own transaction until it deletes less than a batch; return the total.

    Short transactions hold few locks and let other writers and the change feed through between batches.
    ``counted`` is told each batch's count as it commits (a metric).
    """
    total = 0
    while True:
        async with db.transaction() as conn:
            deleted = await delete(conn, PURGE_BATCH)
        total += deleted
        if counted is not None:
            counted(deleted)
        if deleted < PURGE_BATCH:
            return total


async def purge_expired(db: Database, metrics: Metrics, *, history: bool = True) -> int:
    """Delete expired memories in batches until none are left, each leaving an 'expired' version with history on."""

    async def delete(conn: Connection, batch: int) -> int:
        return await memories_sql.purge_expired(conn, batch=batch, history=history)

    total = await in_batches(db, delete, counted=metrics.memories_purged.inc)
    if total:
        log.info("purged %d expired memories", total)
    return total


async def evict_embedding_cache(db: Database, age: timedelta = EMBEDDING_CACHE_RETENTION) -> int:
    """Delete embedding-cache entries older than ``age`` in batches, so the cache stays bounded."""

    async def delete(conn: Connection, batch: int) -> int:
        return await embedding_cache_sql.evict_older_than(conn, age, batch=batch)

    total = await in_batches(db, delete)
    if total:
        log.info("evicted %d embedding-cache entries older than %s", total, age)
    return total


async def fold_scope_counts(db: Database) -> int:
    """Fold the per-scope count rows that writes appended (migration 0011) into one per scope, so that summing a
    scope's count stays an index probe of a row or a few."""
    total = 0
    while True:
        async with db.transaction() as conn:
            scopes, rows = await usage_sql.fold(conn, scopes=PURGE_BATCH)
        total += rows
        if scopes < PURGE_BATCH:
            return total
