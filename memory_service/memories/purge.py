"""Purging expired memories and old embedding-cache entries, in batches; each instance runs it in the background."""

from __future__ import annotations

import logging
from datetime import timedelta

from memory_service.metrics import Metrics
from memory_service.storage import embedding_cache_sql, memories_sql, usage_sql
from memory_service.storage.database import Database

log = logging.getLogger(__name__)

_PURGE_BATCH = 5000

EMBEDDING_CACHE_RETENTION = timedelta(days=30)
"""How long an embedding-cache entry is kept. The cache saves provider calls for texts seen again soon (a reloaded
file, a retried batch); past a month an entry is more likely dead weight, and evicting a live one costs one call."""


async def purge_expired(db: Database, metrics: Metrics, *, history: bool = True) -> int:
    """Delete expired memories in batches until none are left, each leaving an 'expired' version with history on."""
    total = 0
    while True:
        async with db.transaction() as conn:
            deleted = await memories_sql.purge_expired(conn, batch=_PURGE_BATCH, history=history)
        total += deleted
        metrics.memories_purged.inc(deleted)
        if deleted < _PURGE_BATCH:
            break
    if total:
        log.info("purged %d expired memories", total)
    return total


async def evict_embedding_cache(db: Database, age: timedelta = EMBEDDING_CACHE_RETENTION) -> int:
    """Delete embedding-cache entries older than ``age`` in batches, so the cache stays bounded."""
    total = 0
    while True:
        async with db.transaction() as conn:
            deleted = await embedding_cache_sql.evict_older_than(conn, age, batch=_PURGE_BATCH)
        total += deleted
        if deleted < _PURGE_BATCH:
            break
    if total:
        log.info("evicted %d embedding-cache entries older than %s", total, age)
    return total


async def fold_scope_counts(db: Database) -> int:
    """Fold the per-scope count rows that writes appended (migration 0011) into one per scope, so that summing a
    scope's count stays an index probe of a row or a few."""
    total = 0
    while True:
        async with db.transaction() as conn:
            scopes, rows = await usage_sql.fold(conn, scopes=_PURGE_BATCH)
        total += rows
        if scopes < _PURGE_BATCH:
            return total
