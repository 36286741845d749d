"""What an operator wants to know about one database at a glance.

The counts cost the same at a million memories as at ten thousand: past a small table they are the planner's
estimates (see ``storage.stats_sql``), as fresh as autovacuum's last ANALYZE for the split by scope and as the
table's current size for the total, with small scopes and the expired rows counted exactly up to a cap.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

from memory_service.generations.types import MoveStatus
from memory_service.models import Scope
from memory_service.search.index_care import IndexCare
from memory_service.search.index_policy import IndexState
from memory_service.storage import stats_sql
from memory_service.storage.database import Database
from memory_service.tenants import guard


@dataclasses.dataclass(frozen=True)
class Stats:
    memories: int
    """Live memories: the sum of ``by_scope``."""
    by_scope: dict[Scope, int]
    """Live memories per scope: exact on a small or never-analyzed table, otherwise estimated (small scopes exact)."""
    expired_pending_purge: int
    """Expired memories the purge has not deleted yet: exact up to ``stats_sql.EXACT_BELOW``, estimated beyond."""
    embedding_model: str
    dimension: int
    postgres_version: str
    pgvector_version: str
    iterative_scan: bool
    index: IndexState
    exact_threshold: int
    target_recall: float
    embedding_cache_entries: int
    """Exact on a small or never-analyzed cache, otherwise the planner's estimate."""
    counts_estimated: bool = False
    """Whether any count above is an estimate rather than a count."""
    move: MoveStatus | None = None
    """A move to another embedding model: its phase, backfill and quality gate."""
    writes_refused: WriteRefusal | None = None
    """Set while the database refuses writes, as this instance last saw."""


@dataclasses.dataclass(frozen=True)
class WriteRefusal:
    since: datetime
    reason: str
    refused_calls: int


async def collect(
    db: Database,
    index: IndexCare,
    *,
    embedding_model: str,
    dimension: int,
    postgres_version: str,
    pgvector_version: str,
    iterative_scan: bool,
    move: MoveStatus | None = None,
) -> Stats:
    if not guard.server_wide():
        return await _granted(db, embedding_model=embedding_model, dimension=dimension)
    refusals = db.refusals
    refused = None
    if refusals.since is not None:  # read first: the counts below may fail while writes are refused
        refused = WriteRefusal(since=refusals.since, reason=refusals.reason, refused_calls=refusals.count)
    state = await index.refresh()
    async with db.connection() as conn:
        counts = await stats_sql.counts(conn)
    by_scope = {Scope(k): v for k, v in counts.by_scope.items()}
    return Stats(
        memories=sum(by_scope.values()),
        by_scope=by_scope,
        expired_pending_purge=counts.expired_pending_purge,
        embedding_model=embedding_model,
        dimension=dimension,
        postgres_version=postgres_version,
        pgvector_version=pgvector_version,
        iterative_scan=iterative_scan,
        index=state,
        exact_threshold=index.exact_max_rows,
        target_recall=index.target_recall,
        embedding_cache_entries=counts.embedding_cache_entries,
        counts_estimated=counts.estimated,
        move=move,
        writes_refused=refused,
    )


async def _granted(db: Database, *, embedding_model: str, dimension: int) -> Stats:
    """Stats of a token without admin: its scopes' counts and the model, nothing that spans other tenants."""
    async with db.connection() as conn:
        counts = await stats_sql.granted_counts(conn, every_scope=not guard.scoped())
    by_scope = {Scope(k): v for k, v in counts.items()}
    return Stats(
        memories=sum(by_scope.values()),
        by_scope=by_scope,
        expired_pending_purge=0,
        embedding_model=embedding_model,
        dimension=dimension,
        postgres_version="",
        pgvector_version="",
        iterative_scan=False,
        index=IndexState(),
        exact_threshold=0,
        target_recall=0.0,
        embedding_cache_entries=0,
    )
