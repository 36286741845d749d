"""The database is bound to its embedding model at the first stored embedding, not at the first start."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from memory_service.app.server import MemoryServer
from memory_service.config.settings import Settings
from memory_service.errors import EmbeddingConfigMismatch
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, code_of, start_server, stop_server, test_env
from tests.fake_openai import FakeOpenAI


async def binding(database_url: str) -> tuple[str, dict[str, str]]:
    """The embedding column's type and the settings table; the column always keeps its vectors in the row."""
    conn = await asyncpg.connect(database_url)
    try:
        column_type, storage = await conn.fetchrow(
            "SELECT format_type(atttypid, atttypmod), attstorage FROM pg_attribute "
            "WHERE attrelid = 'memory.memories'::regclass AND attname = 'embedding'"
        )
        stored = dict(await conn.fetch("SELECT key, value FROM memory.settings"))
    finally:
        await conn.close()
    assert storage == b"m", "embeddings would move out of line (TOAST) once a row passes 2 kB"
    return column_type, stored


def store(value: str, key: str = "") -> memory_pb2.StoreRequest:
    return memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, key=key, value=value))


async def test_a_start_that_stores_nothing_binds_nothing_and_the_first_store_binds(database_url: str) -> None:
    running = await start_server(test_env(database_url))
    try:
        # Reads and searches on the unbound database work and bind nothing.
        empty = await running.memory.Search(memory_pb2.SearchRequest(query="anything"))
        assert list(empty.hits) == []
        assert await binding(database_url) == ("vector", {})
        await running.memory.Store(store("the first memory binds the model"))
        column_type, stored = await binding(database_url)
        assert column_type == "vector(384)"
        assert (stored["embedding_model"], stored["embedding_dim"]) == ("hash-ngram-v1", "384")
        # Pooled connections prepared statements before the column's type changed; they still serve.
        hits = await running.memory.Search(memory_pb2.SearchRequest(query="first memory", include_embedding=True))
        assert [len(hit.memory.embedding) for hit in hits.hits] == [384]
    finally:
        await stop_server(running)


async def test_start_store_nothing_then_another_model_starts_and_a_third_is_refused(
    database_url: str, fake_openai: FakeOpenAI
) -> None:
    running = await start_server(test_env(database_url))  # the hash embedder, 384 dimensions
    await stop_server(running)

    openai = test_env(
        database_url,
        OPENAI_BASE_URL=fake_openai.base_url,
        EMBEDDING_MODEL="text-embedding-3-small",
        EMBEDDING_DIM="384",
    )
    running = await start_server(openai)  # another model: starts, nothing was stored
    try:
        await running.memory.Store(store("stored with the second model"))
    finally:
        await stop_server(running)
    assert (await binding(database_url))[1]["embedding_model"] == "text-embedding-3-small"

    third = MemoryServer(Settings.from_env(test_env(database_url, EMBEDDING_DIM="256")))
    with pytest.raises(EmbeddingConfigMismatch) as caught:
        await third.start()
    message = str(caught.value)
    assert "\n" not in message
    assert "stores embeddings of model 'text-embedding-3-small' with dimension 384" in message
    assert "configured with model 'hash-ngram-v1' and dimension 256" in message
    assert "(DATABASE_URL)" in message and database_url.rsplit("/", 1)[-1] in message
    assert "point DATABASE_URL at a new database" in message

    running = await start_server(openai)  # the bound pair still starts
    await stop_server(running)


@pytest.fixture
def fake_openai() -> FakeOpenAI:
    with FakeOpenAI(dimension=384) as fake:
        yield fake  # type: ignore[misc]


async def test_two_instances_with_different_models_race_for_the_first_store(database_url: str) -> None:
    """Exactly one pair wins; every store of the other answers FAILED_PRECONDITION; nothing is half-bound."""
    first = await start_server(test_env(database_url))
    second = await start_server(test_env(database_url, EMBEDDING_DIM="256"))

    async def stores(server: RunningServer, name: str) -> list[grpc.StatusCode]:
        async def one(i: int) -> grpc.StatusCode:
            try:
                await server.memory.Store(store(f"{name} memory {i}", key=f"{name}-{i}"))
            except grpc.RpcError as error:
                return code_of(error)
            return grpc.StatusCode.OK

        return list(await asyncio.gather(*(one(i) for i in range(8))))

    try:
        outcomes = await asyncio.gather(stores(first, "a"), stores(second, "b"))
        # A BulkStore of the loser is refused the same way.
        loser = second if outcomes[0][0] is grpc.StatusCode.OK else first
        request = memory_pb2.BulkStoreRequest(
            items=[
                memory_pb2.BulkItem(
                    sequence=1, memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value="bulk")
                )
            ]
        )
        with pytest.raises(grpc.RpcError) as caught:
            async for _ in loser.memory.BulkStore(iter([request])):
                pass
        assert code_of(caught.value) is grpc.StatusCode.FAILED_PRECONDITION
        assert "configure the stored pair again" in (caught.value.details() or "")
    finally:
        await stop_server(first)
        await stop_server(second)
    codes = {tuple(set(o)) for o in outcomes}
    assert codes == {(grpc.StatusCode.OK,), (grpc.StatusCode.FAILED_PRECONDITION,)}, outcomes
    column_type, stored = await binding(database_url)
    winner = "384" if outcomes[0][0] is grpc.StatusCode.OK else "256"
    assert column_type == f"vector({winner})" and stored["embedding_dim"] == winner


async def test_the_first_bulk_store_binds(database_url: str) -> None:
    running = await start_server(test_env(database_url, BULK_BATCH_ROWS="5"))
    try:
        items = [
            memory_pb2.BulkItem(
                sequence=i, memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value=f"bulk {i}", key=f"k{i}")
            )
            for i in range(1, 41)
        ]
        requests = [memory_pb2.BulkStoreRequest(items=items[i : i + 5]) for i in range(0, 40, 5)]
        acks = [ack async for ack in running.memory.BulkStore(iter(requests))]
        assert acks[-1].durable_sequence == 40 and sum(ack.created for ack in acks) == 40
    finally:
        await stop_server(running)
    assert (await binding(database_url))[0] == "vector(384)"
