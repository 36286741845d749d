"""A Python client over the generated stubs: deadlines on every call and retries of UNAVAILABLE.

    async with MemoryClient("localhost:50051") as client:
        await client.store("Alice prefers tea", scope="agent", scope_id=7)
        response = await client.search("what does Alice drink?", scope="agent", scope_id=7)

Retries use gRPC's own retry policy (exponential backoff, UNAVAILABLE only), so a call is retried only when the
server never started it or reported it could not reach its dependencies. Every write is an upsert by identity,
so a retried Store cannot duplicate a memory.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any

from memory_service.client.bulk import BulkSummary, Entry, ResumableBulkStore, numbered
from memory_service.client.channel import DEFAULT_ADDRESS, open_channel
from memory_service.client.history import HistoryCalls
from memory_service.client.hold import HeldLease
from memory_service.client.wire import duration, memory_input, mode_value, scope_filter
from memory_service.v1 import lease_pb2, lease_pb2_grpc, memory_pb2, memory_pb2_grpc


class MemoryClient(HistoryCalls):
    """Thin, typed conveniences, one method per RPC; ``.memory`` and ``.leases`` expose the raw stubs.

    Every call carries the client's deadline (``timeout``; an Acquire adds its ``wait``) and is retried on
    UNAVAILABLE by the channel's retry policy; ``bulk_store`` resumes a broken stream on its own and ``hold``
    keeps a lease over the Hold stream for an ``async with`` block.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float = 10.0,
        attempts: int = 4,
    ) -> None:
        self.channel = open_channel(
            address, token=token, tls=tls, root_certificates=root_certificates, attempts=attempts
        )
        self.memory = memory_pb2_grpc.MemoryServiceStub(self.channel)
        self.leases = lease_pb2_grpc.LeaseServiceStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> MemoryClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def store(
        self,
        value: str,
        *,
        scope: str = "global",
        scope_id: int = 0,
        key: str = "",
        memory_type: str = "fact",
        importance: float | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        agent_id: int | None = None,
        ttl_seconds: float | None = None,
    ) -> memory_pb2.StoreResponse:
        memory = memory_input(
            value,
            scope=scope,
            scope_id=scope_id,
            key=key,
            memory_type=memory_type,
            importance=importance,
            tags=tags,
            metadata=metadata,
            agent_id=agent_id,
            ttl_seconds=ttl_seconds,
        )
        response: memory_pb2.StoreResponse = await self.memory.Store(
            memory_pb2.StoreRequest(memory=memory), timeout=self.timeout
        )
        return response

    async def bulk_store(
        self,
        items: Iterable[Entry] | AsyncIterable[Entry],
        *,
        batch_size: int = 500,
        window: int = 10_000,
        fence: memory_pb2.Fence | None = None,
        retry_timeout: float = 300.0,
        on_ack: Callable[[memory_pb2.BulkStoreAck], None] | None = None,
    ) -> BulkSummary:
        """Stream memories through BulkStore, numbered 1, 2, ... in source order, resuming after a broken stream.

        Items are MemoryInputs or dicts of ``store``'s keywords (plus ``embedding``). At most ``window`` items are
        unacknowledged at a time: the source is read no faster than the server commits. The summary's
        ``rejections`` name each rejected item by its sequence number. Raises the server's error when resending
        cannot help (ABORTED by a superseded ``fence``, INVALID_ARGUMENT), TimeoutError when the server stays
        unreachable or overloaded for ``retry_timeout`` seconds, and ValueError for a dict with an unknown name.
        """
        engine = ResumableBulkStore(
            self.memory,
            numbered(items, lambda entry: memory_input(**entry)),
            batch_size=batch_size,
            window=window,
            fence=fence,
            retry_timeout=retry_timeout,
            on_ack=on_ack,
        )
        return await engine.run()

    async def get(self, memory_id: int) -> memory_pb2.Memory:
        response = await self.memory.Get(memory_pb2.GetRequest(id=memory_id), timeout=self.timeout)
        return response.memory  # type: ignore[no-any-return]

    async def search(
        self,
        query: str,
        *,
        mode: str = "hybrid",
        top_k: int = 10,
        scope: str | None = None,
        scope_id: int | None = None,
    ) -> memory_pb2.SearchResponse:
        request = memory_pb2.SearchRequest(
            query=query, mode=mode_value(mode), top_k=top_k, filter=scope_filter(scope, scope_id)
        )
        response: memory_pb2.SearchResponse = await self.memory.Search(request, timeout=self.timeout)
        return response

    async def stats(self) -> memory_pb2.StatsResponse:
        response: memory_pb2.StatsResponse = await self.memory.Stats(memory_pb2.StatsRequest(), timeout=self.timeout)
        return response

    async def list_pages(
        self,
        memory_filter: memory_pb2.MemoryFilter | None = None,
        *,
        page_size: int = 100,
        include_embedding: bool = False,
    ) -> AsyncIterator[memory_pb2.ListResponse]:
        """Every page of a List, in id order; each page is one call with its own deadline and retries."""
        token = ""
        while True:
            request = memory_pb2.ListRequest(
                filter=memory_filter, page_size=page_size, page_token=token, include_embedding=include_embedding
            )
            page: memory_pb2.ListResponse = await self.memory.List(request, timeout=self.timeout)
            yield page
            token = page.next_page_token
            if not token:
                return

    async def list_memories(
        self,
        memory_filter: memory_pb2.MemoryFilter | None = None,
        *,
        page_size: int = 100,
        include_embedding: bool = False,
    ) -> AsyncIterator[memory_pb2.Memory]:
        """Every memory the filter matches, a page at a time: ``async for memory in client.list_memories(...)``."""
        async for page in self.list_pages(memory_filter, page_size=page_size, include_embedding=include_embedding):
            for memory in page.memories:
                yield memory

    async def delete(self, memory_id: int) -> int:
        """Delete one memory; 0 when it did not exist, so a retried delete is safe."""
        response = await self.memory.Delete(memory_pb2.DeleteRequest(id=memory_id), timeout=self.timeout)
        return int(response.deleted)

    async def delete_matching(self, memory_filter: memory_pb2.MemoryFilter) -> int:
        """Delete every memory the (non-empty) filter matches; the count deleted."""
        response = await self.memory.Delete(memory_pb2.DeleteRequest(filter=memory_filter), timeout=self.timeout)
        return int(response.deleted)

    async def embed(self, texts: list[str]) -> memory_pb2.EmbedResponse:
        response: memory_pb2.EmbedResponse = await self.memory.Embed(
            memory_pb2.EmbedRequest(texts=texts), timeout=self.timeout
        )
        return response

    async def acquire(
        self,
        name: str,
        *,
        namespace: str = "default",
        ttl: float = 30.0,
        wait: float = 0.0,
        holder: str = "",
        request_id: str | None = None,
    ) -> lease_pb2.AcquireResponse:
        """One Acquire; retries (of UNAVAILABLE) reuse one request id, so an ambiguous commit cannot grant twice."""
        request = lease_pb2.AcquireRequest(
            namespace=namespace,
            name=name,
            ttl=duration(ttl),
            wait=duration(wait),
            request_id=request_id or uuid.uuid4().hex,
            holder=holder,
        )
        response: lease_pb2.AcquireResponse = await self.leases.Acquire(request, timeout=self.timeout + wait)
        return response

    async def renew(self, lease_id: str, *, ttl: float | None = None) -> lease_pb2.Lease:
        """Extend the lease; ABORTED when it was lost (never revived)."""
        request = lease_pb2.RenewRequest(lease_id=lease_id)
        if ttl is not None:
            request.ttl.CopyFrom(duration(ttl))
        response = await self.leases.Renew(request, timeout=self.timeout)
        return response.lease  # type: ignore[no-any-return]

    async def release(self, lease_id: str) -> bool:
        """Idempotent: releasing a lease already released or lost answers False."""
        response = await self.leases.Release(lease_pb2.ReleaseRequest(lease_id=lease_id), timeout=self.timeout)
        return bool(response.released)

    async def get_lease(self, name: str, *, namespace: str = "default") -> lease_pb2.Lease:
        """The live lease on the name; NOT_FOUND when nobody holds it."""
        response = await self.leases.Get(
            lease_pb2.GetLeaseRequest(namespace=namespace, name=name), timeout=self.timeout
        )
        return response.lease  # type: ignore[no-any-return]

    def hold(
        self,
        name: str,
        *,
        namespace: str = "default",
        ttl: float = 30.0,
        wait: float = 0.0,
        holder: str = "",
        request_id: str | None = None,
    ) -> HeldLease:
        """``async with client.hold(name) as lease:`` holds the lease over a Hold stream for the block.

        Entering waits up to ``wait`` seconds for the grant and raises ``NotAcquired`` when it does not come;
        ``lease.lost`` is set if the lease is lost while the block runs; leaving releases it.
        """
        request = lease_pb2.AcquireRequest(
            namespace=namespace,
            name=name,
            ttl=duration(ttl),
            wait=duration(wait),
            request_id=request_id or uuid.uuid4().hex,
            holder=holder,
        )
        return HeldLease(self.leases, request, timeout=self.timeout)

    async def list_leases(self, *, namespace: str = "", page_size: int = 500) -> AsyncIterator[lease_pb2.Lease]:
        """Every live lease (of one namespace, or all), a page at a time."""
        token = ""
        while True:
            request = lease_pb2.ListLeasesRequest(namespace=namespace, page_size=page_size, page_token=token)
            page = await self.leases.List(request, timeout=self.timeout)
            for lease in page.leases:
                yield lease
            token = page.next_page_token
            if not token:
                return
