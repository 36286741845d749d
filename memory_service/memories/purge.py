"""Purging expired memories and old embedding-cache entries, in batches; each instance runs it in the background."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from datetime import timedelta

from memory_service.metrics import Metrics
from memory_service.storage import embedding_cache_sql, memories_sql, usage_sql
from memory_service.storage.database import Connection, Database
from memory_service.tenants.types import ScopeGrant

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


QUOTA_FOLD_INTERVAL = 2.0
"""Seconds between folds of the scopes of quota-bound tokens. A quota check sums its scopes' rows, one per writing
statement since the last fold: 1,000 rows cost 0.4 ms, 60,000 (a minute of PURGE_INTERVAL at 1,000 statements a
second) 23 ms, on every write. With nothing to fold, no statement is sent."""


async def fold_quota_scopes(db: Database, grants: Collection[ScopeGrant]) -> int:
    """Fold the count rows of the scopes ``grants`` cover (the quota-bound tokens this instance served lately);
    returns the rows folded."""
    if not grants:
        return 0
    if any(g.scope is None for g in grants):
        return await fold_scope_counts(db)
    pairs = sorted({(g.scope.value, g.scope_id) for g in grants if g.scope is not None and g.scope_id is not None})
    kinds = sorted({g.scope.value for g in grants if g.scope is not None and g.scope_id is None})
    async with db.transaction() as conn:
        _, rows = await usage_sql.fold_scopes(conn, pairs, kinds)
    return rows


def quota_folder(db: Database, grants: Callable[[], Collection[ScopeGrant]]) -> Callable[[], Awaitable[int]]:
    """The background step: fold the scopes ``grants()`` names at the time."""

    async def fold() -> int:
        return await fold_quota_scopes(db, grants())

    return fold
