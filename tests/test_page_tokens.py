"""Page tokens and cursors: one codec for List (live and as-of), History, lease List and Watch, which answers
INVALID_ARGUMENT naming the field for anything it did not issue for that request: random text, edits, tokens of
another RPC or another filter, and positions out of range (even under a valid checksum), never INTERNAL."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory_service import pagination
from memory_service.v1 import lease_pb2, memory_pb2
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

PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
AGENT = {"scopes": [{"scope": memory_pb2.SCOPE_AGENT}]}


class Fixture:
    def __init__(self, server: RunningServer, memory_id: int) -> None:
        self.server = server
        self.memory_id = memory_id
        now = timestamp_pb2.Timestamp()
        now.FromDatetime(datetime.now(UTC))
        self.now = now


@pytest.fixture(scope="module")
async def paged(server_dsn: str, template_dsn: str) -> AsyncIterator[Fixture]:
    dsn = await create_database(server_dsn, "memory_service_test_template")
    running = await start_server(test_env(dsn))
    stub = running.memory
    for i in range(5):
        await stub.Store(
            memory_pb2.StoreRequest(memory={"scope": memory_pb2.SCOPE_AGENT, "scope_id": 1, "value": f"note {i}"})
        )
    memory_id = 0
    for version in range(4):  # one memory with four versions
        stored = await stub.Store(
            memory_pb2.StoreRequest(
                memory={"scope": memory_pb2.SCOPE_AGENT, "scope_id": 2, "key": "k", "value": f"v{version}"}
            )
        )
        memory_id = stored.id
    for name in ("a", "b", "c"):
        await running.leases.Acquire(lease_pb2.AcquireRequest(namespace="pages", name=name, ttl={"seconds": 60}))
    yield Fixture(running, memory_id)
    await stop_server(running)
    await drop_database(server_dsn, dsn)


# Each paginated RPC, as (name, call with a token, the field that carries it, a call that returns a real token).
Call = Callable[[Fixture, str], Awaitable[object]]


async def _watch(fixture: Fixture, token: str) -> object:
    call = fixture.server.memory.Watch(memory_pb2.WatchRequest(after=token), timeout=10)
    try:
        return await call.read()
    finally:
        call.cancel()


CALLS: dict[str, tuple[Call, str]] = {
    "List": (
        lambda f, t: f.server.memory.List(memory_pb2.ListRequest(filter=AGENT, page_size=2, page_token=t)),
        "page_token",
    ),
    "List as_of": (
        lambda f, t: f.server.memory.List(memory_pb2.ListRequest(filter=AGENT, page_size=2, page_token=t, as_of=f.now)),
        "page_token",
    ),
    "History": (
        lambda f, t: f.server.memory.History(memory_pb2.HistoryRequest(id=f.memory_id, page_size=2, page_token=t)),
        "page_token",
    ),
    "lease List": (
        lambda f, t: f.server.leases.List(lease_pb2.ListLeasesRequest(namespace="pages", page_size=1, page_token=t)),
        "page_token",
    ),
    "Watch": (_watch, "after"),
}


async def real_tokens(fixture: Fixture) -> dict[str, str]:
    tokens = {}
    for name in ("List", "List as_of", "History", "lease List"):
        call, _ = CALLS[name]
        tokens[name] = (await call(fixture, "")).next_page_token  # type: ignore[attr-defined]
        assert tokens[name], name
    change = await _watch(fixture, "")
    tokens["Watch"] = change.cursor  # type: ignore[attr-defined]
    return tokens


async def assert_refused(fixture: Fixture, name: str, token: str) -> None:
    call, field = CALLS[name]
    try:
        await call(fixture, token)
    except grpc.RpcError as error:
        assert code_of(error) is grpc.StatusCode.INVALID_ARGUMENT, (name, token, code_of(error), error.details())
        assert (error.details() or "").startswith(f"{field}: "), (name, error.details())
        assert bad_request_fields(error) == [field]
        return
    raise AssertionError(f"{name} accepted the token {token!r}")


async def test_every_paginated_rpc_pages_with_its_own_tokens(paged: Fixture) -> None:
    tokens = await real_tokens(paged)
    for name, token in tokens.items():
        call, _ = CALLS[name]
        await call(paged, token)  # accepted
        for other in CALLS:
            if other != name:
                await assert_refused(paged, other, token)


async def test_a_forged_history_token_far_out_of_range_is_invalid_argument(paged: Fixture) -> None:
    # The format History once issued, with a version number no int4 holds: it reached SQL and answered INTERNAL.
    forged = base64.urlsafe_b64encode(f"h1:{paged.memory_id}:99999999999999".encode()).decode().rstrip("=")
    await assert_refused(paged, "History", forged)
    # Out-of-range positions are refused even under a checksum that matches (a forger who recomputes it).
    tokens = await real_tokens(paged)
    for name, position in (("History", 2**40), ("History", 0), ("List", -1), ("Watch", 2**63), ("List", "x")):
        await assert_refused(paged, name, reforged(tokens[name], position))


def reforged(token: str, position: object) -> str:
    """``token`` with its position replaced and its checksum recomputed."""
    data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    fmt, kind, old, fingerprint = json.loads(data[:-8])
    payload = json.dumps([fmt, kind, [position, *old[1:]], fingerprint], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload + pagination._checksum(payload)).decode().rstrip("=")


async def test_edited_tokens_and_tokens_of_another_request_are_refused(paged: Fixture) -> None:
    tokens = await real_tokens(paged)
    for name, token in tokens.items():
        for position in range(0, len(token), 3):
            edited = token[:position] + ("A" if token[position] != "A" else "B") + token[position + 1 :]
            await assert_refused(paged, name, edited)
        await assert_refused(paged, name, token[:-4])
    stub = paged.server.memory
    other_filter = memory_pb2.ListRequest(filter={"scopes": [{"scope": memory_pb2.SCOPE_PROJECT}]})
    for request in (
        memory_pb2.ListRequest(page_token=tokens["List"], filter=other_filter.filter),
        memory_pb2.ListRequest(page_token=tokens["List as_of"], filter=AGENT, as_of={"seconds": 1}),
        memory_pb2.ListRequest(page_token=tokens["List as_of"], filter=AGENT),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            await stub.List(request)
        assert bad_request_fields(caught.value) == ["page_token"]
    with pytest.raises(grpc.RpcError) as caught:
        await stub.History(memory_pb2.HistoryRequest(id=paged.memory_id - 1, page_token=tokens["History"]))
    assert bad_request_fields(caught.value) == ["page_token"]
    with pytest.raises(grpc.RpcError) as caught:
        await paged.server.leases.List(lease_pb2.ListLeasesRequest(namespace="other", page_token=tokens["lease List"]))
    assert bad_request_fields(caught.value) == ["page_token"]


async def test_watch_still_resumes_from_a_cursor_of_the_earlier_format(paged: Fixture) -> None:
    legacy = base64.urlsafe_b64encode(b"w1:1").decode().rstrip("=")
    change = await _watch(paged, legacy)
    assert change.cursor  # type: ignore[attr-defined]
    await assert_refused(paged, "Watch", base64.urlsafe_b64encode(b"w1:99999999999999999999").decode())


tokens = st.one_of(
    st.text(min_size=1, max_size=80),
    st.binary(min_size=1, max_size=120).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.builds(
        lambda kind, pos: base64.urlsafe_b64encode(json.dumps([2, kind, pos, ""]).encode() + b"12345678").decode(),
        st.sampled_from(["list", "list_as_of", "history", "leases", "watch"]),
        st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    ),
)


@PROPERTY
@given(token=tokens, name=st.sampled_from(sorted(CALLS)))
async def test_random_tokens_are_invalid_argument_on_every_paginated_rpc(paged: Fixture, token: str, name: str) -> None:
    await assert_refused(paged, name, token)
