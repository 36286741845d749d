"""Every Timestamp and Duration a client sends is checked against protobuf's ranges and what the database stores.

Each bad value on each RPC that takes it answers INVALID_ARGUMENT naming the field (in BulkStore: a rejection of
that row, and the stream goes on); property-based tests also fail when a bad value is accepted, and read back
every memory they stored, so a value that poisons reads cannot pass as accepted.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory_service.storage.migrations import apply_migrations
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

TS_MIN, TS_MAX = -62_135_596_800, 253_402_300_799
DUR_MAX = 315_576_000_000
BILLION = 1_000_000_000
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

BAD_TIMESTAMPS = [
    (TS_MIN - 1, 0),
    (TS_MAX + 1, 0),
    (2**62, 0),
    (-(2**62), 0),
    (0, -1),
    (0, BILLION),
    (1_700_000_000, 2**31 - 1),
]
BAD_DURATIONS = [
    (DUR_MAX + 1, 0),
    (-DUR_MAX - 1, 0),
    (2**62, 0),
    (1, BILLION),
    (0, -BILLION),
    (5, -1),
    (-5, 1),
]
PROPERTY = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def ts(seconds: int, nanos: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def dur(seconds: int, nanos: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def memory_input(value: str = "a note", **expiry: object) -> memory_pb2.MemoryInput:
    return memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value=value, **expiry)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def shared_server(server_dsn: str, template_dsn: str) -> AsyncIterator[RunningServer]:
    dsn = await create_database(server_dsn, "memory_service_test_template")
    running = await start_server(test_env(dsn, LEASE_MIN_TTL="100ms"))
    yield running
    await stop_server(running)
    await drop_database(server_dsn, dsn)


async def outcome(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.RpcError as error:
        return code_of(error), error.details() or ""
    return grpc.StatusCode.OK, ""


async def assert_invalid(call: Awaitable[object], field: str) -> None:
    """INVALID_ARGUMENT naming ``field`` in the message and in the google.rpc.BadRequest details."""
    try:
        await call
    except grpc.RpcError as error:
        assert code_of(error) is grpc.StatusCode.INVALID_ARGUMENT, (field, error)
        assert (error.details() or "").startswith(field + ":"), (field, error.details())
        assert bad_request_fields(error) == [field]
        return
    raise AssertionError(f"{field}: accepted")


def unary_calls(server: RunningServer, stamp: timestamp_pb2.Timestamp) -> list[tuple[Awaitable[object], str]]:
    memory = server.memory
    return [
        (memory.Store(memory_pb2.StoreRequest(memory=memory_input(expires_at=stamp))), "memory.expires_at"),
        (memory.Search(memory_pb2.SearchRequest(query="q", filter={"created_after": stamp})), "filter.created_after"),
        (memory.Search(memory_pb2.SearchRequest(query="q", filter={"created_before": stamp})), "filter.created_before"),
        (memory.List(memory_pb2.ListRequest(filter={"created_after": stamp})), "filter.created_after"),
        (memory.List(memory_pb2.ListRequest(filter={"created_before": stamp})), "filter.created_before"),
        (memory.Delete(memory_pb2.DeleteRequest(filter={"created_after": stamp})), "filter.created_after"),
        (memory.Delete(memory_pb2.DeleteRequest(filter={"created_before": stamp})), "filter.created_before"),
    ]


def duration_calls(server: RunningServer, span: duration_pb2.Duration) -> list[tuple[Awaitable[object], str]]:
    memory, leases = server.memory, server.leases
    good = dur(5, 0)
    return [
        (memory.Store(memory_pb2.StoreRequest(memory=memory_input(ttl=span))), "memory.ttl"),
        (
            memory.Search(memory_pb2.SearchRequest(query="q", recency_half_life=span, recency_boost=1.0)),
            "recency_half_life",
        ),
        (leases.Acquire(lease_pb2.AcquireRequest(namespace="t", name="n", ttl=span)), "ttl"),
        (leases.Acquire(lease_pb2.AcquireRequest(namespace="t", name="n", ttl=good, wait=span)), "wait"),
        (leases.Renew(lease_pb2.RenewRequest(lease_id="00000000-0000-0000-0000-000000000000", ttl=span)), "ttl"),
    ]


@pytest.mark.parametrize(("seconds", "nanos"), BAD_TIMESTAMPS)
async def test_bad_timestamps_are_invalid_on_every_unary_rpc(
    shared_server: RunningServer, seconds: int, nanos: int
) -> None:
    for call, field in unary_calls(shared_server, ts(seconds, nanos)):
        await assert_invalid(call, field)


@pytest.mark.parametrize(("seconds", "nanos"), BAD_DURATIONS)
async def test_bad_durations_are_invalid_on_every_unary_rpc(
    shared_server: RunningServer, seconds: int, nanos: int
) -> None:
    for call, field in duration_calls(shared_server, dur(seconds, nanos)):
        await assert_invalid(call, field)


async def hold_first_event(server: RunningServer, request: lease_pb2.AcquireRequest) -> lease_pb2.HoldEvent:
    call = server.leases.Hold()
    try:
        await call.write(lease_pb2.HoldRequest(acquire=request))
        event: lease_pb2.HoldEvent = await call.read()
        return event
    finally:
        call.cancel()


@pytest.mark.parametrize(("seconds", "nanos"), BAD_DURATIONS)
async def test_bad_durations_are_invalid_on_hold(shared_server: RunningServer, seconds: int, nanos: int) -> None:
    bad = dur(seconds, nanos)
    for request, field in (
        (lease_pb2.AcquireRequest(namespace="t", name="h", ttl=bad), "acquire.ttl"),
        (lease_pb2.AcquireRequest(namespace="t", name="h", ttl=dur(5, 0), wait=bad), "acquire.wait"),
    ):
        await assert_invalid(hold_first_event(shared_server, request), field)


async def test_a_ttl_past_year_9999_is_invalid_not_stored(shared_server: RunningServer) -> None:
    # Valid Durations (within protobuf's 10,000 years) whose expiry PostgreSQL could store but nobody could read.
    for seconds in (252_000_000_000, 253_402_300_799, DUR_MAX):
        await assert_invalid(
            shared_server.memory.Store(memory_pb2.StoreRequest(memory=memory_input(ttl=dur(seconds, 0)))), "memory.ttl"
        )
    for zero_or_less in (dur(0, 0), dur(0, -1), dur(-3, 0)):
        await assert_invalid(
            shared_server.memory.Store(memory_pb2.StoreRequest(memory=memory_input(ttl=zero_or_less))), "memory.ttl"
        )


async def test_the_extremes_of_the_valid_ranges_store_and_read_back(shared_server: RunningServer) -> None:
    memory = shared_server.memory
    latest = await memory.Store(
        memory_pb2.StoreRequest(memory=memory_input("latest", expires_at=ts(TS_MAX, BILLION - 1)))
    )
    got = (await memory.Get(memory_pb2.GetRequest(id=latest.id))).memory
    assert got.expires_at.ToDatetime(tzinfo=UTC) == LATEST
    # A TTL that ends a few days before the end of year 9999: accepted, and readable.
    seconds = int((LATEST - datetime.now(UTC)).total_seconds()) - 5 * 86400
    far = await memory.Store(memory_pb2.StoreRequest(memory=memory_input("far", ttl=dur(seconds, 0))))
    got = (await memory.Get(memory_pb2.GetRequest(id=far.id))).memory
    assert LATEST - timedelta(days=6) < got.expires_at.ToDatetime(tzinfo=UTC) <= LATEST
    # The earliest filters protobuf allows are valid ones.
    for stamp in (ts(TS_MIN, 0), ts(TS_MAX, BILLION - 1)):
        await memory.List(memory_pb2.ListRequest(filter={"created_after": stamp}))
        await memory.Search(memory_pb2.SearchRequest(query="latest", filter={"created_before": stamp}))
    listed = await memory.List(memory_pb2.ListRequest(filter={"scopes": [{"scope": memory_pb2.SCOPE_AGENT}]}))
    assert {m.value for m in listed.memories} >= {"latest", "far"}


async def test_bulk_store_rejects_the_bad_row_and_goes_on(shared_server: RunningServer) -> None:
    bad_items = [(ts(s, n), None) for s, n in BAD_TIMESTAMPS] + [(None, dur(s, n)) for s, n in BAD_DURATIONS]
    bad_items.append((None, dur(252_000_000_000, 0)))
    items = []
    for index, (stamp, span) in enumerate(bad_items):
        expiry: dict[str, object] = {"expires_at": stamp} if stamp is not None else {"ttl": span}
        items.append(memory_pb2.BulkItem(sequence=2 * index + 1, memory=memory_input(f"bad {index}", **expiry)))
        items.append(memory_pb2.BulkItem(sequence=2 * index + 2, memory=memory_input(f"good {index}")))
    call = shared_server.memory.BulkStore(iter([memory_pb2.BulkStoreRequest(items=items)]))
    acks = [ack async for ack in call]
    assert acks[-1].durable_sequence == len(items)
    rejections = [r for ack in acks for r in ack.rejections]
    assert [r.sequence for r in rejections] == [2 * i + 1 for i in range(len(bad_items))]
    expected = ["memory.expires_at"] * len(BAD_TIMESTAMPS) + ["memory.ttl"] * (len(BAD_DURATIONS) + 1)
    assert [r.field for r in rejections] == expected
    assert sum(ack.created + ack.unchanged for ack in acks) == len(bad_items)


timestamp_seconds = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(TS_MIN - 3, TS_MIN + 3),
    st.integers(TS_MAX - 3, TS_MAX + 3),
    st.integers(-5, 5),
)
duration_seconds = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(DUR_MAX - 3, DUR_MAX + 3),
    st.integers(-DUR_MAX - 3, -DUR_MAX + 3),
    st.integers(250_000_000_000, 253_000_000_000),
    st.integers(-5, 5),
)
nanos_values = st.one_of(
    st.integers(-(2**31), 2**31 - 1), st.sampled_from([-BILLION, -BILLION + 1, -1, 0, 1, BILLION - 1, BILLION])
)


def timestamp_is_valid(seconds: int, nanos: int) -> bool:
    """An independent oracle: the instant exists as a Python datetime (years 1 to 9999) and nanos fit."""
    try:
        datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    except OverflowError:
        return False
    return 0 <= nanos < BILLION


def duration_is_valid(seconds: int, nanos: int) -> bool:
    return (
        abs(seconds) <= DUR_MAX
        and abs(nanos) < BILLION
        and (seconds == 0 or nanos == 0 or (seconds > 0) == (nanos > 0))
    )


@PROPERTY
@given(seconds=timestamp_seconds, nanos=nanos_values)
async def test_expires_at_is_accepted_exactly_when_valid_and_always_reads_back(
    shared_server: RunningServer, seconds: int, nanos: int
) -> None:
    request = memory_pb2.StoreRequest(memory=memory_input(f"ts {seconds} {nanos}", expires_at=ts(seconds, nanos)))
    try:
        stored = await shared_server.memory.Store(request)
    except grpc.RpcError as error:
        assert not timestamp_is_valid(seconds, nanos), error.details()
        assert code_of(error) is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert (error.details() or "").startswith("memory.expires_at:"), error.details()
    else:
        assert timestamp_is_valid(seconds, nanos)
        if seconds > datetime.now(UTC).timestamp() + 60:  # still live, so Get returns it, to the microsecond
            got = (await shared_server.memory.Get(memory_pb2.GetRequest(id=stored.id))).memory
            assert (got.expires_at.seconds, got.expires_at.nanos) == (seconds, nanos // 1000 * 1000)
    for field in ("created_after", "created_before"):
        listed = shared_server.memory.List(memory_pb2.ListRequest(filter={field: ts(seconds, nanos)}, page_size=5))
        code, details = await outcome(listed)
        expected = grpc.StatusCode.OK if timestamp_is_valid(seconds, nanos) else grpc.StatusCode.INVALID_ARGUMENT
        assert code is expected, (field, details)


@PROPERTY
@given(seconds=duration_seconds, nanos=nanos_values)
async def test_ttl_is_accepted_exactly_when_valid_and_always_reads_back(
    shared_server: RunningServer, seconds: int, nanos: int
) -> None:
    request = memory_pb2.StoreRequest(memory=memory_input(f"ttl {seconds} {nanos}", ttl=dur(seconds, nanos)))
    try:
        response = await shared_server.memory.Store(request)
    except grpc.RpcError as error:
        assert code_of(error) is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert (error.details() or "").startswith("memory.ttl:")
        positive = seconds > 0 or (seconds == 0 and nanos > 0)
        room = (LATEST - datetime.now(UTC)).total_seconds()
        # Refusing a valid, positive TTL is only right within the margin kept before the end of year 9999.
        assert not (duration_is_valid(seconds, nanos) and positive and seconds < room - 2 * 86400), error.details()
        return
    assert duration_is_valid(seconds, nanos) and (seconds > 0 or nanos > 0)
    if seconds >= 60:  # a shorter one may have expired already, and expired memories are not returned
        got = (await shared_server.memory.Get(memory_pb2.GetRequest(id=response.id))).memory
        assert got.expires_at.ToDatetime(tzinfo=UTC) <= LATEST


@PROPERTY
@given(seconds=duration_seconds, nanos=nanos_values)
async def test_lease_durations_are_accepted_exactly_when_valid(
    shared_server: RunningServer, seconds: int, nanos: int
) -> None:
    request = lease_pb2.AcquireRequest(namespace="prop", name=f"ttl-{uuid.uuid4().hex}", ttl=dur(seconds, nanos))
    code, details = await outcome(shared_server.leases.Acquire(request))
    micros = -(-abs(nanos) // 1000)  # the service takes Durations to the microsecond, rounded away from zero
    total = seconds + (micros if nanos >= 0 else -micros) / 1_000_000
    if duration_is_valid(seconds, nanos) and 0.1 <= total <= 3600:
        assert code is grpc.StatusCode.OK, details
    else:
        assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("ttl:"), (code, details)
    name = f"wait-{uuid.uuid4().hex}"
    request = lease_pb2.AcquireRequest(namespace="prop", name=name, ttl=dur(1, 0), wait=dur(seconds, nanos))
    code, details = await outcome(shared_server.leases.Acquire(request, timeout=30))
    if not (duration_is_valid(seconds, nanos) and 0 <= total <= 300):
        assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("wait:"), (code, details)
    else:
        assert code is grpc.StatusCode.OK, details


async def test_rows_with_unreadable_expiry_are_repaired_by_the_migration(empty_database_url: str) -> None:
    """A row stored before validation existed (here: by raw SQL) must not break reads once 0006 has run."""
    await apply_migrations(empty_database_url)
    conn = await asyncpg.connect(empty_database_url)
    try:
        # Undo 0006 so the poisoned rows can be written as an older version of the service wrote them.
        await conn.execute("ALTER TABLE memory.memories DROP CONSTRAINT memories_expires_at_readable")
        await conn.execute("DELETE FROM memory.schema_migrations WHERE name = '0006_hardening.sql'")
        for value, expiry in (
            ("far future", "20000-01-01 00:00:00+00"),
            ("before christ", "0044-03-15 00:00:00+00 BC"),
        ):
            await conn.execute(
                """INSERT INTO memory.memories (scope, scope_id, key, value, content_hash, expires_at)
                   VALUES ('agent', 9, $1::text, $1::text, '\\x00', $2::text::timestamptz)""",
                value,
                expiry,
            )
    finally:
        await conn.close()

    running = await start_server(test_env(empty_database_url))  # migrates on start: 0006 runs again
    try:
        listed = await running.memory.List(
            memory_pb2.ListRequest(filter={"scopes": [{"scope": memory_pb2.SCOPE_AGENT}]})
        )
        assert [m.value for m in listed.memories] == ["far future"]  # the other is long expired
        got = (await running.memory.Get(memory_pb2.GetRequest(id=listed.memories[0].id))).memory
        assert got.expires_at.ToDatetime(tzinfo=UTC) == LATEST
        hits = await running.memory.Search(
            memory_pb2.SearchRequest(query="far future", mode=memory_pb2.SEARCH_MODE_TEXT)
        )
        assert [hit.memory.value for hit in hits.hits] == ["far future"]
    finally:
        await stop_server(running)

    conn = await asyncpg.connect(empty_database_url)
    try:
        # And the constraint now refuses such a row from any writer.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                """INSERT INTO memory.memories (scope, scope_id, key, value, content_hash, expires_at)
                   VALUES ('agent', 9, 'again', 'again', '\\x00', '20000-01-01 00:00:00+00')"""
            )
        assert await conn.fetchval("SELECT count(*) FROM memory.memories WHERE expires_at < '0001-01-02+00'") == 1
    finally:
        await conn.close()
