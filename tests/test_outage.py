"""PostgreSQL going away: calls answer UNAVAILABLE (retryable), and the service recovers by itself."""

from __future__ import annotations

import asyncio
import gc
import socket
from pathlib import Path

import grpc
import pytest

from memory_service.storage.database import Database
from memory_service.storage.embedded import EmbeddedPostgres
from memory_service.v1 import memory_pb2
from tests.conftest import code_of, start_server, stop_server, test_env


def note(value: str) -> memory_pb2.StoreRequest:
    return memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value=value))


async def test_database_down_answers_unavailable_then_recovers(tmp_path: Path) -> None:
    private = EmbeddedPostgres(tmp_path / "pg")
    dsn = await asyncio.to_thread(private.start)
    running = await start_server(test_env(dsn))
    try:
        first = await running.memory.Store(note("before the outage"))
        await asyncio.to_thread(private.stop, force=True)
        for call in (
            running.memory.Store(note("during the outage")),
            running.memory.Get(memory_pb2.GetRequest(id=first.id)),
            running.memory.Search(memory_pb2.SearchRequest(query="outage")),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                await call
            assert code_of(caught.value) == grpc.StatusCode.UNAVAILABLE

        await asyncio.to_thread(private.start)
        # The pool drops dead connections as they fail; within a few calls every one is fresh again.
        async with asyncio.timeout(30):
            while True:
                try:
                    await running.memory.Store(note("after the outage"))
                    break
                except grpc.RpcError as error:
                    assert code_of(error) == grpc.StatusCode.UNAVAILABLE
                    await asyncio.sleep(0.1)
        got = await running.memory.Get(memory_pb2.GetRequest(id=first.id))
        assert got.memory.value == "before the outage"
    finally:
        await stop_server(running)
        await asyncio.to_thread(private.stop, force=True)


async def test_an_expired_connection_that_cannot_be_closed_politely_is_dropped_without_an_error(
    database_url: str,
) -> None:
    """The pool closes expired connections from a task nobody awaits; one whose socket broke (its backend was
    terminated a moment before) must not end as an asyncio "Task exception was never retrieved" error."""
    unhandled: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    db = await Database.connect(database_url, min_size=1, max_size=1)
    try:
        async with db.pool.acquire() as conn:
            # The socket can no longer be written, as when the peer is gone but the loop has not read its EOF yet.
            conn._con._transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
        await db.expire_connections()
        async with db.pool.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        for _ in range(10):
            await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0)
        assert unhandled == []
    finally:
        loop.set_exception_handler(None)
        await db.close()
