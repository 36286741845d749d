"""The local ONNX provider with the real all-MiniLM-L6-v2 (from ../shared/models, skipped when it is absent), and
what every provider must do with text that has no words."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from memory_service.config.settings import Settings
from memory_service.embeddings.local_provider import LocalEmbedder, model_directory
from memory_service.errors import StartupError
from memory_service.v1 import memory_pb2
from tests.conftest import RunningServer, start_server, stop_server, test_env

MODEL_DIR = Path(
    os.environ.get("TEST_EMBEDDING_MODEL_PATH", Path(__file__).resolve().parents[2] / "shared/models/all-MiniLM-L6-v2")
)
needs_model = pytest.mark.skipif(not (MODEL_DIR / "model.onnx").is_file(), reason=f"no model at {MODEL_DIR}")

# The model's README: the first five dimensions of three sentences, and the cosines between them.
EXPECTED = {
    "The weather is lovely today.": [0.019196, 0.120085, 0.159598, 0.067066, 0.050075],
    "It's so sunny outside!": [-0.018690, 0.041519, 0.074315, 0.078433, 0.075570],
    "He drove to the stadium.": [0.136502, 0.082273, -0.025262, 0.030451, 0.053312],
}


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    return LocalEmbedder(model="all-MiniLM-L6-v2", directory=MODEL_DIR, dimension=384, threads=2)


@needs_model
def test_vectors_match_the_reference_model(embedder: LocalEmbedder) -> None:
    texts = list(EXPECTED)
    vectors = embedder.embed_now(texts)
    for vector, text in zip(vectors, texts, strict=True):
        assert np.allclose(vector[:5], EXPECTED[text], atol=1e-5)
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(0.6660, abs=1e-4)
    assert float(vectors[0] @ vectors[2]) == pytest.approx(0.1046, abs=1e-4)
    # Batching and ordering do not change a vector (runs are sorted by length internally).
    alone = embedder.embed_now([texts[2]])[0]
    assert np.allclose(alone, vectors[2], atol=1e-6)


@needs_model
def test_long_texts_are_truncated_to_the_models_limit_not_the_tokenizer_files(embedder: LocalEmbedder) -> None:
    # tokenizer.json pins truncation at 128 tokens; sentence-transformers embeds 256. Words past 128 must count.
    head = " ".join(["alpha"] * 150)
    a, b = embedder.embed_now([head + " beta gamma delta", head + " zebra yak walrus"])
    assert float(a @ b) < 0.99999


@needs_model
def test_wordless_text_gets_a_finite_unit_vector(embedder: LocalEmbedder) -> None:
    vectors = embedder.embed_now(["🎉", "?!…", " ", ""])
    assert np.isfinite(vectors).all()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_a_directory_without_a_model_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"model\.onnx"):
        LocalEmbedder(model="m", directory=tmp_path, dimension=384, threads=1)


def test_a_downloaded_copy_is_reused_without_the_network(tmp_path: Path) -> None:
    target = tmp_path / "models" / "org--some-model"
    (target / "onnx").mkdir(parents=True)
    (target / "onnx" / "model.onnx").write_bytes(b"")
    (target / "tokenizer.json").write_text("{}")
    assert model_directory("org/some-model", None, tmp_path) == target
    assert model_directory("org/some-model", tmp_path / "elsewhere", tmp_path) == tmp_path / "elsewhere"


@needs_model
def test_wrong_dimension_names_the_right_one() -> None:
    with pytest.raises(StartupError, match="EMBEDDING_DIM=384"):
        LocalEmbedder(model="all-MiniLM-L6-v2", directory=MODEL_DIR, dimension=768, threads=1)


def test_local_provider_settings() -> None:
    settings = Settings.from_env({"EMBEDDING_PROVIDER": "local", "EMBEDDING_MODEL_PATH": str(Path(__file__).parent)})
    assert (settings.embedding_model, settings.embedding_dim) == ("sentence-transformers/all-MiniLM-L6-v2", 384)


@pytest.fixture
async def local_server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(
        test_env(database_url, EMBEDDING_PROVIDER="local", EMBEDDING_MODEL_PATH=str(MODEL_DIR))
    )
    yield running
    await stop_server(running)


@needs_model
async def test_semantic_search_end_to_end(local_server: RunningServer) -> None:
    for value in ("The weather is lovely today.", "He drove to the stadium.", "Quarterly revenue grew by a third."):
        await local_server.memory.Store(
            memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value=value))
        )
    # No word in common with the memory it should find: only meaning connects them.
    for mode in (memory_pb2.SEARCH_MODE_VECTOR, memory_pb2.SEARCH_MODE_HYBRID):
        response = await local_server.memory.Search(
            memory_pb2.SearchRequest(query="It's so sunny outside!", mode=mode, top_k=3)
        )
        assert response.hits[0].memory.value == "The weather is lovely today."
        assert response.hits[0].cosine_similarity == pytest.approx(0.6660, abs=1e-3)
    embedded = await local_server.memory.Embed(memory_pb2.EmbedRequest(texts=["🎉", "He drove to the stadium."]))
    assert (embedded.model, embedded.dimension) == ("sentence-transformers/all-MiniLM-L6-v2", 384)
    assert all(math.isfinite(v) for e in embedded.embeddings for v in e.values)
    assert embedded.embeddings[1].values[:5] == pytest.approx(EXPECTED["He drove to the stadium."], abs=1e-5)


@needs_model
async def test_embedding_does_not_block_other_calls(local_server: RunningServer) -> None:
    texts = [
        f"paragraph {i}: " + "the service keeps agent memories in postgres and finds them again " * 12
        for i in range(96)
    ]
    embedding = asyncio.ensure_future(local_server.memory.Embed(memory_pb2.EmbedRequest(texts=texts)))
    answered_meanwhile = 0
    while not embedding.done():
        await local_server.memory.Stats(memory_pb2.StatsRequest())
        if not embedding.done():
            answered_meanwhile += 1
        await asyncio.sleep(0.01)
    assert len((await embedding).embeddings) == 96
    assert answered_meanwhile >= 3


async def test_wordless_queries_never_give_nan(server: RunningServer) -> None:
    # The default hash embedder: emoji and punctuation are valid memories and valid queries in every mode.
    for value in ("🎉🎉 launch party", "🎉", "?!"):
        await server.memory.Store(
            memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value=value))
        )
    for mode in (memory_pb2.SEARCH_MODE_VECTOR, memory_pb2.SEARCH_MODE_HYBRID, memory_pb2.SEARCH_MODE_TEXT):
        response = await server.memory.Search(memory_pb2.SearchRequest(query="🎉", mode=mode, top_k=5))
        for hit in response.hits:
            assert math.isfinite(hit.score)
            assert not hit.HasField("cosine_similarity") or math.isfinite(hit.cosine_similarity)
        if mode != memory_pb2.SEARCH_MODE_TEXT:
            assert response.hits[0].memory.value == "🎉"
