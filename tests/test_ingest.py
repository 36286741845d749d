"""BulkStore through real gRPC against real PostgreSQL: acks and counts, idempotent reloads, per-row rejections,
stream-level errors, fencing, a client cancel in the middle of a batch, backpressure, and provider batching."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence

import asyncpg
import grpc
import numpy as np
import pytest
from grpc import aio

from memory_service.embeddings.hashing import HashEmbedder
from memory_service.memories.ingest import BulkIngest, BulkItem, BulkRequest
from memory_service.models import NewMemory, Scope, content_hash
from memory_service.v1 import lease_pb2, memory_pb2
from tests.conftest import RunningServer, code_of, start_server, stop_server, test_env
from tests.fake_openai import FakeOpenAI
from tests.test_leases import acquire_request, eventually


def item(sequence: int, value: str | None = None, *, key: str | None = None, **fields: object) -> memory_pb2.BulkItem:
    memory = memory_pb2.MemoryInput(
        scope=memory_pb2.SCOPE_AGENT,
        scope_id=1,
        key=f"k{sequence:05d}" if key is None else key,
        value=f"memory number {sequence}" if value is None else value,
        **fields,  # type: ignore[arg-type]
    )
    return memory_pb2.BulkItem(sequence=sequence, memory=memory)


def requests(items: Sequence[memory_pb2.BulkItem], size: int) -> list[memory_pb2.BulkStoreRequest]:
    return [memory_pb2.BulkStoreRequest(items=items[i : i + size]) for i in range(0, len(items), size)]


async def bulk(server: RunningServer, messages: Iterable[memory_pb2.BulkStoreRequest]) -> list[memory_pb2.BulkStoreAck]:
    return [ack async for ack in server.memory.BulkStore(iter(list(messages)))]


class Feeder:
    """A request stream the test writes to one message at a time, to interleave sends, acks and other events."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[memory_pb2.BulkStoreRequest | None] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[memory_pb2.BulkStoreRequest]:
        while (message := await self.queue.get()) is not None:
            yield message

    def close(self) -> None:
        """End the request stream; grpc leaves its sending task waiting on it even after the call has ended."""
        self.queue.put_nowait(None)


async def fetch(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def stored(dsn: str) -> dict[str, asyncpg.Record]:
    rows = await fetch(dsn, "SELECT id, key, value, xmin::text AS version, updated_at, expires_at FROM memory.memories")
    return {r["key"]: r for r in rows}


def totals(acks: Sequence[memory_pb2.BulkStoreAck]) -> tuple[int, int, int, int]:
    return (
        sum(a.created for a in acks),
        sum(a.updated for a in acks),
        sum(a.unchanged for a in acks),
        sum(a.rejected for a in acks),
    )


@pytest.fixture
async def small_batches(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(test_env(database_url, BULK_BATCH_ROWS="100"))
    yield running
    await stop_server(running)


def unit_vector(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).normal(size=384)
    return list(vector / np.linalg.norm(vector))


async def test_each_committed_batch_is_acknowledged(small_batches: RunningServer, database_url: str) -> None:
    given = {s: unit_vector(s) for s in range(1, 251) if s % 2 == 0}
    items = [item(s, embedding=given.get(s, [])) for s in range(1, 251)]
    items[-2].memory.ttl.FromSeconds(3600)
    acks = await bulk(small_batches, requests(items, 100))
    assert [a.durable_sequence for a in acks] == [100, 200, 250]
    assert [a.created for a in acks] == [100, 100, 50]
    rows = await stored(database_url)
    assert len(rows) == 250 and rows["k00007"]["value"] == "memory number 7"
    assert rows["k00249"]["expires_at"] is not None and rows["k00250"]["expires_at"] is None
    embedded = {
        r["key"]: np.asarray(r["embedding"])
        for r in await fetch(database_url, "SELECT key, embedding::real[] AS embedding FROM memory.memories")
    }
    np.testing.assert_allclose(embedded["k00002"], given[2], rtol=1e-5)
    expected = HashEmbedder(model="hash-ngram-v1", dimension=384).embed_now(["memory number 3"])[0]
    np.testing.assert_allclose(embedded["k00003"], expected, rtol=1e-5)
    registry = small_batches.server.metrics.registry
    assert registry.get_sample_value("memory_ingest_rows_total", {"outcome": "created"}) == 250


async def test_loading_the_same_rows_again_changes_nothing(small_batches: RunningServer, database_url: str) -> None:
    items = [item(s, embedding=unit_vector(s) if s % 3 == 0 else []) for s in range(1, 301)]
    first = await bulk(small_batches, requests(items, 100))
    assert totals(first) == (300, 0, 0, 0)
    before = await stored(database_url)
    metrics = small_batches.server.metrics.registry
    embedded = metrics.get_sample_value("memory_embedding_texts_total", {"provider": "hash"})
    cache_hits = metrics.get_sample_value("memory_embedding_cache_hits_total")

    again = await bulk(small_batches, requests(items, 70))
    assert totals(again) == (0, 0, 300, 0)
    after = await stored(database_url)
    assert {k: (r["version"], r["updated_at"]) for k, r in after.items()} == {
        k: (r["version"], r["updated_at"]) for k, r in before.items()
    }
    # The stored embeddings were reused: neither the provider nor even the cache was asked.
    assert metrics.get_sample_value("memory_embedding_texts_total", {"provider": "hash"}) == embedded
    assert metrics.get_sample_value("memory_embedding_cache_hits_total") == cache_hits


async def test_invalid_rows_are_rejected_and_the_rest_lands(server: RunningServer, database_url: str) -> None:
    items = [item(s) for s in range(1, 11)]
    items[1].memory.value = ""
    items[3].memory.embedding.extend([0.5] * 3)
    items[4].memory.scope = memory_pb2.SCOPE_UNSPECIFIED
    items[6].memory.importance = 2.0
    items[7].ClearField("memory")
    items[8].memory.embedding.extend([float("nan")] * 384)
    (ack,) = await bulk(server, [memory_pb2.BulkStoreRequest(items=items)])
    assert (ack.durable_sequence, ack.created, ack.rejected) == (10, 4, 6)
    assert [(r.sequence, r.field) for r in ack.rejections] == [
        (2, "memory.value"),
        (4, "memory.embedding"),
        (5, "memory.scope"),
        (7, "memory.importance"),
        (8, "memory"),
        (9, "memory.embedding"),
    ]
    assert "384" in ack.rejections[1].reason
    assert sorted(await stored(database_url)) == ["k00001", "k00003", "k00006", "k00010"]


async def test_rows_whose_vector_pgvector_cannot_measure_are_rejected(server: RunningServer, database_url: str) -> None:
    # Finite and non-zero, but outside the lengths pgvector's single-precision sums keep (as Store refuses them).
    items = [item(s) for s in range(1, 4)]
    items[0].memory.embedding.extend([1e-25] * 384)
    items[2].memory.embedding.extend([1e20] * 384)
    (ack,) = await bulk(server, [memory_pb2.BulkStoreRequest(items=items)])
    assert (ack.durable_sequence, ack.created, ack.rejected) == (3, 1, 2)
    assert [(r.sequence, r.field) for r in ack.rejections] == [(1, "memory.embedding"), (3, "memory.embedding")]
    assert "length" in ack.rejections[0].reason
    assert sorted(await stored(database_url)) == ["k00002"]


async def test_repeated_identity_in_a_batch_keeps_the_last_and_acks_the_others_superseded(
    server: RunningServer, database_url: str
) -> None:
    watch = server.memory.Watch(memory_pb2.WatchRequest(include_memory=True))
    items = [
        item(1, "tea", key="drink"),
        item(2, "coffee", key="drink"),
        item(3, "Alice", key="name"),
        item(4, "Alice", key="name"),
        item(5, "coffee", key="drink"),
    ]
    (ack,) = await bulk(server, [memory_pb2.BulkStoreRequest(items=items)])
    # The earlier items of an identity were never written: superseded, not "updated" without a version.
    assert (ack.created, ack.updated, ack.unchanged, ack.superseded, ack.rejected) == (2, 0, 0, 3, 0)
    rows = await stored(database_url)
    assert {k: r["value"] for k, r in rows.items()} == {"drink": "coffee", "name": "Alice"}
    for key in ("drink", "name"):
        history = await server.memory.History(memory_pb2.HistoryRequest(id=rows[key]["id"]))
        assert [v.memory.value for v in history.versions] == [rows[key]["value"]]
    # In separate batches (each acknowledged before the next is sent) every write is a change of its own.
    feeder = Feeder()
    call = server.memory.BulkStore(feeder.__aiter__())
    for sequence, value in ((1, "water"), (2, "juice")):
        await feeder.queue.put(memory_pb2.BulkStoreRequest(items=[item(sequence, value, key="drink")]))
        separate = await call.read()
        assert (separate.updated, separate.superseded) == (1, 0)
    feeder.close()
    await call.read()
    history = await server.memory.History(memory_pb2.HistoryRequest(id=rows["drink"]["id"]))
    assert [v.memory.value for v in history.versions] == ["juice", "water", "coffee"]
    # Watch saw exactly the versions: no change for a superseded item, one for each written one.
    changes = [await asyncio.wait_for(watch.read(), 30) for _ in range(4)]
    watch.cancel()
    values = [c.memory.value for c in changes]
    assert sorted(values[:2]) == ["Alice", "coffee"] and values[2:] == ["water", "juice"]


async def test_stream_errors_end_the_stream_after_earlier_batches_commit(
    server: RunningServer, database_url: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await bulk(server, [memory_pb2.BulkStoreRequest(items=[memory_pb2.BulkItem(sequence=s) for s in range(1001)])])
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "items" in caught.value.details() and "1000" in caught.value.details()

    feeder = Feeder()
    call = server.memory.BulkStore(feeder.__aiter__())
    await feeder.queue.put(memory_pb2.BulkStoreRequest(items=[item(1), item(2), item(3)]))
    assert (await call.read()).durable_sequence == 3
    await feeder.queue.put(memory_pb2.BulkStoreRequest(items=[item(5), item(4)]))
    with pytest.raises(grpc.RpcError) as caught:
        await call.read()
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("items[1].sequence:")
    feeder.close()
    assert sorted(await stored(database_url)) == ["k00001", "k00002", "k00003"]


async def test_superseded_fence_aborts_the_load(server: RunningServer, database_url: str) -> None:
    first = (await server.leases.Acquire(acquire_request("nightly-sync", holder="a"))).lease
    fence = memory_pb2.Fence(namespace=first.namespace, name=first.name, fencing_token=first.fencing_token)
    feeder = Feeder()
    call = server.memory.BulkStore(feeder.__aiter__())
    await feeder.queue.put(memory_pb2.BulkStoreRequest(items=[item(1), item(2)], fence=fence))
    assert (await call.read()).durable_sequence == 2

    await server.leases.Release(lease_pb2.ReleaseRequest(lease_id=first.lease_id))
    second = (await server.leases.Acquire(acquire_request("nightly-sync", holder="b"))).lease
    assert second.fencing_token > first.fencing_token
    # The fence given once applies to the rest of the stream.
    await feeder.queue.put(memory_pb2.BulkStoreRequest(items=[item(3)]))
    with pytest.raises(grpc.RpcError) as caught:
        await call.read()
    assert code_of(caught.value) == grpc.StatusCode.ABORTED
    assert "newer holder" in caught.value.details()
    feeder.close()
    assert sorted(await stored(database_url)) == ["k00001", "k00002"]


async def _backend_waiting_on_lock(dsn: str) -> bool:
    rows = await fetch(
        dsn,
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    return bool(rows)


async def _not(check: Awaitable[bool]) -> bool:
    return not await check


async def test_client_cancel_mid_batch_keeps_committed_batches_only(
    small_batches: RunningServer, database_url: str
) -> None:
    await small_batches.memory.Store(memory_pb2.StoreRequest(memory=item(150, "before the load").memory))
    blocker = await asyncpg.connect(database_url)
    try:
        # Hold a row of the second batch, so that batch's transaction stops in the middle of its upsert.
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT 1 FROM memory.memories WHERE key = 'k00150' FOR UPDATE")
        feeder = Feeder()
        call = small_batches.memory.BulkStore(feeder.__aiter__())
        for message in requests([item(s) for s in range(1, 201)], 100):
            await feeder.queue.put(message)
        assert (await call.read()).durable_sequence == 100
        await eventually(lambda: _backend_waiting_on_lock(database_url))
        call.cancel()
        feeder.close()
        # The server saw the cancel while the batch waited: it cancelled the statement, so the lock wait ends.
        await eventually(lambda: _not(_backend_waiting_on_lock(database_url)))
        await transaction.rollback()
    finally:
        await blocker.close()

    async def settled() -> bool:
        busy = await fetch(
            database_url,
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND (state LIKE 'idle in transaction%' OR state = 'active')",
        )
        return not busy

    await eventually(settled)
    rows = await stored(database_url)
    assert sorted(rows) == [f"k{s:05d}" for s in range(1, 101)] + ["k00150"]
    assert rows["k00150"]["value"] == "before the load"
    # The server and its pooled connections are fine: the rest loads on a new stream.
    acks = await bulk(small_batches, requests([item(s) for s in range(101, 201)], 100))
    assert totals(acks) == (99, 1, 0, 0)


async def test_a_fast_client_is_held_back_by_a_slow_database(server: RunningServer, database_url: str) -> None:
    runtime = server.server.runtime
    ingest = BulkIngest(
        runtime.db,
        runtime.embedder,
        runtime.binding,
        runtime.metrics,
        batch_rows=10,
        queue_depth=1,
        max_items_per_request=10,
    )
    pulled = 0

    vector = np.full(384, 1 / math.sqrt(384), dtype=np.float32)

    def memory(sequence: int) -> NewMemory:
        value = f"row {sequence}"
        digest = content_hash(value)
        return NewMemory(
            scope=Scope.AGENT, scope_id=1, key=f"r{sequence}", value=value, content_hash=digest, embedding=vector
        )

    async def endless() -> AsyncIterator[BulkRequest]:
        nonlocal pulled
        for request in range(100):
            pulled += 1
            yield BulkRequest(
                items=[BulkItem(sequence=request * 10 + i, memory=memory(request * 10 + i)) for i in range(10)]
            )

    held = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, key="r5", value="held")
    await server.memory.Store(memory_pb2.StoreRequest(memory=held))
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM memory.memories WHERE key = 'r5' FOR UPDATE")
            acks: list[int] = []

            async def consume() -> None:
                async for ack in ingest.run(endless()):
                    acks.append(ack.durable_sequence)

            consumer = asyncio.create_task(consume())
            await eventually(lambda: _backend_waiting_on_lock(database_url))
            # Wait until the pipeline stops pulling, rather than for a fixed time that a slow machine may not fill:
            # a pipeline without bounds only stops once it has pulled all 100 requests, and fails below.
            async with asyncio.timeout(30):
                last = -1
                while pulled != last:
                    last = pulled
                    await asyncio.sleep(0.3)
            # Two batches in their transactions, one queued, one being prepared, one request queued, one being
            # received: nothing more, however long the database takes.
            assert pulled <= 7
        await asyncio.wait_for(consumer, 60)
    finally:
        await blocker.close()
    assert pulled == 100 and acks[-1] == 999
    assert len(await stored(database_url)) == 1000


async def test_one_provider_request_per_provider_batch(database_url: str) -> None:
    with FakeOpenAI() as fake:
        env = test_env(
            database_url,
            EMBEDDING_PROVIDER="openai",
            OPENAI_BASE_URL=fake.base_url,
            EMBEDDING_DIM="384",
            EMBEDDING_BATCH_SIZE="16",
            BULK_BATCH_ROWS="100",
        )
        running = await start_server(env)
        try:
            items = [item(s, f"distinct text {s}") for s in range(1, 251)]
            feeder = Feeder()
            call: aio.StreamStreamCall = running.memory.BulkStore(feeder.__aiter__())
            sent_per_batch = []
            for message in requests(items, 100):
                before = len(fake.requests)
                await feeder.queue.put(message)
                ack = await call.read()
                assert ack.created == len(message.items)
                sent_per_batch.append(len(fake.requests) - before)
            feeder.close()
            assert sent_per_batch == [math.ceil(100 / 16), math.ceil(100 / 16), math.ceil(50 / 16)]
            assert all(len(r["input"]) <= 16 for r in fake.requests)
            assert fake.texts_embedded() == 250

            # Reloading the same content costs no provider request at all.
            before = len(fake.requests)
            assert totals(await bulk(running, requests(items, 100))) == (0, 0, 250, 0)
            assert len(fake.requests) == before
        finally:
            await stop_server(running)
