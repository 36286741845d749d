"""Embedding providers: the real `openai` client against a local OpenAI-compatible server, the hash embedder,
the cache, and the model/dimension guard."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest

from memory_service.app.server import MemoryServer
from memory_service.config.settings import Settings
from memory_service.embeddings.hashing import HashEmbedder
from memory_service.errors import EmbeddingConfigMismatch
from memory_service.memories import purge
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, code_of, start_server, stop_server, test_env
from tests.fake_openai import FakeOpenAI, fake_vector

BATCH = 8


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(dimension=384) as fake:
        yield fake


def openai_env(database_url: str, fake: FakeOpenAI, **overrides: str) -> dict[str, str]:
    settings = {
        "EMBEDDING_PROVIDER": "openai",
        "OPENAI_API_KEY": "sk-test-key",
        "OPENAI_BASE_URL": fake.base_url,
        "EMBEDDING_MODEL": "text-embedding-3-small",
        "EMBEDDING_DIM": "384",
        "EMBEDDING_BATCH_SIZE": str(BATCH),
    }
    return test_env(database_url, **{**settings, **overrides})


@pytest.fixture
async def openai_server(database_url: str, fake_openai: FakeOpenAI) -> AsyncIterator[RunningServer]:
    running = await start_server(openai_env(database_url, fake_openai))
    running.server.runtime.embedder.provider._backoff_base = 0.01  # type: ignore[attr-defined]
    yield running
    await stop_server(running)


@pytest.mark.parametrize("count", [1, 8, 9, 20, 64])
async def test_embed_batches_ceil_n_over_batch_requests(
    openai_server: RunningServer, fake_openai: FakeOpenAI, count: int
) -> None:
    texts = [f"text number {i}" for i in range(count)]
    response = await openai_server.memory.Embed(memory_pb2.EmbedRequest(texts=texts))
    assert len(fake_openai.requests) == math.ceil(count / BATCH)
    assert all(len(r["input"]) <= BATCH for r in fake_openai.requests)
    assert fake_openai.requests[0]["model"] == "text-embedding-3-small"
    assert fake_openai.requests[0]["dimensions"] == 384
    assert fake_openai.authorization[0] == "Bearer sk-test-key"
    assert response.model == "text-embedding-3-small" and response.dimension == 384
    for text, embedding in zip(texts, response.embeddings, strict=True):
        assert np.allclose(embedding.values, fake_vector(text, 384), atol=1e-6)


async def test_retry_after_429_then_success(openai_server: RunningServer, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(429)
    response = await openai_server.memory.Embed(memory_pb2.EmbedRequest(texts=["retry me"]))
    assert len(response.embeddings) == 1
    assert len(fake_openai.requests) == 2


async def test_repeated_500s_answer_unavailable(openai_server: RunningServer, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(*[500] * 10)
    with pytest.raises(grpc.RpcError) as caught:
        await openai_server.memory.Store(
            memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value="never stored"))
        )
    assert code_of(caught.value) == grpc.StatusCode.UNAVAILABLE
    assert len(fake_openai.requests) == 5  # the first try and EMBEDDING_MAX_RETRIES (4) retries
    listed = await openai_server.memory.List(memory_pb2.ListRequest())
    assert list(listed.memories) == []


async def test_provider_refusal_is_not_retried(openai_server: RunningServer, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(400)
    with pytest.raises(grpc.RpcError) as caught:
        await openai_server.memory.Embed(memory_pb2.EmbedRequest(texts=["bad"]))
    assert code_of(caught.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert len(fake_openai.requests) == 1


async def test_cache_makes_second_store_of_same_text_free(
    openai_server: RunningServer, fake_openai: FakeOpenAI
) -> None:
    def store(scope_id: int, key: str) -> memory_pb2.StoreRequest:
        return memory_pb2.StoreRequest(
            memory=memory_pb2.MemoryInput(
                scope=memory_pb2.SCOPE_AGENT, scope_id=scope_id, key=key, value="the office closes at six"
            )
        )

    await openai_server.memory.Store(store(1, "a"))
    assert len(fake_openai.requests) == 1
    # Another identity with the same text, and the same identity again: no provider calls.
    await openai_server.memory.Store(store(2, "b"))
    again = await openai_server.memory.Store(store(1, "a"))
    assert again.outcome == memory_pb2.WRITE_OUTCOME_UNCHANGED
    await openai_server.memory.Embed(memory_pb2.EmbedRequest(texts=["the office closes at six"]))
    assert len(fake_openai.requests) == 1


async def test_store_with_supplied_embedding_calls_no_provider(
    openai_server: RunningServer, fake_openai: FakeOpenAI
) -> None:
    vector = fake_vector("anything", 384).tolist()
    await openai_server.memory.Store(
        memory_pb2.StoreRequest(
            memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value="pre-embedded", embedding=vector)
        )
    )
    assert fake_openai.requests == []


async def test_restart_with_other_model_or_dimension_is_refused(database_url: str, fake_openai: FakeOpenAI) -> None:
    running = await start_server(openai_env(database_url, fake_openai))
    await running.memory.Store(
        memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value="binds the model"))
    )
    await stop_server(running)
    for overrides, asked in (
        ({"EMBEDDING_MODEL": "text-embedding-3-large"}, "'text-embedding-3-large' and dimension 384"),
        ({"EMBEDDING_DIM": "1536"}, "'text-embedding-3-small' and dimension 1536"),
    ):
        server = MemoryServer(Settings.from_env(openai_env(database_url, fake_openai, **overrides)))
        with pytest.raises(EmbeddingConfigMismatch) as caught:
            await server.start()
        message = str(caught.value)
        assert "stores embeddings of model 'text-embedding-3-small' with dimension 384" in message
        assert asked in message


def test_hash_embedder_is_deterministic_unit_length_and_lexical() -> None:
    embedder = HashEmbedder(model="hash-ngram-v1", dimension=384)
    a, b, c = embedder.embed_now(["deploy the service", "deploying the services", "banana bread"])
    assert np.allclose(embedder.embed_now(["deploy the service"])[0], a)
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert float(a @ b) > float(a @ c) + 0.2


def test_hash_embedder_gives_wordless_text_a_direction() -> None:
    # No word characters: emoji, punctuation, spaces. A zero vector would make every cosine NaN.
    embedder = HashEmbedder(model="hash-ngram-v1", dimension=384)
    texts = ["🎉🎉", "🎉", "🚀", "?!…", "   ", ""]
    vectors = embedder.embed_now(texts)
    assert np.isfinite(vectors).all()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    party_twice, party, rocket = vectors[:3]
    assert float(party_twice @ party) > float(party_twice @ rocket)
    assert np.allclose(vectors[4], vectors[5])  # nothing but spaces is the same as nothing


async def test_old_cache_entries_are_evicted(server: RunningServer) -> None:
    db = server.server.runtime.db
    vector = np.zeros(384, dtype=np.float32)
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO memory.embedding_cache (model, dimension, content_hash, embedding, created_at) "
            "VALUES ('evict-test', 384, '\\x01', $1, clock_timestamp() - interval '31 days'), "
            "('evict-test', 384, '\\x02', $1, clock_timestamp())",
            vector,
        )
    assert await purge.evict_embedding_cache(db) >= 1
    async with db.connection() as conn:
        left = await conn.fetch("SELECT content_hash FROM memory.embedding_cache WHERE model = 'evict-test'")
    assert [bytes(r["content_hash"]) for r in left] == [b"\x02"]


async def test_a_provider_that_answers_a_zero_vector_is_refused(
    openai_server: RunningServer, fake_openai: FakeOpenAI
) -> None:
    # Stored, a zero vector would make every search that meets it NaN; the write fails instead and stores nothing.
    fake_openai.zero_for.add("nothing to see")
    with pytest.raises(grpc.RpcError) as caught:
        await openai_server.memory.Store(
            memory_pb2.StoreRequest(
                memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value="nothing to see")
            )
        )
    assert code_of(caught.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "zero, non-finite or out-of-range vector" in caught.value.details()
    listed = await openai_server.memory.List(memory_pb2.ListRequest())
    assert list(listed.memories) == []
