"""MemoryService over gRPC: converts messages, calls the domain, converts back.

Errors are raised as domain errors; the interceptor maps them to status codes in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpc import aio

from memory_service import ingest, validation
from memory_service.api import convert
from memory_service.errors import InvalidArgument
from memory_service.runtime import Runtime
from memory_service.v1 import memory_pb2, memory_pb2_grpc


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._settings = runtime.settings

    async def Store(self, request: memory_pb2.StoreRequest, context: aio.ServicerContext) -> memory_pb2.StoreResponse:
        if not request.HasField("memory"):
            raise InvalidArgument("memory", "is required")
        memory = convert.new_memory_from_proto(
            request.memory, self._settings, self._runtime.embedder.dimension, "memory"
        )
        result = await self._runtime.memories.store(memory, fence=convert.fence_from_proto(request.fence))
        return memory_pb2.StoreResponse(id=result.id, outcome=convert.outcome_to_proto(result.outcome), key=result.key)

    async def BulkStore(
        self, request_iterator: AsyncIterator[memory_pb2.BulkStoreRequest], context: aio.ServicerContext
    ) -> AsyncIterator[memory_pb2.BulkStoreAck]:
        settings = self._settings
        dimension = self._runtime.embedder.dimension

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
                ingest.check_request_size(len(message.items), settings.bulk_max_items_per_request)
                fence = convert.fence_from_proto(message.fence)
                items: list[ingest.BulkItem] = []
                for start in range(0, len(message.items), 50):
                    if start:
                        # Converting a full request takes tens of milliseconds; yielding between slices lets the
                        # writer go on with its batch as soon as the database answers.
                        await asyncio.sleep(0)
                    items.extend(item(m) for m in message.items[start : start + 50])
                yield ingest.BulkRequest(items=items, fence=fence)

        bulk = ingest.BulkIngest(
            self._runtime.db,
            self._runtime.embedder,
            self._runtime.metrics,
            batch_rows=settings.bulk_batch_rows,
            queue_depth=settings.bulk_queue_depth,
            max_items_per_request=settings.bulk_max_items_per_request,
            stopping=self._runtime.stopping,
        )
        async for ack in bulk.run(requests()):
            yield memory_pb2.BulkStoreAck(
                durable_sequence=ack.durable_sequence,
                created=ack.created,
                updated=ack.updated,
                unchanged=ack.unchanged,
                rejected=ack.rejected,
                rejections=[
                    memory_pb2.Rejection(sequence=r.sequence, field=r.field, reason=r.reason) for r in ack.rejections
                ],
            )

    async def Get(self, request: memory_pb2.GetRequest, context: aio.ServicerContext) -> memory_pb2.GetResponse:
        memory_id = validation.check_id("id", request.id)
        memory = await self._runtime.memories.get(memory_id, with_embedding=request.include_embedding)
        return memory_pb2.GetResponse(memory=convert.memory_to_proto(memory))

    async def Delete(
        self, request: memory_pb2.DeleteRequest, context: aio.ServicerContext
    ) -> memory_pb2.DeleteResponse:
        target = request.WhichOneof("target")
        if target == "id":
            deleted = await self._runtime.memories.delete(validation.check_id("id", request.id))
        elif target == "filter":
            deleted = await self._runtime.memories.delete_matching(convert.filter_from_proto(request.filter))
        else:
            raise InvalidArgument("target", "give an id or a filter")
        return memory_pb2.DeleteResponse(deleted=deleted)

    async def List(self, request: memory_pb2.ListRequest, context: aio.ServicerContext) -> memory_pb2.ListResponse:
        page_size = validation.check_limit(
            "page_size", request.page_size, default=100, maximum=self._settings.list_max_page_size
        )
        memories, token = await self._runtime.memories.list(
            convert.filter_from_proto(request.filter),
            page_size=page_size,
            page_token=request.page_token,
            with_embedding=request.include_embedding,
        )
        return memory_pb2.ListResponse(memories=[convert.memory_to_proto(m) for m in memories], next_page_token=token)

    async def Search(
        self, request: memory_pb2.SearchRequest, context: aio.ServicerContext
    ) -> memory_pb2.SearchResponse:
        query = convert.search_query_from_proto(request, self._settings, self._runtime.embedder.dimension)
        return convert.search_result_to_proto(await self._runtime.search.search(query))

    async def Embed(self, request: memory_pb2.EmbedRequest, context: aio.ServicerContext) -> memory_pb2.EmbedResponse:
        limit = self._settings.embed_max_texts
        if not request.texts:
            raise InvalidArgument("texts", "must hold at least one text")
        if len(request.texts) > limit:
            raise InvalidArgument("texts", f"holds {len(request.texts)} texts; the limit is {limit}")
        texts = [
            validation.check_text(f"texts[{i}]", t, max_bytes=self._settings.max_text_bytes)
            for i, t in enumerate(request.texts)
        ]
        vectors = await self._runtime.embedder.embed(texts)
        return memory_pb2.EmbedResponse(
            embeddings=[memory_pb2.Embedding(values=v.tolist()) for v in vectors],
            model=self._runtime.embedder.model,
            dimension=self._runtime.embedder.dimension,
        )

    async def Stats(self, request: memory_pb2.StatsRequest, context: aio.ServicerContext) -> memory_pb2.StatsResponse:
        stats = await self._runtime.stats()
        response = memory_pb2.StatsResponse(
            memories=stats.memories,
            by_scope=[
                memory_pb2.ScopeCount(scope=convert.scope_to_proto(scope), memories=count)
                for scope, count in sorted(stats.by_scope.items())
            ],
            expired_pending_purge=stats.expired_pending_purge,
            embedding_model=stats.embedding_model,
            dimension=stats.dimension,
            pgvector_version=stats.pgvector_version,
            postgres_version=stats.postgres_version,
            iterative_scan=stats.iterative_scan,
            index=memory_pb2.IndexState(
                exists=stats.index.exists,
                valid=stats.index.valid,
                lists=stats.index.lists,
                rows_at_build=stats.index.rows_at_build,
                exact_threshold=stats.exact_threshold,
            ),
            embedding_cache_entries=stats.embedding_cache_entries,
        )
        if stats.index.built_at is not None:
            response.index.built_at.FromDatetime(stats.index.built_at)
        return response
