"""MemoryService over gRPC: converts messages, calls the domain, converts back.

Errors are raised as domain errors; the interceptor maps them to status codes in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from grpc import aio

from memory_service.api import convert, history_convert
from memory_service.api.interceptor import current_principal
from memory_service.api.stats_convert import stats_to_proto
from memory_service.config.settings import Settings
from memory_service.embeddings.service import EmbeddingService
from memory_service.errors import InvalidArgument
from memory_service.history.feed import ChangeFeed, decode_cursor
from memory_service.history.service import History
from memory_service.memories import ingest, validation
from memory_service.memories.stats import Stats
from memory_service.memories.store import MemoryStore
from memory_service.models import WriteContext
from memory_service.search import SearchEngine
from memory_service.v1 import memory_pb2, memory_pb2_grpc


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(
        self,
        settings: Settings,
        *,
        memories: MemoryStore,
        search: SearchEngine,
        embedder: EmbeddingService,
        bulk: ingest.BulkIngest,
        stats: Callable[[], Awaitable[Stats]],
        history: History,
        feed: ChangeFeed,
    ) -> None:
        self._settings = settings
        self._memories = memories
        self._search = search
        self._embedder = embedder
        self._bulk = bulk
        self._stats = stats
        self._history = history
        self._feed = feed

    async def Store(self, request: memory_pb2.StoreRequest, context: aio.ServicerContext) -> memory_pb2.StoreResponse:
        if not request.HasField("memory"):
            raise InvalidArgument("memory", "is required")
        memory = convert.new_memory_from_proto(request.memory, self._settings, self._embedder.dimension, "memory")
        result = await self._memories.store(
            memory, fence=convert.fence_from_proto(request.fence), context=_writer(context)
        )
        return memory_pb2.StoreResponse(id=result.id, outcome=convert.outcome_to_proto(result.outcome), key=result.key)

    async def BulkStore(
        self, request_iterator: AsyncIterator[memory_pb2.BulkStoreRequest], context: aio.ServicerContext
    ) -> AsyncIterator[memory_pb2.BulkStoreAck]:
        settings = self._settings
        dimension = self._embedder.dimension

        def item(message: memory_pb2.BulkItem) -> ingest.BulkItem:
            """An invalid item becomes its rejection; fields are named relative to the item ("memory.value")."""
            try:
                if not message.HasField("memory"):
                    raise InvalidArgument("memory", "is required")
                memory = convert.new_memory_from_proto(message.memory, settings, dimension, "memory")
            except InvalidArgument as error:
                return ingest.BulkItem(sequence=message.sequence, memory=error)
            return ingest.BulkItem(sequence=message.sequence, memory=memory)

        async def requests() -> AsyncIterator[ingest.BulkRequest]:
            async for message in request_iterator:
                items = await self._bulk.items(message.items, item)
                yield ingest.BulkRequest(items=items, fence=convert.fence_from_proto(message.fence))

        async for ack in self._bulk.run(requests(), _writer(context)):
            yield convert.bulk_ack_to_proto(ack)

    async def Get(self, request: memory_pb2.GetRequest, context: aio.ServicerContext) -> memory_pb2.GetResponse:
        memory_id = validation.check_id("id", request.id)
        if request.HasField("as_of"):
            memory = await self._history.get_as_of(memory_id, history_convert.as_of(request.as_of))
        else:
            memory = await self._memories.get(memory_id, with_embedding=request.include_embedding)
        response = memory_pb2.GetResponse()
        convert.fill_memory(response.memory, memory)
        return response

    async def Delete(
        self, request: memory_pb2.DeleteRequest, context: aio.ServicerContext
    ) -> memory_pb2.DeleteResponse:
        target = request.WhichOneof("target")
        deleted = await self._memories.delete(
            memory_id=request.id if target == "id" else None,
            memory_filter=convert.filter_from_proto(request.filter) if target == "filter" else None,
            context=_writer(context),
        )
        return memory_pb2.DeleteResponse(deleted=deleted)

    async def List(self, request: memory_pb2.ListRequest, context: aio.ServicerContext) -> memory_pb2.ListResponse:
        page_size = validation.check_limit(
            "page_size", request.page_size, default=100, maximum=self._settings.list_max_page_size
        )
        memory_filter = convert.filter_from_proto(request.filter)
        if request.HasField("as_of"):
            memories, token = await self._history.list_as_of(
                memory_filter, history_convert.as_of(request.as_of), page_size=page_size, page_token=request.page_token
            )
        else:
            memories, token = await self._memories.list(
                memory_filter,
                page_size=page_size,
                page_token=request.page_token,
                with_embedding=request.include_embedding,
            )
        response = memory_pb2.ListResponse(next_page_token=token)
        for memory in memories:
            convert.fill_memory(response.memories.add(), memory)
        return response

    async def Search(
        self, request: memory_pb2.SearchRequest, context: aio.ServicerContext
    ) -> memory_pb2.SearchResponse:
        query = convert.search_query_from_proto(request, self._settings, self._embedder.dimension)
        return convert.search_result_to_proto(await self._search.search(query))

    async def Embed(self, request: memory_pb2.EmbedRequest, context: aio.ServicerContext) -> memory_pb2.EmbedResponse:
        texts = validation.check_texts(
            "texts", request.texts, max_texts=self._settings.embed_max_texts, max_bytes=self._settings.max_text_bytes
        )
        vectors = await self._embedder.embed(texts)
        return convert.embed_response(vectors, model=self._embedder.model, dimension=self._embedder.dimension)

    async def Stats(self, request: memory_pb2.StatsRequest, context: aio.ServicerContext) -> memory_pb2.StatsResponse:
        return stats_to_proto(await self._stats())

    async def History(
        self, request: memory_pb2.HistoryRequest, context: aio.ServicerContext
    ) -> memory_pb2.HistoryResponse:
        page_size = validation.check_limit(
            "page_size", request.page_size, default=100, maximum=self._settings.list_max_page_size
        )
        versions, token = await self._history.versions(
            validation.check_id("id", request.id), page_size=page_size, page_token=request.page_token
        )
        return memory_pb2.HistoryResponse(
            versions=[history_convert.version_to_proto(v) for v in versions], next_page_token=token
        )

    async def Erase(self, request: memory_pb2.EraseRequest, context: aio.ServicerContext) -> memory_pb2.EraseResponse:
        scope, memory_id, wire_filter = history_convert.erase_target(request)
        memory_filter = None if wire_filter is None else convert.filter_from_proto(wire_filter)
        receipt = await self._history.erase(scope, memory_id=memory_id, memory_filter=memory_filter)
        return history_convert.receipt_to_proto(receipt)

    async def Watch(
        self, request: memory_pb2.WatchRequest, context: aio.ServicerContext
    ) -> AsyncIterator[memory_pb2.Change]:
        memory_filter = convert.filter_from_proto(request.filter)
        after = decode_cursor(request.after)
        async for change in self._feed.watch(memory_filter, after=after, include_memory=request.include_memory):
            yield history_convert.change_to_proto(change)


def _writer(context: aio.ServicerContext) -> WriteContext:
    return history_convert.write_context(current_principal.get(), context.invocation_metadata())
