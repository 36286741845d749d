"""Nothing a client sends produces UNKNOWN or INTERNAL: bad input is INVALID_ARGUMENT naming the field.

Property-based: hypothesis throws arbitrary text, numbers and enum values at a real server.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory_service.v1 import memory_pb2
from tests.conftest import (
    RunningServer,
    bad_request_fields,
    code_of,
    create_database,
    drop_database,
    start_server,
    stop_server,
    test_env,
)

MAX_TEXT_BYTES = 2048
DIMENSION = 384
PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

any_text = st.text(st.characters(codec="utf-8"), max_size=300)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
enum_values = st.integers(min_value=-5, max_value=20)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@pytest.fixture(scope="module")
async def shared_server(server_dsn: str, template_dsn: str) -> AsyncIterator[RunningServer]:
    dsn = await create_database(server_dsn, "memory_service_test_template")
    running = await start_server(test_env(dsn, MAX_TEXT_BYTES=str(MAX_TEXT_BYTES)))
    yield running
    await stop_server(running)
    await drop_database(server_dsn, dsn)


async def outcome(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.RpcError as error:
        return code_of(error), error.details() or ""
    return grpc.StatusCode.OK, ""


# The rules as the proto and docs state them, written here independently of the service's own checks: the property
# tests require OK exactly for input these accept and INVALID_ARGUMENT for everything else.


def _text_ok(value: str) -> bool:
    return bool(value.strip()) and "\x00" not in value and len(value.encode()) <= MAX_TEXT_BYTES


def _vector_ok(values: list[float]) -> bool:
    """A vector whose length pgvector's single-precision sums keep: neither zero nor infinite there."""
    return (
        len(values) == DIMENSION
        and all(math.isfinite(v) for v in values)
        and 1e-30 <= math.fsum(v * v for v in values) <= 1e30
    )


def store_is_valid(
    *, value: str, key: str, scope: int, scope_id: int, memory_type: int, importance: float, tags: list[str],
    embedding: list[float],
) -> bool:  # fmt: skip
    return (
        _text_ok(value)
        and len(key) <= 200
        and (not key or bool(key.strip()))
        and "\x00" not in key
        and 1 <= scope <= 5  # SCOPE_GLOBAL .. SCOPE_PROJECT
        and scope_id >= 0
        and (scope != memory_pb2.SCOPE_GLOBAL or scope_id == 0)
        and 0 <= memory_type <= 7  # unspecified means FACT
        and math.isfinite(importance)
        and 0 <= importance <= 1
        and len(tags) <= 64
        and all(tag.strip() and len(tag) <= 100 and "\x00" not in tag for tag in tags)
        and (not embedding or _vector_ok(embedding))
    )


def search_is_valid(*, query: str, top_k: int, mode: int, alpha: float, min_score: float, vector: list[float]) -> bool:
    if query and not _text_ok(query):
        return False
    if vector and not _vector_ok(vector):
        return False
    if mode == 0:
        mode = memory_pb2.SEARCH_MODE_HYBRID if query else memory_pb2.SEARCH_MODE_VECTOR
    if mode not in (memory_pb2.SEARCH_MODE_VECTOR, memory_pb2.SEARCH_MODE_TEXT, memory_pb2.SEARCH_MODE_HYBRID):
        return False
    if mode != memory_pb2.SEARCH_MODE_VECTOR and not query:
        return False
    if mode == memory_pb2.SEARCH_MODE_VECTOR and not query and not vector:
        return False
    return top_k >= 0 and math.isfinite(alpha) and 0 <= alpha <= 1 and math.isfinite(min_score)


@PROPERTY
@given(
    value=any_text,
    key=any_text,
    scope=enum_values,
    scope_id=int64,
    memory_type=enum_values,
    importance=floats,
    tags=st.lists(any_text, max_size=4),
    embedding=st.one_of(st.just([]), st.lists(floats, min_size=1, max_size=5), st.just([0.0] * 384)),
)
async def test_store_never_fails_unexpectedly(
    shared_server: RunningServer,
    value: str,
    key: str,
    scope: int,
    scope_id: int,
    memory_type: int,
    importance: float,
    tags: list[str],
    embedding: list[float],
) -> None:
    message = memory_pb2.MemoryInput(
        scope=scope,  # type: ignore[arg-type]
        scope_id=scope_id,
        key=key,
        value=value,
        memory_type=memory_type,  # type: ignore[arg-type]
        importance=importance,
        tags=tags,
        embedding=embedding,
    )
    code, details = await outcome(shared_server.memory.Store(memory_pb2.StoreRequest(memory=message)))
    valid = store_is_valid(
        value=value, key=key, scope=scope, scope_id=scope_id, memory_type=memory_type, importance=importance, tags=tags,
        embedding=embedding,
    )  # fmt: skip
    if valid:
        assert code is grpc.StatusCode.OK, (code, details)
    else:
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details.startswith("memory."), details


@PROPERTY
@given(
    query=any_text,
    top_k=st.integers(min_value=-10, max_value=100_000),
    mode=enum_values,
    alpha=floats,
    min_score=floats,
    vector=st.one_of(st.just([]), st.lists(floats, min_size=384, max_size=384)),
)
async def test_search_never_fails_unexpectedly(
    shared_server: RunningServer, query: str, top_k: int, mode: int, alpha: float, min_score: float, vector: list[float]
) -> None:
    request = memory_pb2.SearchRequest(
        query=query,
        top_k=top_k,
        mode=mode,  # type: ignore[arg-type]
        alpha=alpha,
        min_score=min_score,
        query_embedding=vector,
    )
    code, details = await outcome(shared_server.memory.Search(request))
    # Above the cap top_k is capped, not refused.
    valid = search_is_valid(query=query, top_k=top_k, mode=mode, alpha=alpha, min_score=min_score, vector=vector)
    assert code is (grpc.StatusCode.OK if valid else grpc.StatusCode.INVALID_ARGUMENT), (code, details)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value=""), "memory.value"),
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value="   "), "memory.value"),
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value="a\x00b"), "memory.value"),
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value="x" * 5000), "memory.value"),
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value="v", key="k" * 201), "memory.key"),
        (memory_pb2.MemoryInput(value="v"), "memory.scope"),
        (memory_pb2.MemoryInput(scope=42, value="v"), "memory.scope"),  # type: ignore[arg-type]
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, scope_id=3, value="v"), "memory.scope_id"),
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=-1, value="v"), "memory.scope_id"),
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v", importance=1.5), "memory.importance"),
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v", importance=math.nan), "memory.importance"),
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v", memory_type=99), "memory.memory_type"),  # type: ignore[arg-type]
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v", embedding=[0.1] * 3), "memory.embedding"),
        (
            memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v", embedding=[math.nan] * 384),
            "memory.embedding",
        ),
        (
            memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v", embedding=[math.inf] * 384),
            "memory.embedding",
        ),
        # Finite and non-zero, but pgvector's float32 sum of squares would be 0 (every cosine NaN) or infinite.
        (
            memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v", embedding=[1e-25] * 384),
            "memory.embedding",
        ),
        (
            memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v", embedding=[1e20] * 384),
            "memory.embedding",
        ),
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v", tags=["ok", ""]), "memory.tags[1]"),
        (memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v", agent_id=0), "memory.agent_id"),
    ],
)
async def test_store_names_the_bad_field(
    shared_server: RunningServer, message: memory_pb2.MemoryInput, field: str
) -> None:
    code, details = await outcome(shared_server.memory.Store(memory_pb2.StoreRequest(memory=message)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field + ":"), details


async def test_metadata_with_nul_or_nan_is_refused(shared_server: RunningServer) -> None:
    for bad in ({"note": "a\x00b"}, {"score": math.nan}):
        message = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v")
        message.metadata.update(bad)
        code, details = await outcome(shared_server.memory.Store(memory_pb2.StoreRequest(memory=message)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("memory.metadata"), details


def nested(depth: int, inner: object = 1) -> dict[str, Any]:
    """Metadata of ``depth`` objects, each inside the one before."""
    value: dict[str, Any] = {"leaf": inner}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_metadata_is_refused_where_a_read_could_not_return_it(shared_server: RunningServer) -> None:
    """Protobuf parsers stop at 100 nested messages and a Struct spends three on each object: a Store 32 objects
    deep parsed, and every Search and History that returned it then failed in the client (INTERNAL), since both
    nest a memory one message deeper than a Store does."""
    memory = shared_server.memory
    for too_deep in (nested(21), nested(20, [1]), {"a": nested(5, [[[[[[[[[[[[[[[1]]]]]]]]]]]]]]])}):
        message = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=31, value="too deep")
        message.metadata.update(too_deep)
        code, details = await outcome(memory.Store(memory_pb2.StoreRequest(memory=message)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("memory.metadata:"), details
    deepest = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=31, value="quetzal nesting record")
    deepest.metadata.update(nested(20))
    stored = await memory.Store(memory_pb2.StoreRequest(memory=deepest))
    found = await memory.Search(
        memory_pb2.SearchRequest(
            query="quetzal nesting record",
            mode=memory_pb2.SEARCH_MODE_TEXT,
            filter=memory_pb2.MemoryFilter(scopes=[memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_AGENT, scope_id=31)]),
        )
    )
    assert [hit.memory.id for hit in found.hits] == [stored.id]
    assert found.hits[0].memory.metadata == deepest.metadata
    versions = (await memory.History(memory_pb2.HistoryRequest(id=stored.id))).versions
    assert [v.memory.metadata == deepest.metadata for v in versions] == [True]


async def test_metadata_text_that_only_looks_like_an_escaped_nul_is_kept(shared_server: RunningServer) -> None:
    """NUL is refused wherever it is (jsonb cannot store it); a backslash followed by "u0000" is text like any other,
    and was refused because its JSON holds the escape's six characters."""
    memory = shared_server.memory
    windows_path = {"path": "C:\\u0000logs", "deeper": [{"also": "\\u0000"}]}
    message = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=32, value="a path that looks escaped")
    message.metadata.update(windows_path)
    stored = await memory.Store(memory_pb2.StoreRequest(memory=message))
    assert (await memory.Get(memory_pb2.GetRequest(id=stored.id))).memory.metadata == message.metadata
    contains = memory_pb2.MemoryFilter(scopes=[memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_AGENT, scope_id=32)])
    contains.metadata_contains.update({"path": "C:\\u0000logs"})
    listed = await memory.List(memory_pb2.ListRequest(filter=contains))
    assert [m.id for m in listed.memories] == [stored.id]
    for bad in ({"a\x00": 1}, {"a": [{"b": "x\x00"}]}, {"a": {"b\\u0000\x00": "y"}}):
        message = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=32, value="v")
        message.metadata.update(bad)
        code, details = await outcome(memory.Store(memory_pb2.StoreRequest(memory=message)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("memory.metadata:"), (bad, details)


async def test_other_rpcs_validate_their_fields(shared_server: RunningServer) -> None:
    memory = shared_server.memory
    cases = [
        (memory.Get(memory_pb2.GetRequest(id=0)), "id"),
        (memory.Get(memory_pb2.GetRequest(id=-4)), "id"),
        (memory.Delete(memory_pb2.DeleteRequest()), "id"),
        (memory.List(memory_pb2.ListRequest(page_size=-1)), "page_size"),
        (memory.Embed(memory_pb2.EmbedRequest()), "texts"),
        (memory.Embed(memory_pb2.EmbedRequest(texts=["ok", ""])), "texts[1]"),
        (memory.Embed(memory_pb2.EmbedRequest(texts=["x"] * 1000)), "texts"),
        (memory.Store(memory_pb2.StoreRequest()), "memory"),
        # A query vector is held to a stored one's bounds: pgvector's float32 length of 1e-25s is 0, of 1e20s infinite.
        (memory.Search(memory_pb2.SearchRequest(query_embedding=[1e-25] * 384)), "query_embedding"),
        (memory.Search(memory_pb2.SearchRequest(query_embedding=[1e20] * 384)), "query_embedding"),
        (
            memory.List(memory_pb2.ListRequest(filter=memory_pb2.MemoryFilter(memory_types=[77]))),  # type: ignore[list-item]
            "filter.memory_types[0]",
        ),
    ]
    for call, field in cases:
        code, details = await outcome(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (field, code, details)
        assert details.startswith(field + ":"), (field, details)


async def test_a_fence_naming_a_lease_no_acquire_could_grant_is_invalid_argument(shared_server: RunningServer) -> None:
    """A fence is held to the lease names' rules: a NUL in one reached PostgreSQL (INTERNAL), and a name no Acquire
    accepts answered ABORTED, "re-read and retry", which no retry can cure."""
    memory = shared_server.memory
    value = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=33, value="fenced")
    cases = [
        (memory_pb2.Fence(namespace="a\x00b", name="x", fencing_token=1), "fence.namespace"),
        (memory_pb2.Fence(namespace="jobs", name="x\x00", fencing_token=1), "fence.name"),
        (memory_pb2.Fence(namespace="bad ns!", name="x", fencing_token=1), "fence.namespace"),
        (memory_pb2.Fence(namespace="", name="x", fencing_token=1), "fence.namespace"),
        (memory_pb2.Fence(namespace="jobs", name="n" * 201, fencing_token=1), "fence.name"),
        (memory_pb2.Fence(namespace="jobs", name="x", fencing_token=0), "fence.fencing_token"),
    ]
    for fence, field in cases:
        code, details = await outcome(memory.Store(memory_pb2.StoreRequest(memory=value, fence=fence)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field + ":"), (fence, details)

        async def requests(fence: memory_pb2.Fence = fence) -> AsyncIterator[memory_pb2.BulkStoreRequest]:
            yield memory_pb2.BulkStoreRequest(items=[memory_pb2.BulkItem(sequence=1, memory=value)], fence=fence)

        with pytest.raises(grpc.RpcError) as caught:
            async for _ack in memory.BulkStore(requests()):
                pass
        assert code_of(caught.value) is grpc.StatusCode.INVALID_ARGUMENT, (fence, caught.value.details())
        assert (caught.value.details() or "").startswith(field + ":"), (fence, caught.value.details())


async def test_a_choice_with_no_member_set_names_every_member(shared_server: RunningServer) -> None:
    """Delete and Erase take an id or a filter; with neither, BadRequest named their oneof ("target"), which is no
    field a client can set."""
    memory = shared_server.memory
    scope = memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_AGENT, scope_id=1)
    for call in (memory.Delete(memory_pb2.DeleteRequest()), memory.Erase(memory_pb2.EraseRequest(scope=scope))):
        with pytest.raises(grpc.RpcError) as caught:
            await call
        assert code_of(caught.value) is grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith("id:"), caught.value.details()
        assert bad_request_fields(caught.value) == ["id", "filter"]


async def test_a_message_that_does_not_parse_is_invalid_argument(shared_server: RunningServer) -> None:
    channel = shared_server.channel
    raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    broken_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (a string) holding bytes that are not UTF-8
    unary = channel.unary_unary("/memory_service.v1.MemoryService/Search", **raw)
    code, details = await outcome(unary(broken_utf8, timeout=10))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    # No field of the request is at fault, so none is named (and no BadRequest names one that does not exist).
    assert details.startswith("the request is not a valid message")

    stream = channel.stream_stream("/memory_service.v1.MemoryService/BulkStore", **raw)
    call = stream(iter([b"\x0a\x05\x08"]), timeout=10)  # items[0] says 5 bytes, carries 1
    code, details = await outcome(call.read())
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("the request is not a valid message")


async def test_sizes_above_the_cap_are_capped_not_refused(database_url: str) -> None:
    running = await start_server(test_env(database_url, SEARCH_MAX_TOP_K="3", LIST_MAX_PAGE_SIZE="4"))
    try:
        memory = running.memory
        items = [
            memory_pb2.BulkItem(
                sequence=i + 1,
                memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=5, value=f"capped note {i}"),
            )
            for i in range(10)
        ]
        _ = [ack async for ack in memory.BulkStore(iter([memory_pb2.BulkStoreRequest(items=items)]))]
        hits = await memory.Search(memory_pb2.SearchRequest(query="capped note", top_k=2**31 - 1))
        assert len(hits.hits) == 3
        seen: list[int] = []
        token = ""
        while True:
            page = await memory.List(memory_pb2.ListRequest(page_size=10**6, page_token=token))
            assert len(page.memories) <= 4
            seen.extend(m.id for m in page.memories)
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == len(set(seen)) == 10
        for call, field in (
            (memory.Search(memory_pb2.SearchRequest(query="q", top_k=-1)), "top_k"),
            (memory.List(memory_pb2.ListRequest(page_size=-1)), "page_size"),
        ):
            code, details = await outcome(call)
            assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field + ":"), details
    finally:
        await stop_server(running)


async def test_invalid_argument_carries_bad_request_details(shared_server: RunningServer) -> None:
    """Clients in any language read the field from google.rpc.BadRequest, not from the message text."""
    memory = shared_server.memory
    with pytest.raises(grpc.RpcError) as caught:
        await memory.Embed(memory_pb2.EmbedRequest(texts=["ok", ""]))
    assert bad_request_fields(caught.value) == ["texts[1]"]

    items = [
        memory_pb2.BulkItem(sequence=s, memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, value="v"))
        for s in (5, 4)
    ]
    with pytest.raises(grpc.RpcError) as caught:
        _ = [ack async for ack in memory.BulkStore(iter([memory_pb2.BulkStoreRequest(items=items)]))]
    assert code_of(caught.value) is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["items[1].sequence"]

    # Other codes carry no BadRequest.
    with pytest.raises(grpc.RpcError) as caught:
        await memory.Get(memory_pb2.GetRequest(id=2**62))
    assert code_of(caught.value) is grpc.StatusCode.NOT_FOUND
    assert caught.value.trailing_metadata() is None or all(  # type: ignore[attr-defined]
        key != "grpc-status-details-bin"
        for key, _ in caught.value.trailing_metadata()  # type: ignore[attr-defined]
    )
