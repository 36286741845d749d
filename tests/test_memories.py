"""Store, Get, Delete and List through real gRPC against real PostgreSQL."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, code_of


def memory(value: str, *, scope_id: int = 1, key: str = "", **fields: object) -> memory_pb2.MemoryInput:
    return memory_pb2.MemoryInput(
        scope=memory_pb2.SCOPE_AGENT,
        scope_id=scope_id,
        key=key,
        value=value,
        **fields,  # type: ignore[arg-type]
    )


async def store(server: RunningServer, value: str, **kwargs: object) -> memory_pb2.StoreResponse:
    return await server.memory.Store(memory_pb2.StoreRequest(memory=memory(value, **kwargs)))  # type: ignore[arg-type]


async def test_upsert_reports_created_updated_unchanged(server: RunningServer) -> None:
    first = await store(server, "prefers tea over coffee", key="drink")
    again = await store(server, "prefers tea over coffee", key="drink")
    changed = await store(server, "prefers coffee now", key="drink")
    assert first.outcome == memory_pb2.WRITE_OUTCOME_CREATED
    assert again.outcome == memory_pb2.WRITE_OUTCOME_UNCHANGED
    assert changed.outcome == memory_pb2.WRITE_OUTCOME_UPDATED
    assert first.id == again.id == changed.id
    got = await server.memory.Get(memory_pb2.GetRequest(id=first.id))
    assert got.memory.value == "prefers coffee now"
    assert got.memory.key == "drink"


async def test_same_text_twice_without_key_is_one_memory(server: RunningServer, database_url: str) -> None:
    first = await store(server, "the deploy window is Tuesday", scope_id=7)
    second = await store(server, "the deploy window is Tuesday", scope_id=7)
    other_scope = await store(server, "the deploy window is Tuesday", scope_id=8)
    assert first.id == second.id != other_scope.id
    assert first.key.startswith("sha256:")
    assert second.outcome == memory_pb2.WRITE_OUTCOME_UNCHANGED
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM memory.memories WHERE scope_id = 7")
    finally:
        await conn.close()
    assert rows == 1


async def test_metadata_and_fields_round_trip(server: RunningServer) -> None:
    request = memory(
        "Alice manages the payments team",
        key="alice-role",
        memory_type=memory_pb2.MEMORY_TYPE_RELATIONSHIP,
        importance=0.9,
        tags=["people", "payments"],
        agent_id=42,
    )
    request.metadata.update({"source": "chat", "turn": 3})
    stored = await server.memory.Store(memory_pb2.StoreRequest(memory=request))
    got = (await server.memory.Get(memory_pb2.GetRequest(id=stored.id, include_embedding=True))).memory
    assert got.memory_type == memory_pb2.MEMORY_TYPE_RELATIONSHIP
    assert got.importance == pytest.approx(0.9)
    assert list(got.tags) == ["people", "payments"]
    assert got.agent_id == 42
    assert dict(got.metadata) == {"source": "chat", "turn": 3.0}
    assert len(got.embedding) == 384
    assert got.embedding_model == "hash-ngram-v1"
    assert len(got.content_hash) == 64


async def test_get_missing_is_not_found(server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await server.memory.Get(memory_pb2.GetRequest(id=987654))
    assert code_of(caught.value) == grpc.StatusCode.NOT_FOUND


async def test_expired_memories_are_never_returned(server: RunningServer, database_url: str) -> None:
    stored = await store(server, "a short-lived note", ttl=duration_pb2.Duration(seconds=3600))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE memory.memories SET expires_at = now() - interval '1 second' WHERE id = $1", stored.id
        )
    finally:
        await conn.close()
    with pytest.raises(grpc.RpcError) as caught:
        await server.memory.Get(memory_pb2.GetRequest(id=stored.id))
    assert code_of(caught.value) == grpc.StatusCode.NOT_FOUND
    listed = await server.memory.List(memory_pb2.ListRequest())
    assert stored.id not in [m.id for m in listed.memories]
    search = await server.memory.Search(memory_pb2.SearchRequest(query="short-lived note"))
    assert stored.id not in [h.memory.id for h in search.hits]

    purged = await server.server.runtime._purge()
    assert purged == 1


async def test_delete_by_id_and_by_filter(server: RunningServer) -> None:
    keep = await store(server, "keep me", scope_id=100)
    ids = [(await store(server, f"note {i}", scope_id=200)).id for i in range(5)]
    assert (await server.memory.Delete(memory_pb2.DeleteRequest(id=ids[0]))).deleted == 1
    assert (await server.memory.Delete(memory_pb2.DeleteRequest(id=ids[0]))).deleted == 0
    scope_filter = memory_pb2.MemoryFilter(scopes=[memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_AGENT, scope_id=200)])
    assert (await server.memory.Delete(memory_pb2.DeleteRequest(filter=scope_filter))).deleted == 4
    assert (await server.memory.Get(memory_pb2.GetRequest(id=keep.id))).memory.value == "keep me"
    with pytest.raises(grpc.RpcError) as caught:
        await server.memory.Delete(memory_pb2.DeleteRequest(filter=memory_pb2.MemoryFilter()))
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter" in (caught.value.details() or "")


async def test_list_pages_through_everything_once(server: RunningServer) -> None:
    expected = {(await store(server, f"fact number {i}", scope_id=300)).id for i in range(25)}
    await store(server, "other scope", scope_id=301)
    scope_filter = memory_pb2.MemoryFilter(scopes=[memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_AGENT, scope_id=300)])
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await server.memory.List(memory_pb2.ListRequest(filter=scope_filter, page_size=10, page_token=token))
        seen.extend(m.id for m in page.memories)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == sorted(expected)


async def test_list_rejects_foreign_and_malformed_tokens(server: RunningServer) -> None:
    for i in range(3):
        await store(server, f"item {i}", scope_id=400)
    page = await server.memory.List(memory_pb2.ListRequest(page_size=1))
    assert page.next_page_token
    other = memory_pb2.MemoryFilter(tags=["x"])
    for request in (
        memory_pb2.ListRequest(page_token="garbage!!"),
        memory_pb2.ListRequest(page_token=page.next_page_token, filter=other),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            await server.memory.List(request)
        assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (caught.value.details() or "")


async def test_stats_reports_counts_and_model(server: RunningServer) -> None:
    await store(server, "one")
    await store(server, "two")
    stats = await server.memory.Stats(memory_pb2.StatsRequest())
    assert stats.memories == 2
    assert stats.dimension == 384
    assert stats.embedding_model == "hash-ngram-v1"
    assert stats.pgvector_version
    assert stats.iterative_scan
    assert [(c.scope, c.memories) for c in stats.by_scope] == [(memory_pb2.SCOPE_AGENT, 2)]
