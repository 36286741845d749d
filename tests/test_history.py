"""Versions, History, as-of reads, Erase and the retention purge, through real gRPC against real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from memory_service.memories import purge
from memory_service.v1 import lease_pb2, memory_pb2
from tests.conftest import RunningServer, code_of, start_server, stop_server, test_env

TOKEN = "history-test-token-0123456789"
KINDS = {
    memory_pb2.CHANGE_KIND_CREATED: "created",
    memory_pb2.CHANGE_KIND_UPDATED: "updated",
    memory_pb2.CHANGE_KIND_DELETED: "deleted",
    memory_pb2.CHANGE_KIND_EXPIRED: "expired",
    memory_pb2.CHANGE_KIND_ERASED: "erased",
}


def memory(value: str, *, key: str = "", scope_id: int = 1, **fields: object) -> memory_pb2.MemoryInput:
    return memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=scope_id, key=key, value=value, **fields)  # type: ignore[arg-type]


async def store(server: RunningServer, value: str, **kwargs: object) -> memory_pb2.StoreResponse:
    return await server.memory.Store(memory_pb2.StoreRequest(memory=memory(value, **kwargs)))  # type: ignore[arg-type]


async def history(server: RunningServer, memory_id: int) -> list[memory_pb2.MemoryVersion]:
    versions: list[memory_pb2.MemoryVersion] = []
    token = ""
    while True:
        page = await server.memory.History(memory_pb2.HistoryRequest(id=memory_id, page_size=2, page_token=token))
        versions.extend(page.versions)
        token = page.next_page_token
        if not token:
            return versions


async def fetch(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def shifted(stamp: timestamp_pb2.Timestamp, microseconds: int) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(stamp.ToDatetime() + timedelta(microseconds=microseconds))
    return result


@pytest.fixture
async def authed(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(test_env(database_url, AUTH_TOKENS=TOKEN))
    yield running
    await stop_server(running)


async def test_each_change_kind_records_a_version_and_unchanged_records_none(
    authed: RunningServer, database_url: str
) -> None:
    server = authed
    auth = (("authorization", f"Bearer {TOKEN}"),)
    created = await server.memory.Store(
        memory_pb2.StoreRequest(memory=memory("prefers tea", key="drink")),
        metadata=(*auth, ("x-request-id", "req-1")),
    )
    unchanged = await server.memory.Store(
        memory_pb2.StoreRequest(memory=memory("prefers tea", key="drink")), metadata=auth
    )
    assert unchanged.outcome == memory_pb2.WRITE_OUTCOME_UNCHANGED
    lease = await server.leases.Acquire(
        lease_pb2.AcquireRequest(namespace="jobs", name="writer", ttl={"seconds": 30}), metadata=auth
    )
    fence = memory_pb2.Fence(namespace="jobs", name="writer", fencing_token=lease.lease.fencing_token)
    await server.memory.Store(
        memory_pb2.StoreRequest(memory=memory("prefers coffee", key="drink"), fence=fence), metadata=auth
    )
    deleted = await server.memory.Delete(memory_pb2.DeleteRequest(id=created.id), metadata=auth)
    assert deleted.deleted == 1

    versions = await history_authed(server, created.id, auth)
    assert [(v.version, KINDS[v.kind]) for v in versions] == [(3, "deleted"), (2, "updated"), (1, "created")]
    assert [v.memory.value for v in versions] == ["prefers coffee", "prefers coffee", "prefers tea"]
    assert all(v.principal.startswith("token:") for v in versions)
    assert versions[2].request_id == "req-1"
    assert versions[1].HasField("fencing_token") and versions[1].fencing_token == lease.lease.fencing_token
    assert not versions[2].HasField("fencing_token")
    assert versions[0].changed_at.ToDatetime() >= versions[1].changed_at.ToDatetime()

    # Expiry: the purge leaves an 'expired' version.
    past = timestamp_pb2.Timestamp(seconds=1_000_000_000)
    gone = await server.memory.Store(
        memory_pb2.StoreRequest(memory=memory("a stale note", key="stale", expires_at=past)), metadata=auth
    )
    await purge.purge_expired(server.server.runtime.db, server.server.metrics)
    expired = await history_authed(server, gone.id, auth)
    assert [KINDS[v.kind] for v in expired] == ["expired", "created"]
    assert not expired[0].principal  # the purge is nobody's call

    rows = await fetch(database_url, "SELECT count(*) AS n FROM memory.changes WHERE memory_id = $1", created.id)
    assert rows[0]["n"] == 3


async def history_authed(
    server: RunningServer, memory_id: int, auth: tuple[tuple[str, str], ...]
) -> list[memory_pb2.MemoryVersion]:
    page = await server.memory.History(memory_pb2.HistoryRequest(id=memory_id), metadata=auth)
    return list(page.versions)


async def test_bulk_store_records_versions_set_based(server: RunningServer) -> None:
    def request(values: list[str]) -> memory_pb2.BulkStoreRequest:
        return memory_pb2.BulkStoreRequest(
            items=[memory_pb2.BulkItem(sequence=i + 1, memory=memory(v, key=f"k{i}")) for i, v in enumerate(values)]
        )

    [ack] = [a async for a in server.memory.BulkStore(iter([request(["one", "two", "three"])]))]
    assert ack.created == 3
    [ack] = [a async for a in server.memory.BulkStore(iter([request(["one", "TWO", "three"])]))]
    assert (ack.updated, ack.unchanged) == (1, 2)
    listed = await server.memory.List(memory_pb2.ListRequest())
    by_key = {m.key: m.id for m in listed.memories}
    assert [KINDS[v.kind] for v in await history(server, by_key["k1"])] == ["updated", "created"]
    assert [KINDS[v.kind] for v in await history(server, by_key["k0"])] == ["created"]


async def test_as_of_reads_before_and_after_an_update_and_a_delete(server: RunningServer) -> None:
    first = await store(server, "the office is in Berlin", key="office")
    other = await store(server, "the team is five people", key="team")
    v1 = (await server.memory.Get(memory_pb2.GetRequest(id=first.id))).memory
    await store(server, "the office is in Lisbon", key="office")
    v2 = (await server.memory.Get(memory_pb2.GetRequest(id=first.id))).memory
    await server.memory.Delete(memory_pb2.DeleteRequest(id=first.id))
    [tombstone, *_] = await history(server, first.id)

    async def value_at(stamp: timestamp_pb2.Timestamp) -> str | None:
        try:
            got = await server.memory.Get(memory_pb2.GetRequest(id=first.id, as_of=stamp))
        except grpc.aio.AioRpcError as error:
            assert code_of(error) == grpc.StatusCode.NOT_FOUND
            return None
        return got.memory.value

    async def listed_at(stamp: timestamp_pb2.Timestamp) -> list[str]:
        page = await server.memory.List(memory_pb2.ListRequest(as_of=stamp, page_size=1))
        values = [m.value for m in page.memories]
        while page.next_page_token:
            page = await server.memory.List(
                memory_pb2.ListRequest(as_of=stamp, page_size=1, page_token=page.next_page_token)
            )
            values.extend(m.value for m in page.memories)
        return sorted(values)

    assert await value_at(shifted(v1.created_at, -1)) is None
    assert await value_at(v1.updated_at) == "the office is in Berlin"
    assert await value_at(shifted(v2.updated_at, -1)) == "the office is in Berlin"
    assert await value_at(v2.updated_at) == "the office is in Lisbon"
    assert await value_at(shifted(tombstone.changed_at, -1)) == "the office is in Lisbon"
    assert await value_at(tombstone.changed_at) is None
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.memory.Get(memory_pb2.GetRequest(id=first.id))
    assert code_of(raised.value) == grpc.StatusCode.NOT_FOUND

    assert await listed_at(shifted(v1.created_at, -1)) == []
    assert await listed_at(v2.updated_at) == ["the office is in Lisbon", "the team is five people"]
    assert await listed_at(tombstone.changed_at) == ["the team is five people"]
    assert other.id != first.id
    # Search stays on the present.
    found = await server.memory.Search(memory_pb2.SearchRequest(query="office Lisbon Berlin", top_k=10))
    assert first.id not in [hit.memory.id for hit in found.hits]


async def test_erase_leaves_nothing_readable(server: RunningServer, database_url: str) -> None:
    secret = "the vault code is 4711"
    kept = await store(server, "the lobby code is 1234", scope_id=2)
    erased_live = await store(server, secret, key="vault", scope_id=1)
    await store(server, secret + " and rotates monthly", key="vault", scope_id=1)
    erased_deleted = await store(server, "deleted but remembered", key="old", scope_id=1)
    await server.memory.Delete(memory_pb2.DeleteRequest(id=erased_deleted.id))
    before = (await server.memory.Get(memory_pb2.GetRequest(id=erased_live.id))).memory.updated_at
    hashes = await fetch(database_url, "SELECT count(*) AS n FROM memory.embedding_cache")
    assert hashes[0]["n"] >= 3

    receipt = await server.memory.Erase(
        memory_pb2.EraseRequest(
            scope=memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_AGENT, scope_id=1), filter=memory_pb2.MemoryFilter()
        )
    )
    assert sorted(receipt.memory_ids) == sorted([erased_live.id, erased_deleted.id])
    assert receipt.memories == 2
    assert receipt.versions == 4  # created + updated, created + deleted
    assert receipt.cached_embeddings == 3
    assert receipt.erased_at.seconds > 0

    for memory_id in (erased_live.id, erased_deleted.id):
        for request in (
            memory_pb2.GetRequest(id=memory_id),
            memory_pb2.GetRequest(id=memory_id, as_of=before),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await server.memory.Get(request)
            assert code_of(raised.value) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await server.memory.History(memory_pb2.HistoryRequest(id=memory_id))
        assert code_of(raised.value) == grpc.StatusCode.NOT_FOUND
    listed = await server.memory.List(memory_pb2.ListRequest(as_of=before))
    assert [m.id for m in listed.memories] == [kept.id]
    found = await server.memory.Search(memory_pb2.SearchRequest(query="vault code", top_k=10))
    assert [hit.memory.id for hit in found.hits] in ([], [kept.id])
    # The change stream keeps only content-free erasure entries of them.
    changes = await read_changes(server, "", include_memory=True, until=lambda seen: len(seen) >= 3)
    erased_changes = [c for c in changes if c.memory_id != kept.id]
    assert sorted(KINDS[c.kind] for c in erased_changes) == ["erased", "erased"]
    assert not any(c.HasField("memory") for c in erased_changes)
    # Nothing of the text is left in any table.
    for table, column in (("memories", "value"), ("memory_versions", "value")):
        rows = await fetch(database_url, f"SELECT count(*) AS n FROM memory.{table} WHERE {column} LIKE '%vault%'")
        assert rows[0]["n"] == 0
    cache = await fetch(database_url, "SELECT count(*) AS n FROM memory.embedding_cache")
    assert cache[0]["n"] == hashes[0]["n"] - 3


async def test_erase_requires_a_scope(server: RunningServer) -> None:
    stored = await store(server, "keep me")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.memory.Erase(memory_pb2.EraseRequest(id=stored.id))
    assert code_of(raised.value) == grpc.StatusCode.INVALID_ARGUMENT
    wrong_scope = await server.memory.Erase(
        memory_pb2.EraseRequest(scope=memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_PROJECT), id=stored.id)
    )
    assert wrong_scope.memories == 0
    assert (await server.memory.Get(memory_pb2.GetRequest(id=stored.id))).memory.value == "keep me"


async def test_retention_purges_superseded_versions_and_tombstones(server: RunningServer, database_url: str) -> None:
    live = await store(server, "v1", key="live")
    await store(server, "v2", key="live")
    await store(server, "v3", key="live")
    gone = await store(server, "soon deleted", key="gone")
    await server.memory.Delete(memory_pb2.DeleteRequest(id=gone.id))
    [first_change, *_] = await read_changes(server, "", until=lambda seen: len(seen) >= 1)
    recent = await store(server, "recent", key="recent")
    runtime = server.server.runtime
    # Age everything but the memory stored last past the retention.
    conn = await asyncpg.connect(database_url)
    try:
        for table in ("memory_versions", "changes"):
            await conn.execute(
                f"UPDATE memory.{table} SET changed_at = changed_at - $1::interval WHERE memory_id <> $2",
                runtime.history.retention + timedelta(hours=1),
                recent.id,
            )
    finally:
        await conn.close()
    purged = await runtime.history.purge()
    assert purged > 0
    assert [v.memory.value for v in await history(server, live.id)] == ["v3"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.memory.History(memory_pb2.HistoryRequest(id=gone.id))
    assert code_of(raised.value) == grpc.StatusCode.NOT_FOUND
    assert len(await history(server, recent.id)) == 1
    left = await fetch(database_url, "SELECT memory_id FROM memory.changes")
    assert [r["memory_id"] for r in left] == [recent.id]
    # A cursor from before the purge cannot promise every later change: the watcher is told to start over.
    call = server.memory.Watch(memory_pb2.WatchRequest(after=first_change.cursor))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert code_of(raised.value) == grpc.StatusCode.FAILED_PRECONDITION
    [kept] = await read_changes(server, "", until=lambda seen: len(seen) >= 1)
    assert kept.memory_id == recent.id
    assert (await server.memory.Get(memory_pb2.GetRequest(id=live.id))).memory.value == "v3"


async def read_changes(
    server: RunningServer, after: str, *, include_memory: bool = False, until: object = None
) -> list[memory_pb2.Change]:
    """Changes from ``after`` until ``until(seen)`` holds (or nothing arrives for a while)."""
    seen: list[memory_pb2.Change] = []
    call = server.memory.Watch(memory_pb2.WatchRequest(after=after, include_memory=include_memory))
    try:
        while not (callable(until) and until(seen)):
            try:
                change = await asyncio.wait_for(call.read(), timeout=3)
            except TimeoutError:
                break
            seen.append(change)
    finally:
        call.cancel()
    return seen


async def test_history_off_records_nothing(database_url: str) -> None:
    server = await start_server(test_env(database_url, HISTORY_VERSIONS="off"))
    try:
        stored = await store(server, "unversioned", key="plain")
        await store(server, "unversioned, changed", key="plain")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await server.memory.History(memory_pb2.HistoryRequest(id=stored.id))
        assert code_of(raised.value) == grpc.StatusCode.NOT_FOUND
        assert (await server.memory.Get(memory_pb2.GetRequest(id=stored.id))).memory.value == "unversioned, changed"
        assert await server.memory.Delete(memory_pb2.DeleteRequest(id=stored.id)) == memory_pb2.DeleteResponse(
            deleted=1
        )
    finally:
        await stop_server(server)
    rows = await fetch(
        database_url,
        "SELECT (SELECT count(*) FROM memory.memory_versions) AS v, (SELECT count(*) FROM memory.changes) AS c",
    )
    assert (rows[0]["v"], rows[0]["c"]) == (0, 0)


async def test_delete_by_filter_leaves_tombstones_and_watch_filters_by_content(server: RunningServer) -> None:
    tagged = await store(server, "tagged one", key="a", tags=["keep-an-eye"])
    plain = await store(server, "plain one", key="b")
    deleted = await server.memory.Delete(
        memory_pb2.DeleteRequest(
            filter=memory_pb2.MemoryFilter(scopes=[memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_AGENT)])
        )
    )
    assert deleted.deleted == 2
    for stored in (tagged, plain):
        assert [KINDS[v.kind] for v in await history(server, stored.id)] == ["deleted", "created"]
    request = memory_pb2.WatchRequest(filter=memory_pb2.MemoryFilter(tags=["keep-an-eye"]), include_memory=True)
    call = server.memory.Watch(request)
    try:
        seen = [await asyncio.wait_for(call.read(), timeout=10) for _ in range(2)]
    finally:
        call.cancel()
    assert [(c.memory_id, KINDS[c.kind]) for c in seen] == [(tagged.id, "created"), (tagged.id, "deleted")]
    assert seen[1].memory.value == "tagged one"
