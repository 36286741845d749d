"""The embedder the domain uses: cache first, then the provider in batches, then the cache again.

A text already embedded with this model and dimension costs no provider call, whichever instance embedded it.
Identical texts within one request are embedded once.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from memory_service.embeddings.base import EmbeddingProvider
from memory_service.errors import FailedPrecondition
from memory_service.memories.validation import MAX_SQUARED_LENGTH, MIN_SQUARED_LENGTH
from memory_service.metrics import Metrics
from memory_service.models import Vector, content_hash
from memory_service.observability import tracing
from memory_service.storage import embedding_cache_sql
from memory_service.storage.database import Database

# Provider requests in flight per call; bounded so one large ingest cannot flood the provider.
_CONCURRENT_REQUESTS = 4
_QUERY_CACHE_SIZE = 2048


class EmbeddingService:
    def __init__(self, provider: EmbeddingProvider, db: Database, metrics: Metrics) -> None:
        self.provider = provider
        self._db = db
        self._metrics = metrics
        self._queries: collections.OrderedDict[str, Vector] = collections.OrderedDict()

    def use(self, provider: EmbeddingProvider) -> None:
        """Embed with ``provider`` from now on (a cut-over or rollback of the embedding model): the cache is keyed
        by model, so only the in-process query cache, keyed by text, is dropped."""
        if provider is not self.provider:
            self.provider = provider
            self._queries.clear()

    @property
    def model(self) -> str:
        return self.provider.model

    @property
    def dimension(self) -> int:
        return self.provider.dimension

    async def embed(self, texts: Sequence[str], hashes: Sequence[bytes] | None = None) -> list[Vector]:
        """Vectors for ``texts``, in order; ``hashes`` (SHA-256 of each text) may be passed when already known."""
        if not texts:
            return []
        digests = list(hashes) if hashes is not None else [content_hash(t) for t in texts]
        unique: dict[bytes, str] = dict(zip(digests, texts, strict=True))
        # One provider for the whole call, so a change of model meanwhile cannot file its vectors under another.
        provider = self.provider
        async with self._db.connection() as conn:
            found = await embedding_cache_sql.lookup(conn, provider.model, provider.dimension, list(unique))
        self._metrics.embedding_cache_hits.inc(sum(1 for d in digests if d in found))
        missing = [(d, t) for d, t in unique.items() if d not in found]
        if missing:
            computed = await self._embed_uncached([t for _, t in missing], provider)
            fresh = [(d, v) for (d, _), v in zip(missing, computed, strict=True)]
            async with self._db.connection() as conn:
                await embedding_cache_sql.insert(conn, provider.model, provider.dimension, fresh)
            found.update(fresh)
        return [found[d] for d in digests]

    async def embed_query(self, text: str) -> Vector:
        """A search query's vector; repeated queries are served from a small in-process cache."""
        cached = self._queries.get(text)
        if cached is not None:
            self._queries.move_to_end(text)
            self._metrics.embedding_cache_hits.inc()
            return cached
        provider = self.provider
        (vector,) = await self._embed_uncached([text], provider)
        if provider is not self.provider:
            return vector  # the model changed meanwhile: the caller's statement fails its generation check
        self._queries[text] = vector
        if len(self._queries) > _QUERY_CACHE_SIZE:
            self._queries.popitem(last=False)
        return vector

    async def _embed_uncached(self, texts: list[str], provider: EmbeddingProvider) -> list[Vector]:
        """One provider request per ``max_batch`` texts, a few in flight at once."""
        size = provider.max_batch
        batches = [texts[i : i + size] for i in range(0, len(texts), size)]
        gate = asyncio.Semaphore(_CONCURRENT_REQUESTS)

        pending = self._metrics.embedding_pending

        async def run(batch: list[str]) -> list[Vector]:
            pending.inc(len(batch))
            try:
                async with gate:
                    with tracing.span("embedding", provider=provider.name, texts=len(batch)):
                        array = np.asarray(await provider.embed_batch(batch), dtype=np.float32)
            finally:
                pending.dec(len(batch))
            self._metrics.embedding_texts.labels(provider.name).inc(len(batch))
            _check_usable(array)
            return list(array)

        results = await asyncio.gather(*(run(b) for b in batches))
        return [vector for batch in results for vector in batch]

    async def close(self) -> None:
        await self.provider.close()

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @property
    def db(self) -> Database:
        return self._db


def _check_usable(vectors: npt.NDArray[np.float32]) -> None:
    """A zero, non-finite or out-of-range vector has no cosine in pgvector: stored, every search that meets it
    would rank it by a NaN or wrong distance (the bounds are the ones a caller's vector is held to,
    ``memories.validation``)."""
    wide = vectors.astype(np.float64)
    squared_lengths = np.einsum("ij,ij->i", wide, wide)
    if not ((squared_lengths >= MIN_SQUARED_LENGTH) & (squared_lengths <= MAX_SQUARED_LENGTH)).all():
        raise FailedPrecondition(
            "the embedding provider returned a zero, non-finite or out-of-range vector; it cannot be compared by "
            "cosine similarity"
        )
