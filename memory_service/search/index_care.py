"""Keeping the ivfflat index worth using: the policy, and the state it decides on.

An ivfflat index built on an empty or small table has poor recall: its list centroids describe data that is no
longer there. Below a row threshold every search is exact and no index is kept; past it, the index is built with
``lists`` fitted to the row count, and rebuilt each time the table has doubled since the last build. Builds run
concurrently with writes, and only one instance builds at a time (``storage.index_sql.rebuild_exclusively``).

The row count the policy watches is the planner's estimate, read from the catalog: checking every minute on every
instance (and on every Stats call) must not scan the table. A rebuild counts exactly, once.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime

from memory_service.storage import index_sql, settings_sql
from memory_service.storage.database import Database

GROWTH_FACTOR = 2.0


def fitted_lists(rows: int) -> int:
    """pgvector's guidance: rows / 1000 up to a million rows, sqrt(rows) beyond."""
    if rows <= 1_000_000:
        return max(10, rows // 1000)
    return int(math.sqrt(rows))


def fitted_probes(lists: int) -> int:
    """Enough lists per query for recall >= 0.95 on clustered data (see docs/benchmarks.md)."""
    return max(1, min(lists, math.ceil(math.sqrt(lists))))


@dataclasses.dataclass(frozen=True)
class IndexState:
    exists: bool = False
    valid: bool = False
    lists: int = 0
    rows: int = 0
    """Rows with an embedding, as the planner estimates them."""
    rows_at_build: int = 0
    built_at: datetime | None = None

    @property
    def usable(self) -> bool:
        return self.exists and self.valid and self.lists > 0


def needs_rebuild(state: IndexState, *, exact_max_rows: int) -> bool:
    """Past the exact-search threshold, build when there is no usable index or the table has doubled since."""
    if state.rows < exact_max_rows:
        return False
    if not state.usable:
        return True
    return state.rows >= GROWTH_FACTOR * max(state.rows_at_build, 1)


class IndexCare:
    def __init__(self, db: Database, dsn: str, *, exact_max_rows: int) -> None:
        self._db = db
        self._dsn = dsn
        self.exact_max_rows = exact_max_rows
        self.state = IndexState()

    async def refresh(self) -> IndexState:
        async with self._db.connection() as conn:
            info = await index_sql.index_info(conn)
            rows = await index_sql.estimated_rows(conn)
            stored = await settings_sql.read_settings(conn)
        built = stored.get("ivfflat_built_at")
        self.state = IndexState(
            exists=info.exists,
            valid=info.valid,
            lists=info.lists,
            rows=rows,
            rows_at_build=int(stored.get("ivfflat_rows_at_build", "0")),
            built_at=datetime.fromisoformat(built) if built else None,
        )
        return self.state

    def needs_rebuild(self, state: IndexState) -> bool:
        return needs_rebuild(state, exact_max_rows=self.exact_max_rows)

    async def maintain(self, *, force: bool = False) -> str:
        """Rebuild when due (or when forced); return what was done, for logs and the CLI."""
        state = await self.refresh()
        if not force and not self.needs_rebuild(state):
            return "up to date" if state.usable else f"exact search ({state.rows} rows < {self.exact_max_rows})"
        rebuilt = await index_sql.rebuild_exclusively(self._dsn, fitted_lists)
        if rebuilt is None:
            return "another instance is rebuilding the index"
        await self.refresh()
        return f"rebuilt with lists={rebuilt.lists} for {rebuilt.rows} rows"
