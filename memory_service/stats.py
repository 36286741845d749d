"""What an operator wants to know about one database at a glance."""

from __future__ import annotations

import dataclasses

from memory_service.models import Scope
from memory_service.search.index_care import IndexCare, IndexState
from memory_service.storage import embedding_cache_sql, stats_sql
from memory_service.storage.database import Database


@dataclasses.dataclass(frozen=True)
class Stats:
    memories: int
    by_scope: dict[Scope, int]
    expired_pending_purge: int
    embedding_model: str
    dimension: int
    postgres_version: str
    pgvector_version: str
    iterative_scan: bool
    index: IndexState
    exact_threshold: int
    target_recall: float
    embedding_cache_entries: int


async def collect(
    db: Database,
    index: IndexCare,
    *,
    embedding_model: str,
    dimension: int,
    postgres_version: str,
    pgvector_version: str,
    iterative_scan: bool,
) -> Stats:
    state = await index.refresh()
    async with db.connection() as conn:
        by_scope = {Scope(k): v for k, v in (await stats_sql.counts_by_scope(conn)).items()}
        expired = await stats_sql.expired_pending(conn)
        cached = await embedding_cache_sql.count(conn)
    return Stats(
        memories=sum(by_scope.values()),
        by_scope=by_scope,
        expired_pending_purge=expired,
        embedding_model=embedding_model,
        dimension=dimension,
        postgres_version=postgres_version,
        pgvector_version=pgvector_version,
        iterative_scan=iterative_scan,
        index=state,
        exact_threshold=index.exact_max_rows,
        target_recall=index.target_recall,
        embedding_cache_entries=cached,
    )
