"""LeaseService against one in-process server: the contract, validation, expiry, fencing, idempotency and Hold."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio

from memory_service.leases.manager import lock_key
from memory_service.v1 import lease_pb2, lease_pb2_grpc, memory_pb2
from tests.conftest import RunningServer, code_of, start_server, stop_server, test_env

NS = "jobs"


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(int(seconds * 1e9))
    return message


def acquire_request(
    name: str, *, ttl: float = 30.0, wait: float = 0.0, holder: str = "", request_id: str = "", namespace: str = NS
) -> lease_pb2.AcquireRequest:
    return lease_pb2.AcquireRequest(
        namespace=namespace,
        name=name,
        ttl=duration(ttl),
        wait=duration(wait),
        holder=holder,
        request_id=request_id,
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Poll an async predicate until it holds; fail after ``timeout`` (a bound on the test, not a claim)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def lease_gone(stub: lease_pb2_grpc.LeaseServiceStub, name: str, namespace: str = NS) -> bool:
    try:
        await stub.Get(lease_pb2.GetLeaseRequest(namespace=namespace, name=name))
    except grpc.RpcError as exc:
        assert code_of(exc) == grpc.StatusCode.NOT_FOUND
        return True
    return False


@contextlib.asynccontextmanager
async def advisory_lock(dsn: str, namespace: str, name: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold the name's lease lock from outside the service, as a stalled transaction would."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(namespace, name))
            yield conn
    finally:
        await conn.close()


@pytest.fixture
async def lease_server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(test_env(database_url, LEASE_MIN_TTL="100ms", LEASE_QUOTA="5"))
    yield running
    await stop_server(running)


async def test_acquire_contend_renew_release(lease_server: RunningServer) -> None:
    stub = lease_server.leases
    first = await stub.Acquire(acquire_request("nightly", ttl=10, holder="worker-a"))
    assert first.acquired and first.lease.holder == "worker-a" and first.lease.fencing_token > 0
    assert first.lease.expires_at.ToDatetime() - first.lease.acquired_at.ToDatetime() >= first.lease.ttl.ToTimedelta()

    contender = await stub.Acquire(acquire_request("nightly", holder="worker-b"))
    assert not contender.acquired and not contender.HasField("lease")
    assert contender.current_holder.holder == "worker-a"
    assert contender.current_holder.fencing_token == first.lease.fencing_token

    renewed = (await stub.Renew(lease_pb2.RenewRequest(lease_id=first.lease.lease_id))).lease
    assert renewed.fencing_token == first.lease.fencing_token
    assert renewed.expires_at.ToDatetime() >= first.lease.expires_at.ToDatetime()
    got = (await stub.Get(lease_pb2.GetLeaseRequest(namespace=NS, name="nightly"))).lease
    assert got.lease_id == first.lease.lease_id

    assert (await stub.Release(lease_pb2.ReleaseRequest(lease_id=first.lease.lease_id))).released
    assert not (await stub.Release(lease_pb2.ReleaseRequest(lease_id=first.lease.lease_id))).released
    assert await lease_gone(stub, "nightly")
    with pytest.raises(grpc.RpcError) as caught:
        await stub.Renew(lease_pb2.RenewRequest(lease_id=first.lease.lease_id))
    assert code_of(caught.value) == grpc.StatusCode.ABORTED

    second = await stub.Acquire(acquire_request("nightly", holder="worker-b"))
    assert second.acquired and second.lease.fencing_token > first.lease.fencing_token
    assert lease_server.server.metrics.leases_granted._value.get() == 2


async def test_invalid_acquire_names_the_field(lease_server: RunningServer) -> None:
    cases = [
        (acquire_request(""), "name"),
        (acquire_request("x", namespace=""), "namespace"),
        (acquire_request("bad name"), "name"),
        (acquire_request("x" * 201), "name"),
        (acquire_request("nul\x00byte"), "name"),
        (lease_pb2.AcquireRequest(namespace=NS, name="x"), "ttl"),
        (acquire_request("x", ttl=0.01), "ttl"),
        (acquire_request("x", ttl=7200), "ttl"),
        (acquire_request("x", wait=3600), "wait"),
        (acquire_request("x", wait=-1), "wait"),
        (acquire_request("x", holder="tab\there"), "holder"),
        (acquire_request("x", request_id="r" * 129), "request_id"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as caught:
            await lease_server.leases.Acquire(request)
        assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT, request
        assert caught.value.details().startswith(field + ":"), (field, caught.value.details())


async def test_invalid_lease_ids_and_renew_ttl(lease_server: RunningServer) -> None:
    stub = lease_server.leases
    for call in (
        stub.Renew(lease_pb2.RenewRequest(lease_id="not-a-uuid")),
        stub.Release(lease_pb2.ReleaseRequest(lease_id="")),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            await call
        assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("lease_id:")
    lease = (await stub.Acquire(acquire_request("ttl-check"))).lease
    with pytest.raises(grpc.RpcError) as caught:
        await stub.Renew(lease_pb2.RenewRequest(lease_id=lease.lease_id, ttl=duration(99999)))
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT


async def test_quota_per_caller(lease_server: RunningServer) -> None:
    stub = lease_server.leases
    leases = [(await stub.Acquire(acquire_request(f"q{i}", holder="greedy"))).lease for i in range(5)]
    with pytest.raises(grpc.RpcError) as caught:
        await stub.Acquire(acquire_request("q5", holder="greedy"))
    assert code_of(caught.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await stub.Acquire(acquire_request("q5", holder="modest"))).acquired
    await stub.Release(lease_pb2.ReleaseRequest(lease_id=leases[0].lease_id))
    assert (await stub.Acquire(acquire_request("q6", holder="greedy"))).acquired


async def test_wait_is_granted_when_the_holder_releases(lease_server: RunningServer) -> None:
    stub = lease_server.leases
    first = (await stub.Acquire(acquire_request("queue", holder="a"))).lease
    waiter = asyncio.ensure_future(stub.Acquire(acquire_request("queue", holder="b", wait=20)))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await stub.Release(lease_pb2.ReleaseRequest(lease_id=first.lease_id))
    second = await waiter
    assert second.acquired and second.lease.fencing_token > first.fencing_token

    timed_out = await stub.Acquire(acquire_request("queue", holder="c", wait=0.3))
    assert not timed_out.acquired and timed_out.current_holder.holder == "b"


async def test_a_wait_cut_short_by_the_client_deadline_never_grants(
    lease_server: RunningServer, database_url: str
) -> None:
    stub = lease_server.leases
    first = (await stub.Acquire(acquire_request("deadline", holder="a"))).lease
    try:
        answer = await stub.Acquire(acquire_request("deadline", holder="b", wait=60), timeout=1.0)
        assert not answer.acquired  # the server stops waiting just before the deadline and says so
    except grpc.RpcError as exc:
        assert code_of(exc) == grpc.StatusCode.DEADLINE_EXCEEDED
    await stub.Release(lease_pb2.ReleaseRequest(lease_id=first.lease_id))
    await asyncio.sleep(0.5)  # were the waiter still polling, it would take the lease now
    assert await lease_gone(stub, "deadline")
    # Whichever way the call ended, no grant was ever made after the first: the table keeps the latest grant of a
    # name, even one released since, so a grant to "b" (live or already cleaned up) would show here.
    conn = await asyncpg.connect(database_url)
    try:
        latest = await conn.fetchrow(
            "SELECT lease_id::text AS lease_id, holder FROM memory.leases WHERE namespace = $1 AND name = 'deadline'",
            NS,
        )
    finally:
        await conn.close()
    assert (latest["lease_id"], latest["holder"]) == (first.lease_id, "a")


async def test_expired_holder_is_fenced_out(lease_server: RunningServer, database_url: str) -> None:
    stub = lease_server.leases
    old = (await stub.Acquire(acquire_request("expiring", ttl=0.3, holder="old"))).lease
    await eventually(lambda: lease_gone(stub, "expiring"))
    new = (await stub.Acquire(acquire_request("expiring", ttl=30, holder="new"))).lease
    assert new.fencing_token > old.fencing_token
    # TTL is a lower bound, by the database clock.
    assert new.acquired_at.ToDatetime() >= old.renewed_at.ToDatetime() + old.ttl.ToTimedelta()

    with pytest.raises(grpc.RpcError) as caught:
        await stub.Renew(lease_pb2.RenewRequest(lease_id=old.lease_id))
    assert code_of(caught.value) == grpc.StatusCode.ABORTED
    assert not (await stub.Release(lease_pb2.ReleaseRequest(lease_id=old.lease_id))).released
    current = (await stub.Get(lease_pb2.GetLeaseRequest(namespace=NS, name="expiring"))).lease
    assert current.lease_id == new.lease_id and current.holder == "new"

    def store(token: int, value: str) -> memory_pb2.StoreRequest:
        return memory_pb2.StoreRequest(
            memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, key="report", value=value),
            fence=memory_pb2.Fence(namespace=NS, name="expiring", fencing_token=token),
        )

    with pytest.raises(grpc.RpcError) as caught:
        await lease_server.memory.Store(store(old.fencing_token, "stale write"))
    assert code_of(caught.value) == grpc.StatusCode.ABORTED
    assert (await lease_server.memory.Store(store(new.fencing_token, "fresh write"))).id > 0


async def test_expired_lease_is_never_revived(lease_server: RunningServer) -> None:
    stub = lease_server.leases
    lease = (await stub.Acquire(acquire_request("short", ttl=0.2))).lease
    await eventually(lambda: lease_gone(stub, "short"))
    with pytest.raises(grpc.RpcError) as caught:
        await stub.Renew(lease_pb2.RenewRequest(lease_id=lease.lease_id))
    assert code_of(caught.value) == grpc.StatusCode.ABORTED
    assert "expired" in caught.value.details()
    assert await lease_gone(stub, "short")


class BlackholeProxy:
    """A TCP proxy that can stop delivering the server's bytes: a response lost on the way back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackhole = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, upstream_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, downstream: bool) -> None:
            while data := await source.read(65536):
                if not (downstream and self.blackhole):
                    sink.write(data)
                    await sink.drain()

        with contextlib.suppress(Exception):
            await asyncio.gather(pipe(reader, upstream_writer, False), pipe(upstream_reader, writer, True))

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()


async def test_request_id_retry_after_lost_response_returns_the_same_grant(
    lease_server: RunningServer, database_url: str
) -> None:
    proxy = BlackholeProxy(lease_server.server.port)
    await proxy.start()
    channel = aio.insecure_channel(f"127.0.0.1:{proxy.port}")
    try:
        via_proxy = lease_pb2_grpc.LeaseServiceStub(channel)
        assert await lease_gone(via_proxy, "exactly-once")  # connects the channel
        proxy.blackhole = True
        request = acquire_request("exactly-once", holder="batch", request_id="run-2024-06-01")
        with pytest.raises(grpc.RpcError) as caught:
            await via_proxy.Acquire(request, timeout=1.0)
        assert code_of(caught.value) == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await channel.close()
        await proxy.close()

    # The server committed the grant that the client never heard of.
    conn = await asyncpg.connect(database_url)
    try:
        granted = await conn.fetchrow("SELECT lease_id, fencing_token FROM memory.leases WHERE name = 'exactly-once'")
        assert granted is not None
        retried = await lease_server.leases.Acquire(request)
        again = await lease_server.leases.Acquire(request)
        assert retried.acquired and again.acquired
        assert retried.lease.lease_id == again.lease.lease_id == str(granted["lease_id"])
        assert retried.lease.fencing_token == again.lease.fencing_token == granted["fencing_token"]
        assert await conn.fetchval("SELECT last_value FROM memory.fencing_tokens") == granted["fencing_token"]
    finally:
        await conn.close()

    other = await lease_server.leases.Acquire(acquire_request("exactly-once", holder="batch", request_id="other"))
    assert not other.acquired
    with pytest.raises(grpc.RpcError) as caught:
        await lease_server.leases.Acquire(acquire_request("another-name", holder="batch", request_id="run-2024-06-01"))
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_and_list_pages(lease_server: RunningServer) -> None:
    stub = lease_server.leases
    for i in range(5):
        await stub.Acquire(acquire_request(f"page-{i}", holder=f"h{i}", namespace="paged"))
    await stub.Acquire(acquire_request("elsewhere", namespace="other"))
    names: list[str] = []
    token = ""
    while True:
        page = await stub.List(lease_pb2.ListLeasesRequest(namespace="paged", page_size=2, page_token=token))
        assert len(page.leases) <= 2
        names += [lease.name for lease in page.leases]
        token = page.next_page_token
        if not token:
            break
    assert names == [f"page-{i}" for i in range(5)]
    everything = await stub.List(lease_pb2.ListLeasesRequest())
    assert {lease.namespace for lease in everything.leases} == {"paged", "other"}
    with pytest.raises(grpc.RpcError) as caught:
        await stub.List(lease_pb2.ListLeasesRequest(page_token="garbage!"))
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT


async def test_lease_ids_are_shown_only_to_their_owner(database_url: str) -> None:
    owner_token, other_token = "owner-token-0123456789", "other-token-0123456789"
    running = await start_server(test_env(database_url, AUTH_TOKENS=f"{owner_token},{other_token}"))
    try:
        stub = running.leases
        as_owner = (("authorization", f"Bearer {owner_token}"),)
        as_other = (("authorization", f"Bearer {other_token}"),)
        lease = (await stub.Acquire(acquire_request("private"), metadata=as_owner)).lease
        request = lease_pb2.GetLeaseRequest(namespace=NS, name="private")
        assert (await stub.Get(request, metadata=as_owner)).lease.lease_id == lease.lease_id
        seen = (await stub.Get(request, metadata=as_other)).lease
        assert seen.lease_id == "" and seen.fencing_token == lease.fencing_token
        listed = await stub.List(lease_pb2.ListLeasesRequest(), metadata=as_other)
        assert [item.lease_id for item in listed.leases] == [""]
    finally:
        await stop_server(running)


async def _events(call: aio.StreamStreamCall) -> AsyncIterator[lease_pb2.HoldEvent]:
    while (event := await call.read()) is not aio.EOF:
        yield event


async def test_hold_renews_while_the_call_lives_and_releases_when_cancelled(lease_server: RunningServer) -> None:
    stub = lease_server.leases
    call = stub.Hold()
    await call.write(lease_pb2.HoldRequest(acquire=acquire_request("held", ttl=0.6, holder="holder")))
    await call.done_writing()  # half-closing is not a release: the lease lives as long as the call
    granted = await call.read()
    assert granted.kind == lease_pb2.HoldEvent.KIND_GRANTED and granted.lease.fencing_token > 0
    renewed = await call.read()  # the server renews at about TTL/3 while the stream lives
    assert renewed.kind == lease_pb2.HoldEvent.KIND_RENEWED
    assert renewed.lease.lease_id == granted.lease.lease_id
    call.cancel()
    await eventually(lambda: lease_gone(stub, "held"))
    assert (await stub.Acquire(acquire_request("held"))).lease.fencing_token > granted.lease.fencing_token


async def test_hold_release_message_and_waiting(lease_server: RunningServer) -> None:
    stub = lease_server.leases
    blocker = (await stub.Acquire(acquire_request("shared", holder="blocker"))).lease
    call = stub.Hold()
    await call.write(lease_pb2.HoldRequest(acquire=acquire_request("shared", ttl=5, wait=20, holder="waiter")))
    waiting = await call.read()
    assert waiting.kind == lease_pb2.HoldEvent.KIND_WAITING and waiting.current_holder.holder == "blocker"
    await stub.Release(lease_pb2.ReleaseRequest(lease_id=blocker.lease_id))
    granted = await call.read()
    assert granted.kind == lease_pb2.HoldEvent.KIND_GRANTED and granted.lease.holder == "waiter"
    await call.write(lease_pb2.HoldRequest(release=True))
    kinds = [event.kind async for event in _events(call)]
    assert kinds[-1] == lease_pb2.HoldEvent.KIND_RELEASED
    assert await call.code() == grpc.StatusCode.OK
    assert await lease_gone(stub, "shared")


async def test_hold_lost_when_taken_over(lease_server: RunningServer, database_url: str) -> None:
    stub = lease_server.leases
    call = stub.Hold()
    await call.write(lease_pb2.HoldRequest(acquire=acquire_request("contested", ttl=1.5, holder="slow")))
    granted = await call.read()
    # Simulate what a stall past the TTL leaves behind: the lease has run out and someone else takes it.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE memory.leases SET expires_at = clock_timestamp() WHERE name = 'contested'")
    finally:
        await conn.close()
    taker = await stub.Acquire(acquire_request("contested", holder="taker"))
    assert taker.acquired
    kinds = [event.kind async for event in _events(call)]
    assert kinds[-1] == lease_pb2.HoldEvent.KIND_LOST
    assert taker.lease.fencing_token > granted.lease.fencing_token
    current = (await stub.Get(lease_pb2.GetLeaseRequest(namespace=NS, name="contested"))).lease
    assert current.holder == "taker"


async def test_hold_lost_when_renewals_stall_past_the_ttl(lease_server: RunningServer, database_url: str) -> None:
    stub = lease_server.leases
    call = stub.Hold()
    await call.write(lease_pb2.HoldRequest(acquire=acquire_request("stalled", ttl=1.0, holder="h")))
    granted = await call.read()
    assert granted.kind == lease_pb2.HoldEvent.KIND_GRANTED
    async with advisory_lock(database_url, NS, "stalled"):
        kinds = [event.kind async for event in _events(call)]
        assert kinds[-1] == lease_pb2.HoldEvent.KIND_LOST
    successor = await stub.Acquire(acquire_request("stalled", holder="next", wait=10))
    assert successor.acquired and successor.lease.fencing_token > granted.lease.fencing_token


async def test_hold_first_message_must_acquire(lease_server: RunningServer) -> None:
    call = lease_server.leases.Hold()
    await call.write(lease_pb2.HoldRequest(release=True))
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("later", "field"),
    [
        (lease_pb2.HoldRequest(acquire=acquire_request("second")), "acquire"),
        (lease_pb2.HoldRequest(release=False), "release"),
    ],
)
async def test_a_later_hold_message_that_is_not_a_release_names_its_field_and_ends_the_lease(
    lease_server: RunningServer, later: lease_pb2.HoldRequest, field: str
) -> None:
    """The error named the oneof ("action"), which is no field a client can look up, and the RELEASED event before it
    said "released at your request" of a release nobody asked for."""
    stub = lease_server.leases
    call = stub.Hold()
    await call.write(lease_pb2.HoldRequest(acquire=acquire_request(f"misused-{field}", ttl=5, holder="h")))
    assert (await call.read()).kind == lease_pb2.HoldEvent.KIND_GRANTED
    await call.write(later)
    events: list[lease_pb2.HoldEvent] = []
    with contextlib.suppress(grpc.aio.AioRpcError):  # the error ends the stream after the event
        async for event in _events(call):
            events.append(event)
    assert [e.kind for e in events] == [lease_pb2.HoldEvent.KIND_RELEASED]
    assert "cannot take" in events[0].reason, events[0].reason
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await call.details() or "").startswith(field + ":")
    assert await lease_gone(stub, f"misused-{field}")


async def test_hold_streams_end_with_lost_when_the_server_begins_shutdown(lease_server: RunningServer) -> None:
    stub = lease_server.leases
    call = stub.Hold()
    await call.write(lease_pb2.HoldRequest(acquire=acquire_request("draining", ttl=30)))
    assert (await call.read()).kind == lease_pb2.HoldEvent.KIND_GRANTED
    lease_server.server.runtime.leases.begin_shutdown()
    events = [event async for event in _events(call)]
    assert events[-1].kind == lease_pb2.HoldEvent.KIND_LOST and "shutting down" in events[-1].reason
    assert await lease_gone(stub, "draining")
