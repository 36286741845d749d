"""The client's streaming calls through real servers: bulk_store (resuming across a SIGKILLed server process,
bounded by its window) and hold (a lease for an ``async with`` block, LOST observed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from memory_service.client import MemoryClient, NotAcquired, memory_input
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env
from tests.processes import ServerProcess
from tests.test_ingest import fetch, stored
from tests.test_ingest_cli import count, free_port
from tests.test_leases import eventually


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[MemoryClient]:
    async with MemoryClient(server.address, timeout=10) as opened:
        yield opened


def row(number: int) -> dict[str, object]:
    return {"scope": "agent", "scope_id": 1, "key": f"k{number:05d}", "value": f"memory {number}"}


async def test_bulk_store_counts_outcomes_and_names_rejections(client: MemoryClient, database_url: str) -> None:
    async def source() -> AsyncIterator[memory_pb2.MemoryInput | dict[str, object]]:
        for number in range(1, 8):
            yield row(number) if number != 4 else {**row(number), "value": ""}
        yield memory_input("memory 1", scope="agent", scope_id=1, key="k00001")  # unchanged
        yield memory_input("changed", scope="agent", scope_id=1, key="k00002")  # updated

    acks: list[memory_pb2.BulkStoreAck] = []
    summary = await client.bulk_store(source(), batch_size=3, on_ack=acks.append)
    assert (summary.sent, summary.created, summary.rejected, summary.done) == (9, 6, 1, 9)
    # Items 8 and 9 rewrite items 1 and 2: unchanged and updated when the server writes them in a later batch, each
    # superseding its earlier item when one batch holds both (the server's batching decides).
    assert summary.unchanged + summary.updated + summary.superseded == 2
    assert summary.unchanged <= 1 and summary.updated <= 1
    assert summary.rejections == {4: "memory.value: must not be empty"}
    assert summary.durable_sequence == 9 == acks[-1].durable_sequence
    rows = await stored(database_url)
    assert sorted(rows) == [f"k{n:05d}" for n in (1, 2, 3, 5, 6, 7)] and rows["k00002"]["value"] == "changed"


async def test_bulk_store_reads_no_further_ahead_than_its_window(client: MemoryClient) -> None:
    acked = 0
    ahead: list[int] = []

    def on_ack(ack: memory_pb2.BulkStoreAck) -> None:
        nonlocal acked
        acked = ack.durable_sequence

    def source() -> object:
        for number in range(1, 2001):
            ahead.append(number - acked)  # items taken from the source but not yet durable, this one included
            yield row(number)

    summary = await client.bulk_store(source(), batch_size=50, window=200, on_ack=on_ack)  # type: ignore[arg-type]
    assert summary.created == 2000
    assert max(ahead) <= 201  # the window, plus the item the producer holds while it waits for room


async def test_bulk_store_resumes_across_a_killed_server(database_url: str) -> None:
    total = 20_000
    env = test_env(database_url, GRPC_PORT=str(free_port()), BULK_BATCH_ROWS="200")
    server = ServerProcess(env)
    restarted: ServerProcess | None = None
    try:
        await asyncio.to_thread(server.wait_serving)
        async with MemoryClient(server.address, timeout=10) as client:
            rows = (row(n) if n != 15_000 else {**row(n), "value": ""} for n in range(1, total + 1))
            load = asyncio.create_task(client.bulk_store(rows, batch_size=200, window=2000))
            await eventually(lambda: _at_least(database_url, 2000), timeout=60)
            server.kill()
            committed = await count(database_url)
            assert committed < total - 1, "the load finished before the kill: make it longer"
            restarted = ServerProcess(env)
            await asyncio.to_thread(restarted.wait_serving)
            summary = await asyncio.wait_for(load, 120)
    finally:
        for process in (server, restarted):
            if process is not None:
                process.stop()
    assert summary.rejections == {15_000: "memory.value: must not be empty"}
    assert summary.created + summary.updated + summary.unchanged == total - 1 and summary.rejected == 1
    keys = [r["key"] for r in await fetch(database_url, "SELECT key FROM memory.memories ORDER BY key")]
    assert keys == [f"k{n:05d}" for n in range(1, total + 1) if n != 15_000]  # no loss, no duplicates
    assert all(r["value"] == f"memory {int(k[1:])}" for k, r in (await stored(database_url)).items())


async def _at_least(dsn: str, rows: int) -> bool:
    return await count(dsn) >= rows


@pytest.fixture
async def lease_server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(test_env(database_url, LEASE_MIN_TTL="100ms"))
    yield running
    await stop_server(running)


async def test_hold_keeps_the_lease_for_the_block(lease_server: RunningServer) -> None:
    async with (
        MemoryClient(lease_server.address) as first,
        MemoryClient(lease_server.address) as second,
    ):
        async with first.hold("nightly", ttl=0.6, holder="first") as lease:
            assert lease.fencing_token > 0 and lease.lease.holder == "first"
            contender = await second.acquire("nightly")
            assert not contender.acquired and contender.current_holder.holder == "first"
            with pytest.raises(NotAcquired) as caught:
                async with second.hold("nightly", wait=0.2):
                    pytest.fail("granted while held")
            assert caught.value.current_holder.holder == "first"
            renewed = lease.lease.expires_at
            await eventually(lambda: _changed(lease.lease.expires_at, renewed))  # the server renews on its own
            assert not lease.lost.is_set()
        async with second.hold("nightly", holder="second") as taken:
            assert taken.fencing_token > lease.fencing_token
            assert taken.fence.fencing_token == taken.fencing_token and taken.fence.name == "nightly"


async def _changed(now: object, before: object) -> bool:
    return now != before


async def test_hold_waits_for_the_holder_to_leave(lease_server: RunningServer) -> None:
    async with MemoryClient(lease_server.address) as client:
        blocker = (await client.acquire("shared", holder="blocker")).lease
        entering = asyncio.create_task(client.hold("shared", wait=20, holder="waiter").__aenter__())
        await asyncio.sleep(0)
        await client.release(blocker.lease_id)
        held = await entering
        assert held.lease.holder == "waiter"
        await held.__aexit__(None, None, None)
        assert (await client.acquire("shared")).acquired


async def test_hold_sees_the_lease_lost(lease_server: RunningServer, database_url: str) -> None:
    async with MemoryClient(lease_server.address) as client:
        async with client.hold("contested", ttl=1.5, holder="slow") as lease:
            # What a stall past the TTL leaves behind: the lease has run out and someone else takes it.
            conn = await asyncpg.connect(database_url)
            try:
                await conn.execute("UPDATE memory.leases SET expires_at = clock_timestamp() WHERE name = 'contested'")
            finally:
                await conn.close()
            taker = await client.acquire("contested", holder="taker")
            assert taker.acquired
            await asyncio.wait_for(lease.lost.wait(), 15)
            assert lease.reason
        assert (await client.get_lease("contested")).holder == "taker"  # leaving released nothing of the taker's


async def test_hold_sees_the_server_go_away(database_url: str) -> None:
    running = await start_server(test_env(database_url, LEASE_MIN_TTL="100ms"))
    try:
        async with MemoryClient(running.address) as client, client.hold("draining", ttl=30) as lease:
            running.server.runtime.leases.begin_shutdown()
            await asyncio.wait_for(lease.lost.wait(), 15)
            assert "shutting down" in lease.reason
    finally:
        await stop_server(running)
