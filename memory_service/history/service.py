"""Reading the past and forgetting for good: History, as-of reads, Erase, and the retention purge."""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta

from memory_service import pagination
from memory_service.errors import InvalidArgument, NotFound
from memory_service.history.types import EraseReceipt, Version
from memory_service.memories.purge import in_batches
from memory_service.metrics import Metrics
from memory_service.models import Memory, MemoryFilter, ScopeRef
from memory_service.storage import history_sql
from memory_service.storage.database import Connection, Database
from memory_service.tenants import guard

log = logging.getLogger(__name__)


class History:
    def __init__(self, db: Database, metrics: Metrics, *, retention: timedelta) -> None:
        self._db = db
        self._metrics = metrics
        self.retention = retention

    async def versions(self, memory_id: int, *, page_size: int, page_token: str) -> tuple[list[Version], str]:
        """One page of a memory's versions, newest first, and the next page's token ("" on the last)."""
        binding = str(memory_id)
        position = pagination.HISTORY.decode(page_token, binding=binding)
        before = position[0] if position else pagination.INT32_MAX
        async with self._db.connection() as conn:
            rows = await history_sql.history_page(conn, memory_id, before=before, limit=page_size + 1)
        missing = f"no history for memory {memory_id}"
        if rows:
            guard.check_visible(rows[0].memory.scope, rows[0].memory.scope_id, missing)  # a memory keeps its scope
        elif not page_token:
            raise NotFound(missing)
        page = rows[:page_size]
        token = pagination.HISTORY.encode(page[-1].version, binding=binding) if len(rows) > page_size else ""
        return page, token

    async def get_as_of(self, memory_id: int, at: datetime) -> Memory:
        async with self._db.connection() as conn:
            memory = await history_sql.get_as_of(conn, memory_id, at)
        missing = f"no memory with id {memory_id} was live at {at.isoformat()}"
        if memory is None:
            raise NotFound(missing)
        guard.check_visible(memory.scope, memory.scope_id, missing)
        return memory

    async def list_as_of(
        self, memory_filter: MemoryFilter, at: datetime, *, page_size: int, page_token: str
    ) -> tuple[list[Memory], str]:
        """One page, in id order, of what was live at ``at``; tokens are bound to the filter and the time."""
        memory_filter = guard.narrow(memory_filter)
        binding = pagination.filter_binding(memory_filter, at.isoformat())
        after = pagination.MEMORY_LIST_AS_OF.decode(page_token, binding=binding)
        async with self._db.connection() as conn:
            rows = await history_sql.list_as_of(
                conn, memory_filter, at, after_id=after[0] if after else 0, limit=page_size + 1
            )
        page = rows[:page_size]
        next_id = page[-1].id if len(rows) > page_size else None
        return page, "" if next_id is None else pagination.MEMORY_LIST_AS_OF.encode(next_id, binding=binding)

    async def erase(
        self, scope: ScopeRef | None, *, memory_id: int | None, memory_filter: MemoryFilter | None
    ) -> EraseReceipt:
        """Remove for good the memories in ``scope`` with this id, or matching this filter (live or deleted)."""
        if memory_id is None and memory_filter is None:
            raise InvalidArgument("id", "give an id or a filter (neither is set)", also=("filter",))
        if scope is None:
            raise InvalidArgument("scope", "is required: an erase names the scope it erases in")
        if memory_filter is not None and memory_filter.scopes:
            raise InvalidArgument("filter.scopes", "must be empty: the erase's scope is given in 'scope'")
        guard.check_scope(scope.scope, scope.scope_id, "scope")
        target = dataclasses.replace(memory_filter or MemoryFilter(), scopes=(scope,))
        async with self._db.transaction() as conn:
            receipt = await history_sql.erase(conn, target, memory_id)
        log.info(
            "erased %d memories (%d versions, %d cached embeddings)",
            len(receipt.memory_ids),
            receipt.versions,
            receipt.cached_embeddings,
        )
        return receipt

    async def purge(self) -> int:
        """Delete versions and change-log entries older than the retention, in batches."""

        async def delete(conn: Connection, batch: int) -> int:
            return await history_sql.purge_history(conn, self.retention, batch=batch)

        total = await in_batches(self._db, delete, counted=self._metrics.history_purged.inc)
        if total:
            log.info("purged %d versions and change-log entries past the history retention", total)
        return total
