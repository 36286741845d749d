"""The leak suite: tenant A writes, tenant B tries every RPC against A's data, by id, by filter and by guessed ids.

B must never see, change or erase anything of A, nor learn whether one of A's ids exists: every answer B gets about
A's ids is the answer for an id that never existed. A property test sends B random filters; a last test bypasses the
service and asks PostgreSQL directly, as the calls role with B's grants, to show row-level security alone hides A.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory_service.storage.access import access_settings
from memory_service.tenants.types import Access, Permission, ScopeGrant
from memory_service.v1 import lease_pb2, memory_pb2
from tests.conftest import TEMPLATE_DB, RunningServer, create_database, drop_database, start_server, stop_server
from tests.conftest import test_env as server_env
from tests.tenancy import bearer, create_token, memory, refused, scopes

AGENT, PROJECT, GLOBAL = memory_pb2.SCOPE_AGENT, memory_pb2.SCOPE_PROJECT, memory_pb2.SCOPE_GLOBAL
MODES = (memory_pb2.SEARCH_MODE_VECTOR, memory_pb2.SEARCH_MODE_TEXT, memory_pb2.SEARCH_MODE_HYBRID)
NOT_FOUND, DENIED = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED
TTL = duration_pb2.Duration(seconds=60)
A_WORD = "zebrafish"
B_SCOPES = {(AGENT, 2), (AGENT, 3)}
READ = frozenset({Permission.READ})
"""A word only A's memories hold."""


@dataclasses.dataclass
class Tenants:
    server: RunningServer
    dsn: str
    a: tuple[tuple[str, str]]
    b: tuple[tuple[str, str]]
    a_ids: list[int]
    """A's memories: live ones first, then one A deleted (history only)."""
    b_ids: list[int]
    missing: int
    """An id no memory ever had."""
    a_lease: str


@pytest.fixture(scope="module")
async def tenants(server_dsn: str, template_dsn: str) -> AsyncIterator[Tenants]:
    dsn = await create_database(server_dsn, TEMPLATE_DB)
    a = bearer(await create_token(dsn, "tenant-a", ["agent:1", "project:10"], leases=("a",)))
    b = bearer(await create_token(dsn, "tenant-b", ["agent:2", "agent:3"], leases=("b",)))
    running = await start_server(server_env(dsn))
    try:
        yield await _populate(running, dsn, a, b)
    finally:
        await stop_server(running)
        await drop_database(server_dsn, dsn)


async def _populate(running: RunningServer, dsn: str, a: tuple[tuple[str, str]], b: tuple[tuple[str, str]]) -> Tenants:
    stub = running.memory
    a_ids = []
    for i, (scope, scope_id) in enumerate([(AGENT, 1), (AGENT, 1), (PROJECT, 10), (PROJECT, 10)]):
        text = f"{A_WORD} note {i} of tenant a, shared words apple"
        stored = await stub.Store(
            memory_pb2.StoreRequest(memory=memory(scope, scope_id, text, key=f"k{i}", tags=["t"])), metadata=a
        )
        a_ids.append(stored.id)
    await stub.Store(  # an update, so history has two versions
        memory_pb2.StoreRequest(memory=memory(AGENT, 1, f"{A_WORD} note 0 changed, apple", key="k0", tags=["t"])),
        metadata=a,
    )
    gone = await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 1, f"{A_WORD} gone", key="gone")), metadata=a)
    await stub.Delete(memory_pb2.DeleteRequest(id=gone.id), metadata=a)
    a_ids.append(gone.id)
    b_ids = []
    for i, (scope, scope_id) in enumerate([(AGENT, 2), (AGENT, 3)]):
        text = f"note {i} of tenant b, shared words apple"
        stored = await stub.Store(
            memory_pb2.StoreRequest(memory=memory(scope, scope_id, text, key=f"k{i}", tags=["t"])), metadata=b
        )
        b_ids.append(stored.id)
    lease = await running.leases.Acquire(
        lease_pb2.AcquireRequest(namespace="a", name="job", holder="a", ttl=TTL), metadata=a
    )
    return Tenants(
        server=running,
        dsn=dsn,
        a=a,
        b=b,
        a_ids=a_ids,
        b_ids=b_ids,
        missing=max(a_ids + b_ids) + 1000,
        a_lease=lease.lease.lease_id,
    )


def same_answer(details: str | None, probed: int, missing: int, missing_details: str | None) -> bool:
    """Whether the answer about ``probed`` reads exactly as the one about a ``missing`` id."""

    def masked(text: str | None, number: int) -> str:
        return re.sub(rf"(?<!\d){number}(?!\d)", "ID", text or "", count=1)

    return masked(details, probed) == masked(missing_details, missing)


async def test_reads_by_id_answer_as_for_a_missing_id(tenants: Tenants) -> None:
    stub, b = tenants.server.memory, tenants.b
    as_of = memory_pb2.GetRequest().as_of
    as_of.GetCurrentTime()
    requests = [
        lambda i: stub.Get(memory_pb2.GetRequest(id=i), metadata=b),
        lambda i: stub.Get(memory_pb2.GetRequest(id=i, include_embedding=True), metadata=b),
        lambda i: stub.Get(memory_pb2.GetRequest(id=i, as_of=as_of), metadata=b),
        lambda i: stub.History(memory_pb2.HistoryRequest(id=i), metadata=b),
    ]
    for request in requests:
        baseline = await refused(request(tenants.missing), NOT_FOUND)
        for memory_id in tenants.a_ids:
            error = await refused(request(memory_id), NOT_FOUND)
            assert same_answer(error.details(), memory_id, tenants.missing, baseline.details())
    # A still reads its own.
    assert (await stub.Get(memory_pb2.GetRequest(id=tenants.a_ids[0]), metadata=tenants.a)).memory.scope_id == 1


async def test_lists_and_searches_return_only_the_granted_scopes(tenants: Tenants) -> None:
    stub, b = tenants.server.memory, tenants.b
    listed = await stub.List(memory_pb2.ListRequest(), metadata=b)
    assert sorted(m.id for m in listed.memories) == sorted(tenants.b_ids)
    as_of = memory_pb2.ListRequest().as_of
    as_of.GetCurrentTime()
    listed = await stub.List(memory_pb2.ListRequest(as_of=as_of), metadata=b)
    assert sorted(m.id for m in listed.memories) == sorted(tenants.b_ids)
    for mode in MODES:
        for query in (A_WORD, "apple", "note of tenant a"):
            response = await stub.Search(memory_pb2.SearchRequest(query=query, mode=mode, top_k=50), metadata=b)
            assert {hit.memory.id for hit in response.hits} <= set(tenants.b_ids), (mode, query)
        response = await stub.Search(memory_pb2.SearchRequest(query="apple", mode=mode, top_k=50), metadata=b)
        assert {hit.memory.id for hit in response.hits} == set(tenants.b_ids), mode
        response = await stub.Search(memory_pb2.SearchRequest(query=A_WORD, mode=mode, top_k=50), metadata=tenants.a)
        assert {hit.memory.id for hit in response.hits} == set(tenants.a_ids[:4]), mode


async def test_filters_naming_another_tenants_scope_are_denied_naming_the_field(tenants: Tenants) -> None:
    stub, b = tenants.server.memory, tenants.b
    for outside, index in ((scopes((AGENT, 1)), 0), (scopes((AGENT, 2), (PROJECT, 10)), 1), (scopes((AGENT, None)), 0)):
        field = f"filter.scopes[{index}]"
        for call in (
            stub.List(memory_pb2.ListRequest(filter=outside), metadata=b),
            stub.Search(memory_pb2.SearchRequest(query="apple", filter=outside), metadata=b),
            stub.Delete(memory_pb2.DeleteRequest(filter=outside), metadata=b),
        ):
            error = await refused(call, DENIED)
            assert (error.details() or "").startswith(field + ":"), error.details()
        watch = stub.Watch(memory_pb2.WatchRequest(filter=outside), metadata=b)
        error = await refused(anext(aiter(watch)), DENIED)  # type: ignore[arg-type]
        assert (error.details() or "").startswith(field + ":")


async def test_writes_cannot_reach_another_tenant(tenants: Tenants) -> None:
    stub, a, b = tenants.server.memory, tenants.a, tenants.b
    before = sorted((m.id, m.value, m.updated_at.ToNanoseconds()) for m in await _all_of(stub, a))
    error = await refused(
        stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 1, "x", key="k0")), metadata=b), DENIED
    )
    assert (error.details() or "").startswith("memory.scope:")

    async def bulk() -> AsyncIterator[memory_pb2.BulkStoreRequest]:
        yield memory_pb2.BulkStoreRequest(
            items=[
                memory_pb2.BulkItem(sequence=1, memory=memory(AGENT, 1, "overwrite", key="k1")),
                memory_pb2.BulkItem(sequence=2, memory=memory(PROJECT, 10, "new", key="b-into-a")),
                memory_pb2.BulkItem(sequence=3, memory=memory(AGENT, 2, "b's own bulk row", key="bulk")),
            ]
        )

    acks = [ack async for ack in stub.BulkStore(bulk(), metadata=b)]
    assert sum(ack.created for ack in acks) == 1
    assert sorted((r.sequence, r.field) for ack in acks for r in ack.rejections) == [
        (1, "memory.scope"),
        (2, "memory.scope"),
    ]
    for memory_id in [*tenants.a_ids, tenants.missing]:
        assert (await stub.Delete(memory_pb2.DeleteRequest(id=memory_id), metadata=b)).deleted == 0
    # A filter with no scope is narrowed to B's scopes: it deletes B's matching memories, none of A's.
    deleted = await stub.Delete(memory_pb2.DeleteRequest(filter=memory_pb2.MemoryFilter(tags=["t"])), metadata=b)
    assert deleted.deleted == len(tenants.b_ids)
    for memory_id in tenants.a_ids:
        erase = memory_pb2.EraseRequest(scope=memory_pb2.ScopeRef(scope=AGENT, scope_id=2), id=memory_id)
        receipt = await stub.Erase(erase, metadata=b)
        assert list(receipt.memory_ids) == [] and receipt.versions == 0
    for outside in (memory_pb2.ScopeRef(scope=AGENT, scope_id=1), memory_pb2.ScopeRef(scope=AGENT)):
        erase = memory_pb2.EraseRequest(scope=outside, filter=memory_pb2.MemoryFilter(tags=["t"]))
        error = await refused(stub.Erase(erase, metadata=b), DENIED)
        assert (error.details() or "").startswith("scope:")
    after = sorted((m.id, m.value, m.updated_at.ToNanoseconds()) for m in await _all_of(stub, a))
    assert after == before
    history = await stub.History(memory_pb2.HistoryRequest(id=tenants.a_ids[0]), metadata=a)
    assert len(history.versions) == 2


async def test_stats_count_only_the_granted_scopes(tenants: Tenants) -> None:
    stats = await tenants.server.memory.Stats(memory_pb2.StatsRequest(), metadata=tenants.b)
    counts = {entry.scope: entry.memories for entry in stats.by_scope}
    live_b = len(await _all_of(tenants.server.memory, tenants.b))
    assert stats.memories == sum(counts.values()) == live_b
    assert set(counts) <= {AGENT}
    assert not stats.index.exists and stats.embedding_cache_entries == 0


async def test_watch_delivers_only_the_granted_changes(tenants: Tenants) -> None:
    stub = tenants.server.memory
    seen: list[memory_pb2.Change] = []

    async def collect() -> None:
        async for change in stub.Watch(memory_pb2.WatchRequest(include_memory=True), metadata=tenants.b):
            seen.append(change)

    task = asyncio.create_task(collect())
    await stub.Store(
        memory_pb2.StoreRequest(memory=memory(AGENT, 1, f"{A_WORD} while watched", key="w")), metadata=tenants.a
    )
    await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 2, "b while watched", key="w")), metadata=tenants.b)
    for _ in range(100):
        if any(c.memory.value == "b while watched" for c in seen):
            break
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert seen, "B's own change was not delivered"
    assert all((c.scope, c.scope_id) in B_SCOPES for c in seen)
    assert all(c.memory_id not in tenants.a_ids for c in seen)


async def test_leases_stay_in_their_namespaces(tenants: Tenants) -> None:
    leases, b = tenants.server.leases, tenants.b
    for call in (
        leases.Acquire(lease_pb2.AcquireRequest(namespace="a", name="job", holder="b", ttl=TTL), metadata=b),
        leases.Get(lease_pb2.GetLeaseRequest(namespace="a", name="job"), metadata=b),
        leases.List(lease_pb2.ListLeasesRequest(namespace="a"), metadata=b),
        leases.List(lease_pb2.ListLeasesRequest(), metadata=b),
    ):
        error = await refused(call, DENIED)
        assert (error.details() or "").startswith("namespace:")
    unknown = "00000000-0000-4000-8000-000000000000"
    answers = []
    for lease_id in (tenants.a_lease, unknown):
        renew = leases.Renew(lease_pb2.RenewRequest(lease_id=lease_id), metadata=b)
        answers.append((await refused(renew, grpc.StatusCode.ABORTED)).details().replace(lease_id, "ID"))
        assert not (await leases.Release(lease_pb2.ReleaseRequest(lease_id=lease_id), metadata=b)).released
    assert answers[0] == answers[1]
    own = await leases.Acquire(lease_pb2.AcquireRequest(namespace="b", name="job", holder="b", ttl=TTL), metadata=b)
    assert own.acquired
    held = await leases.Get(lease_pb2.GetLeaseRequest(namespace="a", name="job"), metadata=tenants.a)
    assert held.lease.fencing_token > 0  # A's lease is untouched


async def _all_of(stub: object, metadata: tuple[tuple[str, str]]) -> list[memory_pb2.Memory]:
    listed = await stub.List(memory_pb2.ListRequest(page_size=1000), metadata=metadata)  # type: ignore[attr-defined]
    return list(listed.memories)


scope_refs = st.tuples(
    st.sampled_from(
        [memory_pb2.SCOPE_AGENT, memory_pb2.SCOPE_PROJECT, memory_pb2.SCOPE_GLOBAL, memory_pb2.SCOPE_CIRCLE]
    ),
    st.one_of(st.none(), st.sampled_from([0, 1, 2, 10, 11])),
)
filters = st.builds(
    lambda refs, tags, importance: memory_pb2.MemoryFilter(
        scopes=scopes(*refs).scopes, tags=tags, **({"min_importance": importance} if importance is not None else {})
    ),
    st.lists(scope_refs, max_size=3),
    st.lists(st.sampled_from(["t", "u"]), max_size=1),
    st.one_of(st.none(), st.sampled_from([0.0, 0.5])),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(memory_filter=filters, mode=st.sampled_from(MODES))
async def test_random_filters_never_return_a_row_of_another_tenant(
    tenants: Tenants, memory_filter: memory_pb2.MemoryFilter, mode: int
) -> None:
    stub, b = tenants.server.memory, tenants.b
    a_ids = set(tenants.a_ids)
    for call in (
        stub.List(memory_pb2.ListRequest(filter=memory_filter), metadata=b),
        stub.Search(
            memory_pb2.SearchRequest(query="apple zebrafish note", mode=mode, filter=memory_filter), metadata=b
        ),
    ):
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            assert error.code() is DENIED, error.details()
            continue
        rows = response.memories if isinstance(response, memory_pb2.ListResponse) else [h.memory for h in response.hits]
        assert not {m.id for m in rows} & a_ids
        assert all((m.scope, m.scope_id) in B_SCOPES for m in rows)


def set_local(role: str, scopes: list[str]) -> str:
    """The settings a scoped call of ``scopes`` runs with (as the service computes them), for ``role``."""
    access = Access(principal="tenant-b", scopes=tuple(ScopeGrant.parse(s) for s in scopes), permissions=READ)
    settings = {**access_settings(access), "role": role}
    return "; ".join(f"SET LOCAL {name} = '{value}'" for name, value in settings.items())


async def test_row_level_security_alone_hides_another_tenant(tenants: Tenants) -> None:
    """No service in the way: connections running as each calls role with B's grants, queried with no filter."""
    conn = await asyncpg.connect(tenants.dsn)
    try:
        for role in ("memory_calls", "memory_calls_kinds"):
            async with conn.transaction():
                await conn.execute(set_local(role, ["agent:2", "agent:3"]))
                for table, column in (("memories", "id"), ("memory_versions", "memory_id"), ("changes", "memory_id")):
                    ids = {r[0] for r in await conn.fetch(f"SELECT {column} FROM memory.{table}")}
                    assert ids, (role, table)
                    assert not ids & set(tenants.a_ids), (role, table)
                for table in ("memories", "memory_versions", "changes", "scope_usage"):
                    seen = await conn.fetch(f"SELECT DISTINCT scope::text, scope_id FROM memory.{table}")
                    assert {(r[0], r[1]) for r in seen} <= {("agent", 2), ("agent", 3)}, (role, table)
                owners = {r[0] for r in await conn.fetch("SELECT owner FROM memory.embedding_cache")}
                assert owners <= {"tenant-b"}, role
                # Nor can it write into A's scope, or read the tokens.
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(
                        "INSERT INTO memory.memories (scope, scope_id, key, value, content_hash) "
                        "VALUES ('agent', 1, 'x', 'x', '\\x00')"
                    )
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetch("SELECT * FROM memory.tokens")
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {role}")  # no grants set: nothing at all
                assert await conn.fetchval("SELECT count(*) FROM memory.memories") == 0
        # The one-kind role given grants of several kinds refuses rather than show too much.
        with pytest.raises(asyncpg.InvalidTextRepresentationError):
            async with conn.transaction():
                await conn.execute(set_local("memory_calls", ["agent:1", "project:10"]))
                await conn.fetchval("SELECT count(*) FROM memory.memories")
        async with conn.transaction():  # the right role: A's rows, to show they exist
            await conn.execute(set_local("memory_calls_kinds", ["agent:1", "project:10"]))
            assert await conn.fetchval("SELECT count(*) FROM memory.memories") >= 4
    finally:
        await conn.close()
