"""Keeps BM25's corpus statistics (document frequencies, corpus size, average length) close to the data.

Counting postings for every query would make broad queries cost as much as the table; instead the statistics are
a snapshot that every instance checks every ``interval`` seconds and one of them refreshes (an advisory lock
decides which) when it is due:

* on a small table, after any write (a refresh there costs well under a second);
* otherwise once ``change_fraction`` of the rows were written since the snapshot, or once it is ``max_age`` old
  and anything was written at all.

So a search ranks with statistics that miss at most ``change_fraction`` of the rows, or at most ``max_age`` plus
one interval of writes. Statistics are corpus-wide, as in Lucene and Elasticsearch: a filter narrows the
candidates, not idf.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import UTC, datetime

from memory_service.storage import stats_sql, text_stats_sql
from memory_service.storage.database import Database
from memory_service.storage.text_stats_sql import Snapshot

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RefreshPolicy:
    small_table_rows: int = 20_000
    """Up to this many memories a refresh follows every write."""
    change_fraction: float = 0.02
    """Share of rows written since the snapshot that makes it due on a large table."""
    max_age: float = 300.0
    """Seconds after which any write makes the snapshot due."""

    def due(self, snapshot: Snapshot | None, writes_now: int, now: datetime, fed_now: int = 0) -> bool:
        """Whether the snapshot should be recomputed, given the table's write counter now (and how many rows were
        fed into an HNSW graph so far, updates of no text: ``stats_sql.FED_ROWS_KEY``)."""
        if snapshot is None:
            return True
        written = writes_now - snapshot.writes_seen
        if written == 0:
            return False
        if written < 0:
            # The statistics collector was reset (or the server restarted after a crash): nothing is known.
            return True
        written -= max(fed_now - snapshot.fed_seen, 0)
        if written <= 0:
            return False
        if snapshot.docs <= self.small_table_rows:
            return True
        if written >= self.change_fraction * snapshot.docs:
            return True
        return (now - snapshot.refreshed_at).total_seconds() >= self.max_age


class TextStats:
    """Refreshes the statistics when they are due, from any instance, one instance at a time."""

    def __init__(self, db: Database, policy: RefreshPolicy | None = None) -> None:
        self._db = db
        self.policy = policy or RefreshPolicy()

    async def maintain(self) -> bool:
        """Refresh if due; True when this call refreshed."""
        async with self._db.connection() as conn:
            snapshot = await text_stats_sql.snapshot(conn)
            writes, fed = await stats_sql.writes_and_fed(conn)
        if not self.policy.due(snapshot, writes, datetime.now(UTC), fed):
            return False
        return await self.refresh()

    async def refresh(self) -> bool:
        """Recompute now; False when another instance was already doing it."""
        started = time.perf_counter()
        # The refresh reads in one statement after the lock: its one snapshot makes idf and the average length agree,
        # and it is taken once no other instance can be refreshing (a repeatable-read snapshot taken before the lock
        # could predate another instance's refresh and fail to serialize against it). Only its short write of what
        # changed draws a transaction id, so the scan does not hold the change feed back.
        async with self._db.transaction() as conn:
            docs = await text_stats_sql.refresh(conn)
        if docs is None:
            return False
        log.debug("text statistics refreshed: %d memories in %.2fs", docs, time.perf_counter() - started)
        return True
