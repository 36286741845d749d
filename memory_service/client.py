"""A Python client over the generated stubs: deadlines on every call and retries of UNAVAILABLE.

    async with MemoryClient("localhost:50051") as client:
        await client.store("Alice prefers tea", scope="agent", scope_id=7)
        response = await client.search("what does Alice drink?", scope="agent", scope_id=7)

Retries use gRPC's own retry policy (exponential backoff, UNAVAILABLE only), so a call is retried only when the
server never started it or reported it could not reach its dependencies. Every write is an upsert by identity,
so a retried Store cannot duplicate a memory.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc
from grpc import aio

from memory_service.v1 import lease_pb2_grpc, memory_pb2, memory_pb2_grpc


def _names(enum: Any, prefix: str) -> dict[str, int]:
    """The lower-case names of a wire enum (``SCOPE_AGENT`` -> ``agent``), without its UNSPECIFIED zero."""
    return {name.removeprefix(prefix).lower(): value for name, value in enum.items() if value}


SCOPES = _names(memory_pb2.Scope, "SCOPE_")
MEMORY_TYPES = _names(memory_pb2.MemoryType, "MEMORY_TYPE_")
SEARCH_MODES = _names(memory_pb2.SearchMode, "SEARCH_MODE_")


def _value(table: dict[str, int], what: str, name: str) -> Any:
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(table)}") from None


def scope_value(name: str) -> memory_pb2.Scope.ValueType:
    return _value(SCOPES, "scope", name)  # type: ignore[no-any-return]


def memory_type_value(name: str) -> memory_pb2.MemoryType.ValueType:
    return _value(MEMORY_TYPES, "memory type", name)  # type: ignore[no-any-return]


def mode_value(name: str) -> memory_pb2.SearchMode.ValueType:
    return _value(SEARCH_MODES, "search mode", name)  # type: ignore[no-any-return]


def _service_config(attempts: int) -> str:
    policy = {
        "maxAttempts": attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": "memory_service.v1.MemoryService"}, {"service": "memory_service.v1.LeaseService"}]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def open_channel(
    address: str,
    *,
    token: str | None = None,
    root_certificates: bytes | None = None,
    tls: bool = False,
    attempts: int = 4,
    keepalive_time: float = 10.0,
    keepalive_timeout: float = 5.0,
) -> aio.Channel:
    """A channel with retries of UNAVAILABLE, keepalive, TLS when asked, and the bearer token on every call."""
    # gRPC refuses a retry policy of fewer than 2 attempts (the channel fails every call): 1 means no retries.
    retries: list[tuple[str, str | int]] = (
        [("grpc.enable_retries", 1), ("grpc.service_config", _service_config(attempts))]
        if attempts >= 2
        else [("grpc.enable_retries", 0)]
    )
    options: list[tuple[str, str | int]] = [
        *retries,
        # A server that stops answering is detected within keepalive time + timeout, also on a long stream (a
        # lease Hold) that carries no data; the server permits pings every 5 s.
        ("grpc.keepalive_time_ms", round(keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive_timeout * 1000)),
        ("grpc.http2.ping_timeout_ms", round(keepalive_timeout * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if not (tls or root_certificates or token):
        return aio.insecure_channel(address, options=options)
    if not (tls or root_certificates):
        # A token over plaintext is allowed only to loopback, where gRPC permits call credentials on insecure ports.
        credentials = grpc.local_channel_credentials()
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return aio.secure_channel(address, credentials, options=options)


class MemoryClient:
    """Thin, typed conveniences over ``MemoryServiceStub``; ``.memory`` and ``.leases`` expose the raw stubs."""

    def __init__(
        self,
        address: str = "localhost:50051",
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
        memory = memory_pb2.MemoryInput(
            scope=scope_value(scope),
            scope_id=scope_id,
            key=key,
            value=value,
            memory_type=memory_type_value(memory_type),
            tags=tags or [],
        )
        if importance is not None:
            memory.importance = importance
        if agent_id is not None:
            memory.agent_id = agent_id
        if metadata:
            memory.metadata.update(metadata)
        if ttl_seconds is not None:
            memory.ttl.FromNanoseconds(int(ttl_seconds * 1e9))
        response: memory_pb2.StoreResponse = await self.memory.Store(
            memory_pb2.StoreRequest(memory=memory), timeout=self.timeout
        )
        return response

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
        request = memory_pb2.SearchRequest(query=query, mode=mode_value(mode), top_k=top_k)
        if scope is not None:
            ref = request.filter.scopes.add(scope=scope_value(scope))
            if scope_id is not None:
                ref.scope_id = scope_id
        response: memory_pb2.SearchResponse = await self.memory.Search(request, timeout=self.timeout)
        return response

    async def stats(self) -> memory_pb2.StatsResponse:
        response: memory_pb2.StatsResponse = await self.memory.Stats(memory_pb2.StatsRequest(), timeout=self.timeout)
        return response

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
