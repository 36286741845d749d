"""A memory stored without an expiry never expires and says so everywhere ("unset: never expires"), through Store
and BulkStore alike, and the last instant a Timestamp can name is a valid ``as_of`` that finds live memories."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
from google.protobuf import duration_pb2, timestamp_pb2
from grpc import aio

from memory_service.storage.migrations import apply_migrations
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env

LAST_INSTANT = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)
"""9999-12-31T23:59:59.999999999Z: valid per the proto, the latest as_of a client can send."""


def agent_memory(key: str, value: str, **fields: object) -> memory_pb2.MemoryInput:
    return memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=5, key=key, value=value, **fields)  # type: ignore[arg-type]


async def bulk_store(server: RunningServer, *items: memory_pb2.MemoryInput) -> None:
    request = memory_pb2.BulkStoreRequest(
        items=[memory_pb2.BulkItem(sequence=i + 1, memory=m) for i, m in enumerate(items)]
    )
    acks = [ack async for ack in server.memory.BulkStore(iter([request]))]
    assert acks[-1].durable_sequence == len(items) and not any(ack.rejected for ack in acks)


async def stored_expiries(dsn: str) -> dict[str, tuple[datetime | None, list[datetime | None]]]:
    """Per key: the live row's expires_at and its versions' (both as PostgreSQL holds them)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT m.key, m.expires_at, array_agg(v.expires_at ORDER BY v.version) AS versions
               FROM memory.memories m JOIN memory.memory_versions v ON v.memory_id = m.id
               GROUP BY m.key, m.expires_at"""
        )
    finally:
        await conn.close()
    return {r["key"]: (r["expires_at"], list(r["versions"])) for r in rows}


async def test_no_expiry_is_stored_and_reported_as_none_by_every_read(server: RunningServer, database_url: str) -> None:
    watch = server.memory.Watch(memory_pb2.WatchRequest(include_memory=True))
    stored = await server.memory.Store(memory_pb2.StoreRequest(memory=agent_memory("store", "kept by Store")))
    await bulk_store(server, agent_memory("bulk", "kept by BulkStore"))
    ttl = await server.memory.Store(
        memory_pb2.StoreRequest(memory=agent_memory("ttl", "kept an hour", ttl=duration_pb2.Duration(seconds=3600)))
    )

    # Both write paths store NULL for "never", and a TTL still stores its instant.
    expiries = await stored_expiries(database_url)
    assert expiries["store"] == (None, [None])
    assert expiries["bulk"] == (None, [None])
    assert expiries["ttl"][0] is not None and expiries["ttl"][1] == [expiries["ttl"][0]]

    got = (await server.memory.Get(memory_pb2.GetRequest(id=stored.id))).memory
    assert not got.HasField("expires_at")
    assert (await server.memory.Get(memory_pb2.GetRequest(id=ttl.id))).memory.HasField("expires_at")
    versions = (await server.memory.History(memory_pb2.HistoryRequest(id=stored.id))).versions
    assert [v.memory.HasField("expires_at") for v in versions] == [False]
    now = timestamp_pb2.Timestamp()
    now.FromDatetime(datetime.now(UTC))
    for as_of in (now, LAST_INSTANT):
        past = (await server.memory.Get(memory_pb2.GetRequest(id=stored.id, as_of=as_of))).memory
        assert not past.HasField("expires_at")
    listed = await server.memory.List(memory_pb2.ListRequest(as_of=now))
    assert {m.key: m.HasField("expires_at") for m in listed.memories} == {"store": False, "bulk": False, "ttl": True}
    changes = [await asyncio.wait_for(watch.read(), 30) for _ in range(3)]
    watch.cancel()
    assert all(change is not aio.EOF for change in changes)
    assert {c.memory.key: c.memory.HasField("expires_at") for c in changes} == {  # type: ignore[union-attr]
        "store": False,
        "bulk": False,
        "ttl": True,
    }


async def test_the_last_instant_a_timestamp_names_is_an_as_of_that_finds_live_memories(server: RunningServer) -> None:
    live = await server.memory.Store(memory_pb2.StoreRequest(memory=agent_memory("live", "never expires")))
    await bulk_store(server, agent_memory("bulk", "never expires either"))
    far = timestamp_pb2.Timestamp()
    far.FromDatetime(datetime(9000, 1, 1, tzinfo=UTC))
    await server.memory.Store(memory_pb2.StoreRequest(memory=agent_memory("ends", "expires in 9000", expires_at=far)))

    got = await server.memory.Get(memory_pb2.GetRequest(id=live.id, as_of=LAST_INSTANT))
    assert got.memory.value == "never expires"
    listed = await server.memory.List(memory_pb2.ListRequest(as_of=LAST_INSTANT))
    # A memory that expires before that instant is, by then, expired.
    assert sorted(m.key for m in listed.memories) == ["bulk", "live"]


async def test_the_migration_repairs_expiries_stored_for_never(empty_database_url: str) -> None:
    """Rows an earlier Store wrote with the latest instant (or 'infinity') for "never" read as never expiring."""
    await apply_migrations(empty_database_url)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute("DELETE FROM memory.schema_migrations WHERE name = '0010_contract.sql'")
        for key, expiry in (
            ("latest", "9999-12-31 23:59:59.999999+00"),
            ("infinity", "infinity"),
            ("real", "2999-01-01 00:00:00+00"),
        ):
            memory_id = await conn.fetchval(
                """INSERT INTO memory.memories (scope, scope_id, key, value, content_hash, expires_at)
                   VALUES ('agent', 9, $1::text, $1::text, '\\x00', $2::text::timestamptz) RETURNING id""",
                key,
                expiry,
            )
            await conn.execute(
                """INSERT INTO memory.memory_versions (memory_id, version, kind, scope, scope_id, memory_type, key,
                       value, importance, tags, metadata, content_hash, created_at, expires_at, changed_at)
                   SELECT id, version, 'created', scope, scope_id, memory_type, key, value, importance, tags,
                          metadata, content_hash, created_at, expires_at, updated_at
                   FROM memory.memories WHERE id = $1""",
                memory_id,
            )
    finally:
        await conn.close()

    running = await start_server(test_env(empty_database_url))  # migrates on start: 0010 runs
    try:
        listed = await running.memory.List(memory_pb2.ListRequest())
        assert {m.key: m.HasField("expires_at") for m in listed.memories} == {
            "latest": False,
            "infinity": False,
            "real": True,
        }
    finally:
        await stop_server(running)
    expiries = await stored_expiries(empty_database_url)
    assert expiries["latest"] == (None, [None]) and expiries["infinity"] == (None, [None])
    real = datetime(2999, 1, 1, tzinfo=UTC)
    assert expiries["real"] == (real, [real])
