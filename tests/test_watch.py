"""Watch through real gRPC: resume with the last cursor misses nothing and repeats nothing, in commit order per
memory, while writers commit concurrently and one transaction commits late with an early log position; and across
two server processes (one writing, one watching) and a restart of the watching one."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict

import asyncpg
import grpc
import numpy as np
from grpc import aio

from memory_service.models import NewMemory, Scope, WriteContext, content_hash
from memory_service.search.text_stats import TextStats
from memory_service.storage import memories_sql
from memory_service.storage.database import Database, init_connection
from memory_service.v1 import memory_pb2, memory_pb2_grpc
from tests.conftest import RunningServer, start_server, test_env
from tests.processes import ServerProcess

WRITERS = 8
OPS_PER_WRITER = 20


def memory(value: str, key: str, scope_id: int = 1) -> memory_pb2.MemoryInput:
    return memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=scope_id, key=key, value=value)


async def write(stub: memory_pb2_grpc.MemoryServiceStub, writer: int) -> None:
    ids: list[int] = []
    for op in range(OPS_PER_WRITER):
        if op % 7 == 6 and ids:
            await stub.Delete(memory_pb2.DeleteRequest(id=ids.pop(0)))
        else:
            stored = await stub.Store(memory_pb2.StoreRequest(memory=memory(f"{writer}-{op}", f"w{writer}-{op % 4}")))
            ids.append(stored.id)


async def logged(dsn: str) -> list[tuple[int, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT memory_id, version FROM memory.changes ORDER BY seq")
    finally:
        await conn.close()
    return [(r["memory_id"], r["version"]) for r in rows]


class Resumer:
    """A watcher that drops its stream after a random number of changes and resumes from its last cursor."""

    def __init__(self, stub: memory_pb2_grpc.MemoryServiceStub, seed: int) -> None:
        self.stub = stub
        self.cursor = ""
        self.received: list[tuple[int, int]] = []
        self.reconnects = 0
        self._random = random.Random(seed)

    async def read_until(self, total: int) -> None:
        while len(self.received) < total:
            await self.read_some(self._random.randint(1, 40), total)

    async def read_some(self, count: int, total: int) -> None:
        call = self.stub.Watch(memory_pb2.WatchRequest(after=self.cursor))
        try:
            for _ in range(count):
                if len(self.received) >= total:
                    return
                change = await asyncio.wait_for(call.read(), timeout=30)
                assert change is not aio.EOF
                self.received.append((change.memory_id, change.version))
                self.cursor = change.cursor
        finally:
            call.cancel()
            self.reconnects += 1


def assert_exactly_once_in_order(received: list[tuple[int, int]], log: list[tuple[int, int]]) -> None:
    assert len(received) == len(set(received)), "a change was delivered twice"
    assert set(received) == set(log), "a change was missed"
    versions: dict[int, list[int]] = defaultdict(list)
    for memory_id, version in received:
        versions[memory_id].append(version)
    for memory_id, seen in versions.items():
        assert seen == sorted(seen), f"memory {memory_id}: versions out of commit order {seen}"


async def test_resumed_watch_is_exactly_once_with_a_late_committing_transaction(
    server: RunningServer, database_url: str
) -> None:
    runtime = server.server.runtime
    # The first stored embedding binds the database to its model (ALTER TABLE), which would wait behind the held
    # transaction below: store one first, as any real writer would have.
    await server.memory.Store(memory_pb2.StoreRequest(memory=memory("binds the model", "first")))
    watcher = Resumer(server.memory, seed=12)
    # A transaction that records a change (drawing its log position) and stays open while later ones commit.
    held = await asyncpg.connect(database_url)
    await init_connection(held)
    late = NewMemory(scope=Scope.AGENT, scope_id=1, key="late", value="committed late", content_hash=content_hash("x"))
    transaction = held.transaction()
    await transaction.start()
    late_id, _ = await memories_sql.upsert(
        held,
        late,
        np.ones(runtime.embedder.dimension, dtype=np.float32),
        runtime.embedder.model,
        history=WriteContext(),
    )
    writers = [asyncio.create_task(write(server.memory, w)) for w in range(WRITERS)]
    expected_floor = WRITERS * OPS_PER_WRITER + 1
    reader = asyncio.create_task(watcher.read_until(expected_floor + 1))
    await asyncio.gather(*writers)
    # Everything after the held transaction's change has committed. Once the feed has probed past all of it, the
    # frontier must still sit before the held change, and the watcher must not have received it.
    late_seq = await held.fetchval("SELECT seq FROM memory.changes WHERE memory_id = $1", late_id)
    last_seq = await runtime.db.run(lambda conn: conn.fetchval("SELECT max(seq) FROM memory.changes"))
    assert last_seq > late_seq
    async with asyncio.timeout(30):
        while runtime.feed.newest_seen < last_seq:
            await asyncio.sleep(0.01)
    assert runtime.feed.frontier < late_seq
    assert late_id not in {memory_id for memory_id, _ in watcher.received}
    await transaction.commit()
    await held.close()
    log = await logged(database_url)
    assert len(log) == expected_floor + 1
    assert log.index((late_id, 1)) < len(log) - 1, "the held change should sit before later ones in the log"
    await asyncio.wait_for(reader, timeout=120)
    assert watcher.reconnects > 3
    assert_exactly_once_in_order(watcher.received, log)
    metrics = server.server.metrics.registry
    assert metrics.get_sample_value("memory_watch_changes_delivered_total") >= len(log)
    for _ in range(100):  # the server notices the last cancellation a moment later
        if metrics.get_sample_value("memory_watch_streams") == 0:
            break
        await asyncio.sleep(0.05)
    assert metrics.get_sample_value("memory_watch_streams") == 0
    assert metrics.get_sample_value("memory_watch_lag_seconds_count") >= len(log)


async def test_one_instance_writes_another_watches_across_a_restart(database_url: str) -> None:
    env = test_env(database_url, WATCH_POLL_INTERVAL="200ms")
    writer_process = ServerProcess(env)
    watcher_process = ServerProcess(env)
    try:
        writer_process.wait_serving()
        watcher_process.wait_serving()
        async with aio.insecure_channel(writer_process.address) as writer_channel:
            writer_stub = memory_pb2_grpc.MemoryServiceStub(writer_channel)
            async with aio.insecure_channel(watcher_process.address) as watcher_channel:
                watcher = Resumer(memory_pb2_grpc.MemoryServiceStub(watcher_channel), seed=3)
                writers = [asyncio.create_task(write(writer_stub, w)) for w in range(4)]
                await watcher.read_some(25, 10_000)
                await asyncio.gather(*writers)
            watcher_process.stop()
            restarted = ServerProcess(env)
            try:
                restarted.wait_serving()
                log = await logged(database_url)
                async with aio.insecure_channel(restarted.address) as channel:
                    watcher.stub = memory_pb2_grpc.MemoryServiceStub(channel)
                    await watcher.read_until(len(log))
            finally:
                restarted.stop()
        assert_exactly_once_in_order(watcher.received, log)
    finally:
        writer_process.stop()
        watcher_process.stop()


async def test_watch_rejects_a_foreign_cursor(server: RunningServer) -> None:
    call = server.memory.Watch(memory_pb2.WatchRequest(after="not-a-cursor"))
    try:
        await call.read()
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    else:
        raise AssertionError("a foreign cursor was accepted")


async def test_shutdown_ends_a_watch_replaying_a_backlog_at_once(database_url: str) -> None:
    """A watcher reading a long backlog gets UNAVAILABLE as shutdown begins, so the drain does not wait out the grace
    period for it (the backlog would take far longer than the grace to replay at this reader's pace)."""
    grace = 20.0
    running = await start_server(test_env(database_url, SHUTDOWN_GRACE=f"{grace:g}s"))
    stopped = False
    try:
        requests = [
            memory_pb2.BulkStoreRequest(
                items=[
                    memory_pb2.BulkItem(sequence=n, memory=memory(f"backlog {n}", f"b{n}"))
                    for n in range(start, start + 1000)
                ]
            )
            for start in (1, 1001, 2001)
        ]
        async for _ in running.memory.BulkStore(iter(requests)):
            pass
        watch = running.memory.Watch(memory_pb2.WatchRequest())
        received = 0

        async def read_slowly() -> grpc.StatusCode:
            nonlocal received
            try:
                while True:
                    change = await watch.read()
                    if change is aio.EOF:
                        return grpc.StatusCode.OK
                    received += 1
                    await asyncio.sleep(0.01)  # 3,000 changes: half a minute, more than the grace
            except grpc.RpcError as error:
                return error.code()  # type: ignore[no-any-return]

        reader = asyncio.create_task(read_slowly())
        while received < 20:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await running.server.stop()
        stopped = True
        took = time.monotonic() - started
        assert await asyncio.wait_for(reader, 30) is grpc.StatusCode.UNAVAILABLE
        assert received < 3000
        assert took / grace < 0.25, f"shutdown took {took:.1f}s of its {grace:g}s grace"
    finally:
        await running.channel.close()
        if not stopped:
            await running.server.stop(grace=1)


async def test_the_text_statistics_refresh_holds_no_transaction_id_while_it_scans(database_url: str) -> None:
    """The feed delivers nothing past a transaction holding an xid; the BM25 refresh scans every live memory (seconds
    on a large table), so it must scan without one and draw it only for its short write."""
    conn = await asyncpg.connect(database_url)
    db = await Database.connect(database_url, min_size=1, max_size=1)
    try:
        await conn.execute(
            """INSERT INTO memory.memories (scope, scope_id, key, value, content_hash)
               SELECT 'agent', 1, 'k' || g, 'note ' || md5(g::text) || ' word' || (g % 997) || ' term' || (g % 31),
                      '\\x00'
               FROM generate_series(1, 40000) g"""
        )
        stats = TextStats(db)
        assert await stats.refresh()  # the first refresh writes every lexeme; the next only what changed
        await conn.execute(
            """INSERT INTO memory.memories (scope, scope_id, key, value, content_hash)
               SELECT 'agent', 2, 'k' || g, 'later ' || md5(g::text), '\\x00' FROM generate_series(1, 50) g"""
        )
        async with db.connection() as pooled:
            pid = pooled.get_server_pid()
        refresh = asyncio.create_task(stats.refresh())
        holding: list[bool] = []  # per sample of a running statement of the refresh: does it hold an xid?
        while not refresh.done():
            row = await conn.fetchrow(
                "SELECT state, backend_xid IS NOT NULL AS xid FROM pg_stat_activity WHERE pid = $1", pid
            )
            if row is not None and row["state"] == "active":
                holding.append(row["xid"])
        assert await refresh
        assert len(holding) >= 20, "the refresh ran too briefly to sample"
        assert sum(holding) / len(holding) < 0.2, f"an xid was held in {sum(holding)} of {len(holding)} samples"
    finally:
        await db.close()
        await conn.close()
