"""BulkStore that survives a broken stream: the engine under ``MemoryClient.bulk_store`` and ``memory-service ingest``.

A producer task pulls sequence-numbered items from the caller's source into the unacknowledged tail, and pauses
while ``window`` of them are unacknowledged (backpressure on the source; nothing else is buffered). Each stream
attempt sends the tail, then new items as they arrive; every ack drops what became durable. When the stream breaks
(UNAVAILABLE, a server restart, a dropped connection, RESOURCE_EXHAUSTED from an overloaded server, a batch
cancelled by the server's statement_timeout) the engine reconnects with backoff and resends the tail; the server's
upsert by identity makes resending what had in fact committed a no-op.

grpc.aio keeps pulling a failed call's request iterator until its next write fails, so each attempt's iterator
carries an epoch and leaves the tail alone once a newer attempt has started; the source is read only by the
producer, never by a request iterator, so no read is lost or doubled between attempts.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import grpc

from memory_service.v1 import memory_pb2, memory_pb2_grpc

# Codes after which resending the unacknowledged tail is safe and may succeed. CANCELLED and INTERNAL cover a
# server that went away mid-stream (shutdown, reset HTTP/2 stream); the engine itself never cancels a call.
# DEADLINE_EXCEEDED is a batch the server cancelled (its statement_timeout, a lock held too long): the engine sets
# no deadline of its own on the stream, so it is transient, not the caller's budget running out.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
REJECTIONS_KEPT = 1000


def retryable(error: grpc.RpcError) -> bool:
    """RESOURCE_EXHAUSTED means overloaded (retry later) unless a message was too large (retrying cannot help)."""
    code = error.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "larger than" not in (error.details() or "")
    return code in _RETRYABLE


@dataclasses.dataclass
class BulkSummary:
    """Totals over every ack of a load, across resumed streams."""

    sent: int = 0
    """Items taken from the source."""
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    superseded: int = 0
    """Items a later item of the load with the same identity replaced before they were written."""
    rejected: int = 0
    durable_sequence: int = 0
    """Every item up to this sequence number is stored or rejected."""
    rejections: dict[int, str] = dataclasses.field(default_factory=dict)
    """Sequence number -> "field: reason", for the first ``REJECTIONS_KEPT`` rejected items."""

    @property
    def done(self) -> int:
        return self.created + self.updated + self.unchanged + self.superseded + self.rejected

    def reject(self, sequence: int, field: str, reason: str) -> None:
        self.rejected += 1
        if len(self.rejections) < REJECTIONS_KEPT:
            self.rejections[sequence] = f"{field}: {reason}" if field else reason


Entry = memory_pb2.MemoryInput | Mapping[str, Any]


async def numbered(
    items: Iterable[Entry] | AsyncIterable[Entry], convert: Callable[[Mapping[str, Any]], memory_pb2.MemoryInput]
) -> AsyncIterator[memory_pb2.BulkItem]:
    """The caller's items as BulkItems numbered from 1, dicts through ``convert``; sync sources are read in-loop."""

    def item(sequence: int, entry: Entry) -> memory_pb2.BulkItem:
        memory = entry if isinstance(entry, memory_pb2.MemoryInput) else convert(entry)
        return memory_pb2.BulkItem(sequence=sequence, memory=memory)

    if isinstance(items, AsyncIterable):
        sequence = 0
        async for entry in items:
            sequence += 1
            yield item(sequence, entry)
    else:
        for sequence, entry in enumerate(items, 1):
            yield item(sequence, entry)


class BrokenStream(grpc.RpcError):  # type: ignore[misc]
    """The server ended the stream without acknowledging everything: resend the tail."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the server ended the stream before acknowledging every item"


class ResumableBulkStore:
    """One load of ``items`` (strictly increasing sequence numbers) through BulkStore, resumed until done.

    ``run`` returns the summary; it raises the server's ``grpc.RpcError`` when resending cannot help (ABORTED by a
    fence, INVALID_ARGUMENT, authentication, a message too large) and ``TimeoutError`` when the server stays
    unreachable or overloaded for ``retry_timeout`` seconds without acknowledging anything. ``on_ack`` sees every
    ack; ``on_retry(reason, delay)`` is told before each reconnect.
    """

    def __init__(
        self,
        stub: memory_pb2_grpc.MemoryServiceStub,
        items: AsyncIterable[memory_pb2.BulkItem],
        *,
        batch_size: int = 500,
        window: int = 10_000,
        metadata: tuple[tuple[str, str], ...] = (),
        fence: memory_pb2.Fence | None = None,
        retry_timeout: float = 300.0,
        linger: float = 0.05,
        on_ack: Callable[[memory_pb2.BulkStoreAck], None] | None = None,
        on_retry: Callable[[str, float], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size is expected to be at least 1 (got {batch_size})")
        self.summary = BulkSummary()
        self._stub = stub
        self._items = items
        self._batch_size = batch_size
        self._window = max(window, batch_size)
        self._metadata = metadata
        self._fence = fence
        self._retry_timeout = retry_timeout
        self._linger = linger
        self._on_ack = on_ack
        self._on_retry = on_retry
        self._unacked: collections.deque[memory_pb2.BulkItem] = collections.deque()
        self._popped = 0  # items ever dropped from the tail's head: the absolute index of self._unacked[0]
        self._room = asyncio.Event()
        self._arrived = asyncio.Event()
        self._eof = False
        self._epoch = 0

    async def run(self) -> BulkSummary:
        producer = asyncio.create_task(self._produce())
        try:
            return await self._attempts(producer)
        finally:
            producer.cancel()
            self._epoch += 1
            self._arrived.set()  # wake a superseded request iterator so that it ends
            await asyncio.gather(producer, return_exceptions=True)

    async def _attempts(self, producer: asyncio.Task[None]) -> BulkSummary:
        failing_since: float | None = None
        attempt = 0
        while True:
            acked_before = self.summary.done
            try:
                await self._stream(producer)
                return self.summary
            except grpc.RpcError as error:
                if producer.done() and producer.exception() is not None:
                    raise producer.exception() from None  # type: ignore[misc]
                if not retryable(error):
                    raise
                why = f"{error.code().name}: {error.details()}"
            now = time.monotonic()
            if self.summary.done > acked_before or failing_since is None:
                failing_since, attempt = now, 0
            if now - failing_since > self._retry_timeout:
                raise TimeoutError(f"the server stayed unreachable for {self._retry_timeout:.0f}s ({why})")
            delay = min(0.2 * 2**attempt, 5.0) * (0.5 + random.random())
            attempt += 1
            if self._on_retry is not None:
                self._on_retry(why, delay)
            await asyncio.sleep(delay)

    async def _produce(self) -> None:
        last = 0
        try:
            async for item in self._items:
                if item.sequence <= last:
                    raise ValueError(f"sequence numbers must increase (got {item.sequence} after {last})")
                last = item.sequence
                while len(self._unacked) >= self._window:
                    self._room.clear()
                    await self._room.wait()
                self._unacked.append(item)
                self.summary.sent += 1
                self._arrived.set()
            self._eof = True
        finally:
            self._arrived.set()  # also when the source fails: the request iterator ends and run() raises

    async def _stream(self, producer: asyncio.Task[None]) -> None:
        self._epoch += 1
        self._arrived.set()  # a superseded iterator waiting for items wakes up and ends
        call = self._stub.BulkStore(self._requests(self._epoch, producer), metadata=self._metadata)
        async for ack in call:
            self._acknowledge(ack)
        if producer.done() and producer.exception() is not None:
            raise producer.exception()  # type: ignore[misc]
        if self._unacked or not self._eof:
            raise BrokenStream()

    def _acknowledge(self, ack: memory_pb2.BulkStoreAck) -> None:
        while self._unacked and self._unacked[0].sequence <= ack.durable_sequence:
            self._unacked.popleft()
            self._popped += 1
        if len(self._unacked) < self._window:
            self._room.set()
        summary = self.summary
        summary.durable_sequence = max(summary.durable_sequence, ack.durable_sequence)
        summary.created += ack.created
        summary.updated += ack.updated
        summary.unchanged += ack.unchanged
        summary.superseded += ack.superseded
        for rejection in ack.rejections:
            summary.reject(rejection.sequence, rejection.field, rejection.reason)
        if self._on_ack is not None:
            self._on_ack(ack)

    async def _requests(self, epoch: int, producer: asyncio.Task[None]) -> AsyncIterator[memory_pb2.BulkStoreRequest]:
        """The tail, then new items in batches: a full batch at once, a partial one after ``linger`` seconds."""
        position = self._popped  # absolute index of the next item this attempt sends
        flush = False
        while epoch == self._epoch and not (producer.done() and not self._eof):
            position = max(position, self._popped)
            ready = self._popped + len(self._unacked) - position
            if ready >= self._batch_size or (ready and (self._eof or flush)):
                flush = False
                start = position - self._popped
                batch = list(itertools.islice(self._unacked, start, start + self._batch_size))
                position += len(batch)
                yield memory_pb2.BulkStoreRequest(items=batch, fence=self._fence)
                continue
            if self._eof:
                return
            self._arrived.clear()
            if not ready:
                await self._arrived.wait()
                continue
            try:
                async with asyncio.timeout(self._linger):
                    await self._arrived.wait()
            except TimeoutError:
                flush = True
