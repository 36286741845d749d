"""``MemoryClient``'s calls for history and changes: History, as-of Get, Erase and Watch (docs/history.md).

async for change in client.watch(after=last_cursor, scope="agent", scope_id=7):
    ...                      # remember change.cursor; call watch(after=it) again after a broken stream
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

from memory_service.client.wire import scope_value
from memory_service.v1 import memory_pb2, memory_pb2_grpc


class HistoryCalls:
    """Mixed into ``MemoryClient``, which provides the stub and the deadline."""

    memory: memory_pb2_grpc.MemoryServiceStub
    timeout: float

    async def history(self, memory_id: int, *, page_size: int = 100) -> list[memory_pb2.MemoryVersion]:
        """Every version of a memory, newest first (all pages)."""
        versions: list[memory_pb2.MemoryVersion] = []
        token = ""
        while True:
            page = await self.memory.History(
                memory_pb2.HistoryRequest(id=memory_id, page_size=page_size, page_token=token), timeout=self.timeout
            )
            versions.extend(page.versions)
            token = page.next_page_token
            if not token:
                return versions

    async def get_as_of(self, memory_id: int, as_of: datetime) -> memory_pb2.Memory:
        """The memory as it was live at ``as_of`` (an aware datetime); NOT_FOUND when it was not."""
        request = memory_pb2.GetRequest(id=memory_id)
        request.as_of.FromDatetime(as_of)
        response = await self.memory.Get(request, timeout=self.timeout)
        return response.memory  # type: ignore[no-any-return]

    async def erase(
        self, *, scope: str, scope_id: int | None = None, memory_id: int | None = None
    ) -> memory_pb2.EraseResponse:
        """Erase one memory (``memory_id``) or every memory of the scope, for good; answers the receipt."""
        request = memory_pb2.EraseRequest(scope=memory_pb2.ScopeRef(scope=scope_value(scope)))
        if scope_id is not None:
            request.scope.scope_id = scope_id
        if memory_id is not None:
            request.id = memory_id
        else:
            request.filter.SetInParent()
        response: memory_pb2.EraseResponse = await self.memory.Erase(request, timeout=self.timeout)
        return response

    def watch(
        self,
        *,
        after: str = "",
        scope: str | None = None,
        scope_id: int | None = None,
        include_memory: bool = False,
    ) -> AsyncIterator[memory_pb2.Change]:
        """Changes after the cursor ``after``, as they commit; no deadline (the stream runs until cancelled).

        Resume a broken stream by calling again with the ``cursor`` of the last change received.
        """
        request = memory_pb2.WatchRequest(after=after, include_memory=include_memory)
        if scope is not None:
            ref = request.filter.scopes.add(scope=scope_value(scope))
            if scope_id is not None:
                ref.scope_id = scope_id
        return self.memory.Watch(request)  # type: ignore[no-any-return]
