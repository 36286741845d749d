"""Bulk ingest: one BulkStore stream as a pipeline of receive -> prepare (dedup, embed) -> write -> ack.

The stages run concurrently, so the database upserts batch N while batch N+1 is copied into its staging table,
N+2 is embedded and N+3 received, and they are joined by bounded queues: when the database is the slowest stage
the queues fill, the receiver stops reading, gRPC flow control stops the client, and the server's memory stays
bounded however fast the client sends.

Guarantees a resuming client relies on:

- Each batch is one transaction; its ack is sent only after it committed and names the highest sequence number
  of the batch. Batches commit in stream order, so everything up to an acked sequence is durable (stored or
  rejected), and nothing after it is half-written.
- Writes are upserts by identity, so resending rows that did commit (their ack was lost) changes nothing.
- Within a batch, several rows with one identity collapse to the last, and the earlier ones are acknowledged as
  "superseded": they are never written, so they record no version and no Watch change (counting them "updated"
  would claim a change that History cannot show). Across batches the database applies them in order: each
  batch's upsert starts after the previous commit.
- An invalid row is rejected with its sequence number and the rest of its batch lands. A stream-level error (a
  request too large, a sequence number that does not increase, a superseded fence) first lets the batches before
  it commit, then ends the stream.
- When the server begins shutting down, the stream stops reading requests, commits and acknowledges what it had
  received, and ends with Unavailable at once, so the client resumes elsewhere instead of streaming on into the
  drain's grace period.

The embedding cache is written by the embedder when it computes vectors, just before the batch's transaction
rather than inside it: entries are content-addressed and idempotent, so one whose batch then fails is still
correct and saves the retry its provider call.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from memory_service.embeddings.service import EmbeddingService
from memory_service.errors import InvalidArgument, Unavailable
from memory_service.generations.state import Generations
from memory_service.memories.binding import ModelBinding
from memory_service.memories.writes import Embedded, WritePath
from memory_service.metrics import Metrics
from memory_service.models import NO_CONTEXT, Fence, NewMemory, WriteContext
from memory_service.storage import ingest_sql
from memory_service.storage.database import Connection, Database
from memory_service.tenants import guard

log = logging.getLogger(__name__)

WRITES_IN_FLIGHT = 2
"""Batches in their transactions at once: one stages its rows (binary COPY) while the one before it upserts and
commits. Upserts still run one at a time in stream order, each after the previous batch committed."""

CONVERT_SLICE = 50
"""Items a request converts between yields to the event loop."""

T = TypeVar("T")

LINGER = 0.01
"""Seconds a partial batch waits for more rows before it is written: long enough to fill batches from a client
that streams, short enough that a client waiting for its ack does not notice."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BulkItem:
    """One received item: a validated memory, or the error that rejects it."""

    sequence: int
    memory: NewMemory | InvalidArgument


@dataclasses.dataclass(frozen=True, kw_only=True)
class BulkRequest:
    items: Sequence[BulkItem]
    fence: Fence | None = None
    """Applies to this request's items and, until another is given, to every later request of the stream."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rejection:
    sequence: int
    field: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class BulkAck:
    """Sent after each committed batch; counts are for that batch."""

    durable_sequence: int
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    superseded: int = 0
    """Items a later item of the same identity replaced before the batch was written."""
    rejections: tuple[Rejection, ...] = ()

    @property
    def rejected(self) -> int:
        return len(self.rejections)

    @property
    def rows(self) -> int:
        return self.created + self.updated + self.unchanged + self.superseded + self.rejected


def check_request_size(count: int, limit: int) -> None:
    """Refuse an oversized request before any of it is converted."""
    if count > limit:
        raise InvalidArgument("items", f"holds {count} items; the limit is {limit} per request")


@dataclasses.dataclass
class _End:
    """The end of the stream, or the error that ends it; passed down the pipeline behind the batches before it."""

    error: BaseException | None = None


@dataclasses.dataclass
class _Batch:
    last_sequence: int
    fences: tuple[Fence, ...]
    memories: list[NewMemory]
    """One per distinct identity, sorted by identity."""
    embedded: Embedded
    records: list[ingest_sql.StagingRecord]
    """The staging rows of ``memories`` with the vectors of ``embedded``."""
    rejections: tuple[Rejection, ...]
    superseded: int


_Pending = tuple[BulkItem, Fence | None]


class _Commit:
    """Set when a batch's transaction has ended; ``ok`` says whether it committed."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.ok = False

    async def wait(self) -> None:
        await self.ended.wait()
        if not self.ok:
            raise _PreviousBatchFailed()


class _PreviousBatchFailed(Exception):
    """Never reaches the client: the previous batch's own error is raised first."""


class _InFlight:
    """One stream's share of ``memory_ingest_rows_in_flight``."""

    def __init__(self, metrics: Metrics) -> None:
        self._gauge = metrics.ingest_in_flight
        self.rows = 0

    def received(self, rows: int) -> None:
        self.rows += rows
        self._gauge.inc(rows)

    def done(self, rows: int) -> None:
        rows = min(rows, self.rows)
        self.rows -= rows
        self._gauge.dec(rows)

    def close(self) -> None:
        self.done(self.rows)


class BulkIngest:
    """Runs BulkStore streams; holds no per-stream state, so one instance serves them all."""

    def __init__(
        self,
        db: Database,
        embedder: EmbeddingService,
        binding: ModelBinding,
        metrics: Metrics,
        *,
        batch_rows: int,
        queue_depth: int,
        max_items_per_request: int,
        stopping: asyncio.Event | None = None,
        history: bool = True,
        generations: Generations | None = None,
    ) -> None:
        self._writes = WritePath(db, embedder, binding, history=history, generations=generations)
        self._metrics = metrics
        self._batch_rows = batch_rows
        self._depth = queue_depth
        self._max_items = max_items_per_request
        self._stopping = stopping or asyncio.Event()

    async def items(self, received: Sequence[T], convert: Callable[[T], BulkItem]) -> list[BulkItem]:
        """One request's items converted by ``convert``, refused whole when there are too many to convert."""
        check_request_size(len(received), self._max_items)
        items: list[BulkItem] = []
        for start in range(0, len(received), CONVERT_SLICE):
            if start:
                # Converting a full request takes tens of milliseconds; yielding between slices lets the writer go
                # on with its batch as soon as the database answers.
                await asyncio.sleep(0)
            items.extend(convert(message) for message in received[start : start + CONVERT_SLICE])
        return items

    async def run(
        self, requests: AsyncIterator[BulkRequest], context: WriteContext = NO_CONTEXT
    ) -> AsyncIterator[BulkAck]:
        """Acks in stream order, one per committed batch; raises the error that ends the stream, if any."""
        received: asyncio.Queue[list[_Pending] | _End] = asyncio.Queue(self._depth)
        prepared: asyncio.Queue[_Batch | _End] = asyncio.Queue(self._depth)
        # Rows received and not yet acknowledged, for memory_ingest_rows_in_flight; what is left at the end (rows
        # of batches that never committed) is given back in ``finally``.
        in_flight = _InFlight(self._metrics)
        tasks = [
            asyncio.create_task(self._receive(requests, received, in_flight), name="bulk receive"),
            asyncio.create_task(self._prepare(received, prepared), name="bulk prepare"),
        ]
        writes: collections.deque[asyncio.Task[BulkAck]] = collections.deque()
        previous: _Commit | None = None
        getter: asyncio.Task[_Batch | _End] | None = None
        end: _End | None = None
        rows = batches = 0
        try:
            while end is None or writes:
                if end is None and getter is None and len(writes) < WRITES_IN_FLIGHT:
                    getter = asyncio.create_task(prepared.get())
                waiting = [task for task in (writes[0] if writes else None, getter) if task is not None]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if writes and writes[0].done():
                    ack = writes.popleft().result()  # raises the batch's error, ending the stream
                    rows, batches = rows + ack.rows, batches + 1
                    in_flight.done(ack.rows)
                    yield ack
                elif getter is not None and getter.done():
                    batch, getter = getter.result(), None
                    if isinstance(batch, _End):
                        end = batch
                    else:
                        commit = _Commit()
                        write = self._write(batch, previous, commit, context)
                        writes.append(asyncio.create_task(write, name="bulk write"))
                        previous = commit
            if end.error is not None:
                raise end.error
        finally:
            # Also reached when the client cancels: committed batches stay, those in flight roll back.
            pending = [*tasks, *writes, *([getter] if getter is not None else [])]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            in_flight.close()
            log.info("bulk stream ended after %d rows in %d batches", rows, batches)

    async def _receive(
        self, requests: AsyncIterator[BulkRequest], out: asyncio.Queue[list[_Pending] | _End], in_flight: _InFlight
    ) -> None:
        """Check stream-level rules and hand each request's items on; blocks while the pipeline is full."""
        last = -1
        fence: Fence | None = None
        iterator = aiter(requests)
        try:
            while (request := await self._next_request(iterator)) is not None:
                check_request_size(len(request.items), self._max_items)
                for index, item in enumerate(request.items):
                    if item.sequence <= last:
                        raise InvalidArgument(
                            f"items[{index}].sequence",
                            f"must be greater than the previous item's ({item.sequence} <= {last}); "
                            "sequence numbers strictly increase within a stream",
                        )
                    last = item.sequence
                fence = request.fence or fence
                if request.items:
                    in_flight.received(len(request.items))
                    await out.put([(item, fence) for item in request.items])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await out.put(_End(exc))
            return
        await out.put(_End())

    async def _next_request(self, iterator: AsyncIterator[BulkRequest]) -> BulkRequest | None:
        """The next request, None at the end of the stream; Unavailable once the server is shutting down."""
        if not self._stopping.is_set():
            receive = asyncio.ensure_future(anext(iterator, None))
            stop = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait((receive, stop), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                if not receive.done():
                    receive.cancel()  # never acknowledged, so the client sends it again elsewhere
                    await asyncio.gather(receive, return_exceptions=True)
            if receive.done() and not receive.cancelled():
                return receive.result()
        raise Unavailable(
            "the server is shutting down: every acknowledged item is stored; resume after the last acknowledged "
            "durable_sequence on another instance"
        )

    async def _prepare(self, source: asyncio.Queue[list[_Pending] | _End], out: asyncio.Queue[_Batch | _End]) -> None:
        """Cut the item stream into batches of ``batch_rows`` (or less after LINGER idle), embed, pass on."""
        pending: list[_Pending] = []
        try:
            while True:
                try:
                    async with asyncio.timeout(LINGER if pending else None):
                        entry = await source.get()
                except TimeoutError:
                    await out.put(await self._batch(pending))
                    pending = []
                    continue
                if isinstance(entry, _End):
                    if pending:
                        await out.put(await self._batch(pending))
                    await out.put(entry)
                    return
                pending.extend(entry)
                while len(pending) >= self._batch_rows:
                    batch, pending = pending[: self._batch_rows], pending[self._batch_rows :]
                    await out.put(await self._batch(batch))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await out.put(_End(exc))

    async def _batch(self, items: list[_Pending]) -> _Batch:
        rejections: list[Rejection] = []
        latest: dict[tuple[str, int, str], NewMemory] = {}
        superseded = 0
        for item, _ in items:
            memory = item.memory
            if isinstance(memory, InvalidArgument):
                rejections.append(Rejection(sequence=item.sequence, field=memory.field, reason=memory.message))
                continue
            if not guard.sees(memory.scope, memory.scope_id):
                reason = f"scope {memory.scope.value}:{memory.scope_id} is outside this token's grants"
                rejections.append(Rejection(sequence=item.sequence, field="memory.scope", reason=reason))
                continue
            identity = (memory.scope.value, memory.scope_id, memory.key)
            superseded += identity in latest
            latest[identity] = memory
        memories = [latest[identity] for identity in sorted(latest)]
        embedded = await self._writes.embeddings(memories)
        return _Batch(
            last_sequence=items[-1][0].sequence,
            fences=tuple(dict.fromkeys(fence for item, fence in items if fence is not None)),
            memories=memories,
            embedded=embedded,
            records=ingest_sql.staging_records(memories, embedded.vectors, embedded.others),
            rejections=tuple(rejections),
            superseded=superseded,
        )

    async def _write(self, batch: _Batch, previous: _Commit | None, commit: _Commit, context: WriteContext) -> BulkAck:
        """One batch's transaction; its upsert waits until ``previous`` has committed, so the last write wins."""
        counts = ingest_sql.WriteCounts(0, 0, 0)
        try:
            if batch.records:
                history = self._writes.versions(context, batch.fences)

                async def upsert(conn: Connection, embedded: Embedded) -> ingest_sql.WriteCounts:
                    if embedded is not batch.embedded:  # embedded anew for another generation
                        batch.embedded = embedded
                        batch.records = ingest_sql.staging_records(batch.memories, embedded.vectors, embedded.others)
                    await ingest_sql.stage(conn, batch.records)
                    if previous is not None:
                        await previous.wait()
                    return await ingest_sql.upsert_staged(
                        conn, len(batch.records), embedded.model, history=history, generation=embedded.generation
                    )

                counts = await self._writes.write(batch.memories, batch.embedded, batch.fences, upsert)
            elif previous is not None:
                await previous.wait()  # its ack vouches for every batch before it
            commit.ok = True
        finally:
            commit.ended.set()
        ack = BulkAck(
            durable_sequence=batch.last_sequence,
            created=counts.created,
            updated=counts.updated,
            unchanged=counts.unchanged,
            superseded=batch.superseded,
            rejections=batch.rejections,
        )
        for outcome, count in (
            ("created", ack.created),
            ("updated", ack.updated),
            ("unchanged", ack.unchanged),
            ("superseded", ack.superseded),
            ("rejected", ack.rejected),
        ):
            if count:
                self._metrics.ingest_rows.labels(outcome).inc(count)
        return ack
