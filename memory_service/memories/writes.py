"""What every memory write shares, coded once for Store and BulkStore: resolving the embeddings it stores, and the
transaction that binds the model, checks fences and records who wrote.

Embeddings are resolved here and nowhere else, so a rule about which vectors a write stores holds for both paths.
During a move of embedding models (docs/model-migration.md) that rule is: the current generation's vector and, when
this instance has the other model, the other generation's too, so nothing written during a backfill is missed; a
write whose generation a cut-over or rollback replaced before it committed runs again with vectors of the new one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from memory_service.embeddings.service import EmbeddingService
from memory_service.errors import GenerationChanged
from memory_service.generations.state import WRITE_ATTEMPTS, Generations, Writing
from memory_service.memories.binding import ModelBinding
from memory_service.models import Fence, NewMemory, Vector, WriteContext
from memory_service.storage import memories_sql
from memory_service.storage.database import Connection, Database
from memory_service.storage.fencing import check_fence

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Embedded:
    """A write's vectors, all made for one embedding generation (``generation``, the epoch its statement names)."""

    generation: int
    model: str
    """The current generation's model: it made ``vectors``."""
    vectors: list[Vector]
    others: list[Vector | None]
    """The other generation's vectors during a move; None where there is none to write (the backfill fills them)."""


class WritePath:
    def __init__(
        self,
        db: Database,
        embedder: EmbeddingService,
        binding: ModelBinding,
        *,
        history: bool,
        generations: Generations | None = None,
    ) -> None:
        self._db = db
        self._embedder = embedder
        self._binding = binding
        self._history = history
        """Record a version of every change (HISTORY_VERSIONS)."""
        self._generations = generations

    def _writing(self) -> Writing:
        if self._generations is None:
            return Writing(epoch=0, current=self._embedder, other=None)
        return self._generations.writing()

    async def embeddings(self, memories: Sequence[NewMemory]) -> Embedded:
        """The current generation's vector of each memory: the one given; else the stored one when the content is
        unchanged; else embedded. During a move, the other generation's as well.

        Content already stored under its identity is never embedded again, so a reloaded file or a repeated Store
        costs no embedding work. The generation is fixed before anything is embedded: a change of it afterwards
        fails the write's statement instead of storing vectors of one model under the other's name.
        """
        writing = self._writing()
        model = writing.current.model
        vectors: list[Vector | None] = [m.embedding for m in memories]
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            async with self._db.connection() as conn:
                stored = await memories_sql.stored_embeddings(conn, [memories[i] for i in missing])
            for position, vector in stored.items():
                vectors[missing[position]] = vector
            missing = [i for i in missing if vectors[i] is None]
        if missing:
            # One provider request per provider batch (EmbeddingService), not per row.
            computed = await writing.current.embed(
                [memories[i].value for i in missing], [memories[i].content_hash for i in missing]
            )
            for i, vector in zip(missing, computed, strict=True):
                vectors[i] = vector
        result = [v for v in vectors if v is not None]
        assert len(result) == len(memories)
        others = await writing.others([m.value for m in memories], [m.content_hash for m in memories])
        return Embedded(generation=writing.epoch, model=model, vectors=result, others=others)

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

    async def write(
        self,
        memories: Sequence[NewMemory],
        embedded: Embedded,
        fences: Sequence[Fence],
        body: Callable[[Connection, Embedded], Awaitable[T]],
    ) -> T:
        """``body`` in the write's transaction with ``embedded``; when a cut-over or rollback replaced its generation
        before it committed (GenerationChanged: nothing was written), again with the memories embedded anew."""
        attempt = 1
        while True:
            try:
                async with self.transaction(fences) as conn:
                    result = await body(conn, embedded)
                return result
            except GenerationChanged:
                if self._generations is None or attempt >= WRITE_ATTEMPTS:
                    raise
                attempt += 1
                await self._generations.refresh()
                embedded = await self.embeddings(memories)
