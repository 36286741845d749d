"""The server process's life: start on the embedded PostgreSQL, drain on SIGTERM, exit 0, find its data again."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory_service.v1 import memory_pb2, memory_pb2_grpc
from tests.conftest import start_server, stop_server, test_env
from tests.processes import ServerProcess


def note(value: str) -> memory_pb2.StoreRequest:
    return memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value=value))


async def _wait_for_lock_waiters(conn: asyncpg.Connection, count: int = 1) -> None:
    """Until ``count`` backends of this database wait on a lock: calls that are in flight, held in PostgreSQL."""
    async with asyncio.timeout(30):
        while True:
            # Inside a transaction pg_stat_activity answers from a snapshot taken at its first read; drop it.
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            if waiting >= count:
                return
            await asyncio.sleep(0.05)


async def test_sigterm_drains_in_flight_call_then_exits_zero(database_url: str) -> None:
    process = ServerProcess(test_env(database_url, SHUTDOWN_GRACE="30s"))
    try:
        await asyncio.to_thread(process.wait_serving)
        blocker = await asyncpg.connect(database_url)
        async with aio.insecure_channel(process.address) as channel:
            memory = memory_pb2_grpc.MemoryServiceStub(channel)
            await memory.Store(note("warm up"), timeout=30)
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="memory_service.v1.MemoryService"))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            # Hold a lock that makes the next Store wait inside PostgreSQL: a slow call, started before SIGTERM.
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute("LOCK TABLE memory.memories IN EXCLUSIVE MODE")
            slow = asyncio.ensure_future(memory.Store(note("written during shutdown"), timeout=60))
            await _wait_for_lock_waiters(blocker)

            process.terminate()
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            assert not slow.done()
            await transaction.commit()
            response = await slow
            assert response.outcome == memory_pb2.WRITE_OUTCOME_CREATED
        assert await asyncio.to_thread(process.wait, 60) == 0
        stored = await blocker.fetchval("SELECT count(*) FROM memory.memories WHERE value = 'written during shutdown'")
        await blocker.close()
        assert stored == 1
        assert any("draining in-flight calls" in line for line in process.log)
    finally:
        process.stop()


async def test_new_calls_are_refused_after_shutdown(database_url: str) -> None:
    process = ServerProcess(test_env(database_url))
    try:
        await asyncio.to_thread(process.wait_serving)
        process.terminate()
        assert await asyncio.to_thread(process.wait, 60) == 0
        async with aio.insecure_channel(process.address) as channel:
            try:
                await memory_pb2_grpc.MemoryServiceStub(channel).Stats(memory_pb2.StatsRequest(), timeout=2)
                raise AssertionError("a stopped server answered")
            except grpc.RpcError as error:
                assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        process.stop()


async def test_embedded_database_keeps_data_across_restarts(tmp_path: Path) -> None:
    env = {
        "MEMORY_SERVICE_DATA_DIR": str(tmp_path / "data"),
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": "0",
        "METRICS_PORT": "off",
        "DATABASE_URL": "",
    }
    first = ServerProcess(env)
    try:
        await asyncio.to_thread(first.wait_serving)
        async with aio.insecure_channel(first.address) as channel:
            stored = await memory_pb2_grpc.MemoryServiceStub(channel).Store(note("remember me"), timeout=30)
        first.terminate()
        assert await asyncio.to_thread(first.wait, 60) == 0
    finally:
        first.stop()
    assert any("using the embedded PostgreSQL" in line for line in first.log)
    assert (tmp_path / "data" / "pgdata" / "PG_VERSION").exists()

    second = ServerProcess(env)
    try:
        await asyncio.to_thread(second.wait_serving)
        async with aio.insecure_channel(second.address) as channel:
            got = await memory_pb2_grpc.MemoryServiceStub(channel).Get(memory_pb2.GetRequest(id=stored.id), timeout=30)
        assert got.memory.value == "remember me"
        assert any("migrations: up to date" in line for line in second.log)
        second.terminate()
        assert await asyncio.to_thread(second.wait, 60) == 0
    finally:
        second.stop()

    # Bound to the hash embedder's 384 dimensions by the first Store: another dimension is refused with one line
    # that says where the data is and how to start over.
    refused = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "memory_service", "serve"],
        env={**os.environ, **env, "EMBEDDING_DIM": "256", "LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    data_dir = str((tmp_path / "data").resolve())
    assert f"the embedded database in {data_dir} (MEMORY_SERVICE_DATA_DIR)" in line
    assert "stores embeddings of model 'hash-ngram-v1' with dimension 384" in line
    assert "set MEMORY_SERVICE_DATA_DIR to a new directory" in line


async def test_calls_past_the_concurrency_limit_are_refused_not_queued(database_url: str) -> None:
    running = await start_server(test_env(database_url, GRPC_MAX_CONCURRENT_RPCS="2"))
    blocker = await asyncpg.connect(database_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE memory.memories IN EXCLUSIVE MODE")
        slow = [asyncio.ensure_future(running.memory.Store(note(f"slow {i}"), timeout=30)) for i in range(2)]
        await _wait_for_lock_waiters(blocker, 2)
        try:
            await running.memory.Stats(memory_pb2.StatsRequest(), timeout=10)
            raise AssertionError("a call past the limit was served")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await transaction.commit()
        assert [r.outcome for r in await asyncio.gather(*slow)] == [memory_pb2.WRITE_OUTCOME_CREATED] * 2
    finally:
        await blocker.close()
        await stop_server(running)


async def test_sigterm_ends_an_open_bulk_store_at_once_with_every_acked_row_stored(database_url: str) -> None:
    """The stream stops taking batches, commits what it has, and ends UNAVAILABLE well before the grace."""
    grace = 120
    process = ServerProcess(test_env(database_url, SHUTDOWN_GRACE=f"{grace}s"))
    try:
        await asyncio.to_thread(process.wait_serving)
        acked = 0
        sent = 0
        terminated = False

        async def requests() -> AsyncIterator[memory_pb2.BulkStoreRequest]:
            nonlocal sent
            while True:  # a client that would stream forever
                if terminated:
                    # Keep the stream open but stop writing: a write racing the server's close fails inside
                    # grpc.aio's client as INTERNAL ("Internal error from Core") before the server's status
                    # arrives, which would hide the status this test is about.
                    await asyncio.Event().wait()
                items = [
                    memory_pb2.BulkItem(
                        sequence=sent + i + 1,
                        memory=memory_pb2.MemoryInput(
                            scope=memory_pb2.SCOPE_AGENT, scope_id=3, value=f"bulk row {sent + i + 1}"
                        ),
                    )
                    for i in range(20)
                ]
                sent += len(items)
                yield memory_pb2.BulkStoreRequest(items=items)
                await asyncio.sleep(0.02)

        async with aio.insecure_channel(process.address) as channel:
            call = memory_pb2_grpc.MemoryServiceStub(channel).BulkStore(requests())
            with pytest.raises(grpc.RpcError) as caught:
                async for ack in call:
                    assert not ack.rejections
                    acked = ack.durable_sequence
                    if acked >= 200 and process.process.poll() is None and not terminated:
                        process.terminate()
                        terminated = True
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value  # type: ignore[attr-defined]
            assert "shutting down" in (caught.value.details() or "")  # type: ignore[attr-defined]
        # Exits well before the grace: waiting longer than half of it fails the test.
        assert await asyncio.to_thread(process.wait, grace / 2) == 0
        conn = await asyncpg.connect(database_url)
        try:
            values = [f"bulk row {seq}" for seq in range(1, acked + 1)]
            stored = await conn.fetchval("SELECT count(*) FROM memory.memories WHERE value = ANY($1::text[])", values)
        finally:
            await conn.close()
        assert acked >= 200 and stored == acked, (acked, stored, sent)
    finally:
        process.stop()
