"""Storing, reading, listing and deleting memories: the rules, not the SQL."""

from __future__ import annotations

import logging

from memory_service import pagination
from memory_service.embeddings.service import EmbeddingService
from memory_service.errors import InvalidArgument, NotFound
from memory_service.generations.state import Generations
from memory_service.memories import validation
from memory_service.memories.binding import ModelBinding
from memory_service.memories.writes import Embedded, WritePath
from memory_service.models import (
    NO_CONTEXT,
    Fence,
    Memory,
    MemoryFilter,
    NewMemory,
    StoreResult,
    WriteContext,
    WriteOutcome,
)
from memory_service.storage import memories_sql
from memory_service.storage.database import Connection, Database
from memory_service.tenants import guard

log = logging.getLogger(__name__)


class MemoryStore:
    def __init__(
        self,
        db: Database,
        embedder: EmbeddingService,
        binding: ModelBinding,
        *,
        history: bool = True,
        generations: Generations | None = None,
    ) -> None:
        self._db = db
        self._writes = WritePath(db, embedder, binding, history=history, generations=generations)

    async def store(
        self, memory: NewMemory, *, fence: Fence | None = None, context: WriteContext = NO_CONTEXT
    ) -> StoreResult:
        """Upsert by identity. Content already stored under this identity is never embedded again; during a move of
        embedding models both generations' vectors are stored (WritePath)."""
        guard.check_scope(memory.scope, memory.scope_id, "memory.scope")
        fences = () if fence is None else (fence,)
        history = self._writes.versions(context, fences)

        async def upsert(conn: Connection, embedded: Embedded) -> tuple[int, WriteOutcome]:
            return await memories_sql.upsert(
                conn,
                memory,
                embedded.vectors[0],
                embedded.model,
                history=history,
                other=embedded.others[0],
                generation=embedded.generation,
            )

        memories = [memory]
        memory_id, outcome = await self._writes.write(memories, await self._writes.embeddings(memories), fences, upsert)
        return StoreResult(id=memory_id, key=memory.key, outcome=outcome)

    async def get(self, memory_id: int, *, with_embedding: bool = False) -> Memory:
        async with self._db.connection() as conn:
            memory = await memories_sql.get(conn, memory_id, with_embedding=with_embedding)
        missing = f"no live memory with id {memory_id}"
        if memory is None:
            raise NotFound(missing)
        guard.check_visible(memory.scope, memory.scope_id, missing)
        return memory

    async def delete(
        self,
        *,
        memory_id: int | None = None,
        memory_filter: MemoryFilter | None = None,
        context: WriteContext = NO_CONTEXT,
    ) -> int:
        """Delete the memory with this id, or every memory matching this filter: exactly one must be given."""
        if memory_id is not None:
            return await self._delete_by_id(validation.check_id("id", memory_id), context=context)
        if memory_filter is None:
            raise InvalidArgument("id", "give an id or a filter (neither is set)", also=("filter",))
        return await self._delete_matching(memory_filter, context=context)

    async def _delete_by_id(self, memory_id: int, *, context: WriteContext) -> int:
        """Deleting a missing memory is not an error, so a retried delete is safe."""
        async with self._db.transaction() as conn:
            if guard.scoped():
                scope = await memories_sql.lock_scope_of(conn, memory_id)
                if scope is None or not guard.sees(*scope):
                    return 0  # as for a missing id
            return await memories_sql.delete_by_id(conn, memory_id, history=self._writes.versions(context))

    async def _delete_matching(self, memory_filter: MemoryFilter, *, context: WriteContext) -> int:
        if memory_filter.is_empty:
            raise InvalidArgument("filter", "must name at least one condition; an empty filter would delete everything")
        memory_filter = guard.narrow(memory_filter)
        async with self._db.transaction() as conn:
            return await memories_sql.delete_matching(conn, memory_filter, history=self._writes.versions(context))

    async def list(
        self, memory_filter: MemoryFilter, *, page_size: int, page_token: str, with_embedding: bool = False
    ) -> tuple[list[Memory], str]:
        """One page in id order and the token of the next page ("" on the last)."""
        memory_filter = guard.narrow(memory_filter)
        binding = pagination.filter_binding(memory_filter)
        after = pagination.MEMORY_LIST.decode(page_token, binding=binding)
        async with self._db.connection() as conn:
            rows = await memories_sql.list_page(
                conn,
                memory_filter,
                after_id=after[0] if after else 0,
                limit=page_size + 1,
                with_embedding=with_embedding,
            )
        page = rows[:page_size]
        next_token = pagination.MEMORY_LIST.encode(page[-1].id, binding=binding) if len(rows) > page_size else ""
        return page, next_token
