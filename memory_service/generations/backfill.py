"""The re-embedding of stored memories into the other generation: one instance at a time, fenced, resumable.

An instance that has both models of a move tries the lease ``memory-service/model-backfill`` every round; the
holder reads the next batch of memories without the other generation's vector (in id order after its checkpoint),
embeds them, and writes the vectors, the fence check and the checkpoint in one transaction. So:

- a kill -9 of the holder loses at most the batch in flight (rolled back with its connection); the lease expires
  after ``LEASE_TTL`` and the next holder goes on after the last committed checkpoint;
- a paused holder whose lease passed to another cannot write (its fencing token is superseded);
- a memory stored, changed, deleted or erased meanwhile is never overwritten: the write only fills memories still
  holding the content that was embedded and still without a vector (``generations_sql.fill``); writers of both
  generations fill their own rows, and what a writer without the next model leaves empty the next pass finds.

A pass that finds nothing left from the first id on completes the backfill; the index of the other generation is
then built and calibrated by index maintenance, and ``model cutover`` checks completeness again under a lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import UTC, datetime

from memory_service.embeddings.service import EmbeddingService
from memory_service.errors import Aborted, FailedPrecondition, GenerationChanged, MemoryServiceError
from memory_service.generations import gate
from memory_service.generations.state import Generations
from memory_service.generations.types import Backfill
from memory_service.leases.manager import LeaseManager
from memory_service.leases.rules import AcquireSpec
from memory_service.metrics import Metrics
from memory_service.models import Fence, Vector
from memory_service.storage import generations_sql
from memory_service.storage.database import Database
from memory_service.storage.fencing import check_fence

log = logging.getLogger(__name__)

LEASE_NAMESPACE = "memory-service"
LEASE_NAME = "model-backfill"
LEASE_TTL = 10.0
"""Seconds a silent holder keeps the backfill before another instance takes it over."""
GATE_INTERVAL = 300.0
"""Seconds between two measurements of the quality gate by one instance."""
VACUUM_SHARE = 0.05
"""The backfill vacuums the table each time it has rewritten this share of it (and at least VACUUM_MIN_ROWS): each
rewritten memory leaves a dead row version and, in every index, a dead entry that searches read past (ivfflat and
HNSW cannot mark them dead as btree does) until a vacuum. Left to autovacuum (at 20% by default), searches during a
backfill of 100k memories ran 2x slower (docs/benchmarks.md)."""
VACUUM_MIN_ROWS = 2000
_RATE_WEIGHT = 0.3
_Prepared = tuple[list[tuple[int, str, bytes]], list[Vector]]


class BackfillWorker:
    def __init__(
        self,
        db: Database,
        generations: Generations,
        leases: LeaseManager,
        metrics: Metrics,
        *,
        batch: int,
        rate: float,
        instance: str,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self._db = db
        self._generations = generations
        self._leases = leases
        self._metrics = metrics
        self._batch = batch
        self._rate = rate
        self._instance = instance
        self._stopping = stopping or asyncio.Event()
        self._gate_at = 0.0

    async def run(self) -> str:
        """One round: take the lease when free and backfill until done, the lease is lost or the server stops."""
        state = await self._generations.refresh()
        other = self._generations.other
        if state.move is None or other is None:
            return "no move under way" if state.move is None else "this instance lacks the other model"
        async with self._db.connection() as conn:
            _, progress, stored_gate, _ = await generations_sql.read_progress(conn)
        if progress is not None and progress.complete:
            # Writers without the other model may have left memories empty since: look for one.
            async with self._db.connection() as conn:
                left = await generations_sql.pending(conn, after_id=0, limit=1)
            if not left:
                await self._measure_gate(stored_gate is None)
                return "backfill complete"
        acquired = await self._leases.acquire(
            AcquireSpec(namespace=LEASE_NAMESPACE, name=LEASE_NAME, ttl=LEASE_TTL, holder=self._instance),
            owner=LEASE_NAMESPACE,
        )
        if not acquired.acquired or acquired.lease is None:
            holder = acquired.holder.holder if acquired.holder is not None else "another instance"
            return f"the backfill runs on {holder}"
        lease = acquired.lease
        fence = Fence(namespace=LEASE_NAMESPACE, name=LEASE_NAME, token=lease.fencing_token)
        try:
            done = await self._backfill(fence, str(lease.lease_id), progress or Backfill())
        except Aborted as exc:
            return f"backfill stopped: {exc}"
        finally:
            try:
                await self._leases.release(str(lease.lease_id))
            except MemoryServiceError as exc:
                log.warning("the backfill lease is left to expire: %s", exc)
        if done:
            await self._measure_gate(True)
        return "backfill complete" if done else "backfill paused"

    async def _backfill(self, fence: Fence, lease_id: str, progress: Backfill) -> bool:
        """Batches until a pass from the first id finds nothing (True) or the server stops (False).

        The next batch is read and embedded while the one before it is written, as BulkStore overlaps its stages:
        a memory that changes in between is skipped by the write (its content hash no longer matches)."""
        epoch = self._generations.epoch
        renewed = started = last = time.monotonic()
        written_here = unvacuumed = 0
        if progress.after_id == 0 or progress.total == 0:
            progress = await self._new_pass(progress)
        log.info("backfill: %d of %d memories done", progress.done, progress.total)
        ahead: asyncio.Task[_Prepared] | None = None
        try:
            while not self._stopping.is_set():
                other = self._generations.other
                if other is None or self._generations.epoch != epoch:
                    raise GenerationChanged("the embedding generation changed during the backfill")
                if time.monotonic() - renewed > LEASE_TTL / 3:
                    await self._leases.renew(lease_id, LEASE_TTL)
                    renewed = time.monotonic()
                rows, vectors = await (ahead or self._prepare(other, progress.after_id))
                ahead = None
                if not rows:
                    if progress.after_id == 0:
                        async with self._db.connection() as conn:
                            await generations_sql.vacuum(conn)  # the next index is sized from fresh statistics
                        await self._checkpoint(fence, dataclasses.replace(progress, complete=True, rate=0.0))
                        log.info("backfill complete after %d passes", progress.passes + 1)
                        return True
                    progress = await self._new_pass(dataclasses.replace(progress, passes=progress.passes + 1))
                    continue
                ahead = asyncio.create_task(self._prepare(other, rows[-1][0]))
                async with self._db.transaction() as conn:
                    await check_fence(conn, fence)
                    written = await generations_sql.fill(
                        conn, epoch=epoch, ids=[r[0] for r in rows], hashes=[r[2] for r in rows], vectors=vectors
                    )
                    now = time.monotonic()
                    rate = len(rows) / max(now - last, 1e-6)
                    last = now
                    progress = dataclasses.replace(
                        progress,
                        after_id=rows[-1][0],
                        done=min(progress.done + written, progress.total),
                        rate=rate if progress.rate <= 0 else _RATE_WEIGHT * rate + (1 - _RATE_WEIGHT) * progress.rate,
                        updated_at=datetime.now(UTC),
                        holder=self._instance,
                    )
                    await generations_sql.write_backfill(conn, progress)
                self._metrics.model_backfill_written.inc(written)
                written_here += len(rows)
                unvacuumed += written
                if unvacuumed >= max(VACUUM_MIN_ROWS, VACUUM_SHARE * progress.total):
                    async with self._db.connection() as conn:
                        await generations_sql.vacuum(conn)
                    unvacuumed = 0
                if self._rate > 0:
                    # Rate limit: never ahead of rate * elapsed since this holder started.
                    pause = started + written_here / self._rate - time.monotonic()
                    if pause > 0:
                        await asyncio.sleep(pause)
            return False
        finally:
            if ahead is not None:
                ahead.cancel()
                await asyncio.gather(ahead, return_exceptions=True)

    async def _prepare(self, other: EmbeddingService, after_id: int) -> _Prepared:
        """The next batch after ``after_id`` and its vectors of the other generation."""
        async with self._db.connection() as conn:
            rows = await generations_sql.pending(conn, after_id=after_id, limit=self._batch)
        vectors = await other.embed([r[1] for r in rows], [r[2] for r in rows]) if rows else []
        return rows, vectors

    async def _new_pass(self, progress: Backfill) -> Backfill:
        async with self._db.connection() as conn:
            total, missing = await generations_sql.counts(conn)
        return dataclasses.replace(progress, after_id=0, total=total, done=total - missing, complete=False)

    async def _checkpoint(self, fence: Fence, progress: Backfill) -> None:
        async with self._db.transaction() as conn:
            await check_fence(conn, fence)
            await generations_sql.write_backfill(conn, dataclasses.replace(progress, updated_at=datetime.now(UTC)))

    async def _measure_gate(self, due: bool) -> None:
        """Measure the gate when due: at the end of a backfill, then every GATE_INTERVAL with searches seen."""
        generations = self._generations
        other = generations.other
        if other is None or generations.state.move is None:
            return
        if not due and (time.monotonic() - self._gate_at < GATE_INTERVAL or not generations.searches.items):
            return
        self._gate_at = time.monotonic()
        await self.measure_gate()

    async def measure_gate(self) -> None:
        """Measure the quality gate now and store its figures."""
        generations = self._generations
        other = generations.other
        if other is None:
            raise FailedPrecondition("this instance lacks the other generation's model")
        figures = await gate.measure(
            self._db,
            generation=generations.epoch,
            current=generations.current,
            other=other,
            searches=list(generations.searches.items),
        )
        async with self._db.transaction() as conn:
            await generations_sql.write_gate(conn, figures)
        log.info("quality gate: %s", figures)
