"""An online estimate of the recall callers get: a sample of index searches re-run exactly in the background.

The index's calibration says what recall it reached when it was measured; this says what the searches served
since actually got. A share ``SEARCH_RECALL_SAMPLE`` (1% by default, 0 turns it off) of the searches answered by
the vector index is re-run as an exact scan with the same filter, and recall@10 of the index's nearest candidates
against the exact ones goes into ``memory_search_recall`` (a summary: its ``_sum`` over its ``_count`` in a window
is the mean recall there).

The cost is bounded and kept away from callers: re-runs wait in a short queue and one worker runs them one at a
time, only while the pool has a connection to spare; a full queue or a saturated pool skips the check (and counts it in
``memory_search_recall_checks_skipped_total``). A share of searches alone does not bound it: an exact scan costs
what the table holds (90 ms at 100,000 rows of 384 dimensions), so 1% of 800 searches a second kept one connection
scanning without a pause, a third of the database's CPU on two cores. So the checks also keep to a share of one
connection's time, ``SEARCH_RECALL_BUDGET`` (2% by default): after a check that took d seconds the worker rests
d * (1 / budget - 1), and searches in that time are not drawn. At 100,000 rows that is a check every 4.5 s; at ten
times the rows, every 45 s; on a small table the share of searches is the bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time

from memory_service.errors import MemoryServiceError
from memory_service.metrics import Metrics
from memory_service.models import MemoryFilter, Vector
from memory_service.search.calibration import RECALL_AT
from memory_service.storage import search_sql
from memory_service.storage.database import Database

log = logging.getLogger(__name__)

QUEUE_SIZE = 8
"""Re-runs waiting at most; more are skipped rather than queued."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Check:
    vector: Vector
    memory_filter: MemoryFilter
    got: tuple[int, ...]
    """The ids the index returned as nearest, nearest first (at most RECALL_AT)."""


class RecallCheck:
    def __init__(
        self, db: Database, metrics: Metrics, *, sample: float, budget: float = 1.0, seed: int | None = None
    ) -> None:
        self._db = db
        self._metrics = metrics
        self.sample = sample
        self._rest_factor = 1.0 / budget - 1.0
        self._resting_until = 0.0
        """``time.monotonic()`` before which no search is drawn: the rest that keeps the checks to their budget."""
        self._random = random.Random(seed).random
        self._queue: asyncio.Queue[_Check] = asyncio.Queue(QUEUE_SIZE)
        self._worker: asyncio.Task[None] | None = None
        self._observe = {
            False: metrics.search_recall.labels("false").observe,
            True: metrics.search_recall.labels("true").observe,
        }

    def start(self) -> None:
        if self.sample > 0 and self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="recall check")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    def wanted(self) -> bool:
        """Whether to re-run this index search (drawn at the sample rate; never while the worker is stopped or
        resting)."""
        return self._worker is not None and self._random() < self.sample and time.monotonic() >= self._resting_until

    def offer(self, vector: Vector, memory_filter: MemoryFilter, got: list[int]) -> None:
        """Queue an exact re-run; ``got`` is the index's nearest ids by vector, nearest first. Never waits."""
        if not got:
            return
        try:
            self._queue.put_nowait(_Check(vector, memory_filter, tuple(got[:RECALL_AT])))
        except asyncio.QueueFull:
            self._metrics.search_recall_skipped.inc()

    async def _run(self) -> None:
        while True:
            check = await self._queue.get()
            if self._db.pool_busy():
                self._metrics.search_recall_skipped.inc()
                continue
            started = time.monotonic()
            try:
                recall = await self.measure(check.vector, check.memory_filter, check.got)
            except MemoryServiceError as exc:
                log.debug("recall check skipped: %s", exc)
                recall = None
            if recall is not None:
                self._observe[not check.memory_filter.is_empty](recall)
            await self._rest(time.monotonic() - started)

    async def _rest(self, took: float) -> None:
        """Keep the checks to their budget: a check that took ``took`` seconds is followed by a rest in which no
        search is drawn (those already queued wait for its end)."""
        rest = took * self._rest_factor
        if rest > 0:
            self._resting_until = time.monotonic() + rest
            await asyncio.sleep(rest)

    async def measure(self, vector: Vector, memory_filter: MemoryFilter, got: tuple[int, ...]) -> float | None:
        """Recall of ``got`` against the exact nearest of the same size; None when nothing matches any more."""
        async with self._db.connection() as conn:
            exact = await search_sql.candidates(
                conn, memory_filter, vector=vector, text=None, limit=len(got), exact=True, full_rows=False
            )
        truth = {c.id for c in exact}
        if not truth:
            return None
        return len(truth.intersection(got)) / len(truth)
