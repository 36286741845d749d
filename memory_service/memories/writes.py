"""What every memory write shares, coded once for Store and BulkStore: resolving the embeddings it stores, and the
transaction that binds the model, checks fences and records who wrote.

Embeddings are resolved here and nowhere else, so a rule about which vectors a write stores (a second model, say)
changes one place and holds for both paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from memory_service.embeddings.service import EmbeddingService
from memory_service.memories.binding import ModelBinding
from memory_service.models import Fence, NewMemory, Vector, WriteContext
from memory_service.storage import memories_sql
from memory_service.storage.database import Connection, Database
from memory_service.storage.fencing import check_fence


class WritePath:
    def __init__(self, db: Database, embedder: EmbeddingService, binding: ModelBinding, *, history: bool) -> None:
        self._db = db
        self._embedder = embedder
        self._binding = binding
        self._history = history
        """Record a version of every change (HISTORY_VERSIONS)."""

    @property
    def model(self) -> str:
        """The embedding model the written vectors belong to."""
        return self._embedder.model

    async def embeddings(self, memories: Sequence[NewMemory]) -> list[Vector]:
        """One vector per memory: the one given; else the stored one when the content is unchanged; else embed.

        Content already stored under its identity is never embedded again, so a reloaded file or a repeated Store
        costs no embedding work.
        """
        vectors: list[Vector | None] = [m.embedding for m in memories]
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            async with self._db.connection() as conn:
                stored = await memories_sql.stored_embeddings(conn, [memories[i] for i in missing], self.model)
            for position, vector in stored.items():
                vectors[missing[position]] = vector
            missing = [i for i in missing if vectors[i] is None]
        if missing:
            # One provider request per provider batch (EmbeddingService), not per row.
            computed = await self._embedder.embed(
                [memories[i].value for i in missing], [memories[i].content_hash for i in missing]
            )
            for i, vector in zip(missing, computed, strict=True):
                vectors[i] = vector
        result = [v for v in vectors if v is not None]
        assert len(result) == len(memories)
        return result

    def versions(self, context: WriteContext, fences: Sequence[Fence] = ()) -> WriteContext | None:
        """What the write's versions record about the writer (the last fence's token); None when history is off."""
        if not self._history:
            return None
        if fences:
            return dataclasses.replace(context, fencing_token=fences[-1].token)
        return context

    @asynccontextmanager
    async def transaction(self, fences: Sequence[Fence] = ()) -> AsyncIterator[Connection]:
        """A transaction that stores embeddings: binds the model first, refuses a superseded fence, and tells the
        binding once it committed."""
        async with self._db.transaction() as conn:
            bound_now = await self._binding.ensure(conn)
            for fence in fences:
                await check_fence(conn, fence)
            yield conn
        await self._binding.committed(bound_now)
