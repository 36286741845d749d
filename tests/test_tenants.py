"""Tokens in PostgreSQL: the `tokens` command, authentication and permissions, revocation and expiry within 5 s,
quotas answered with google.rpc.QuotaFailure, per-token metrics, and the start-up check of row-level security."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from memory_service.errors import StartupError
from memory_service.tenants.types import Permission, ScopeGrant
from memory_service.v1 import lease_pb2, memory_pb2
from tests.conftest import start_server, stop_server
from tests.conftest import test_env as server_env
from tests.tenancy import bearer, create_token, memory, refused, scopes

AGENT = memory_pb2.SCOPE_AGENT
STATIC = "operator-token-0123456789abcdef"
READ_ONLY = frozenset({Permission.READ})


def quota_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    found = []
    for detail in status.details:
        failure = error_details_pb2.QuotaFailure()
        if detail.Unpack(failure):
            found.extend((v.subject, v.description) for v in failure.violations)
    return found


def cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memory_service", *args, "--database-url", dsn],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
async def served(database_url: str) -> AsyncIterator[tuple[str, object]]:
    """Tokens first (the fixture's tests create theirs before calling this), then a server with AUTH_TOKENS too."""
    running = None

    async def start() -> object:
        nonlocal running
        running = await start_server(server_env(database_url, AUTH_TOKENS=STATIC))
        return running

    yield database_url, start
    if running is not None:
        await stop_server(running)


def test_scope_grants_parse_as_documented() -> None:
    assert str(ScopeGrant.parse("agent:7")) == "agent:7"
    assert str(ScopeGrant.parse("project:*")) == "project:*"
    assert str(ScopeGrant.parse("*")) == "*"
    assert str(ScopeGrant.parse("global")) == "global:0"
    for wrong in ("agent", "planet:1", "agent:-1", "agent:x", "global:3"):
        with pytest.raises(ValueError):
            ScopeGrant.parse(wrong)


async def test_the_tokens_command_prints_the_secret_once_and_revoke_takes_effect_within_5s(
    served: tuple[str, object],
) -> None:
    dsn, start = served
    created = await asyncio.to_thread(cli, "tokens", "create", "team-a", "--scope", "agent:7", "--write", dsn=dsn)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert created.stdout == secret + "\n" and len(secret) > 40
    listed = await asyncio.to_thread(cli, "tokens", "list", dsn=dsn)
    (line,) = [json.loads(text) for text in listed.stdout.splitlines()]
    assert line["name"] == "team-a" and line["scopes"] == ["agent:7"] and line["permissions"] == ["write"]
    assert secret not in listed.stdout and "sha256" not in listed.stdout
    again = await asyncio.to_thread(cli, "tokens", "create", "team-a", "--scope", "agent:7", dsn=dsn)
    assert again.returncode == 1 and "exists" in again.stderr

    running = await start()  # type: ignore[operator]
    stub = running.memory
    await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 7, "a note")), metadata=bearer(secret))
    await refused(stub.List(memory_pb2.ListRequest(), metadata=bearer(secret)), grpc.StatusCode.PERMISSION_DENIED)
    await refused(stub.List(memory_pb2.ListRequest()), grpc.StatusCode.UNAUTHENTICATED)
    await refused(stub.List(memory_pb2.ListRequest(), metadata=bearer("mst_made-up")), grpc.StatusCode.UNAUTHENTICATED)
    # AUTH_TOKENS keep full access beside the table's tokens; its writes are recorded under its fingerprint.
    listed_all = await stub.List(memory_pb2.ListRequest(), metadata=bearer(STATIC))
    assert [m.value for m in listed_all.memories] == ["a note"]
    history = await stub.History(memory_pb2.HistoryRequest(id=listed_all.memories[0].id), metadata=bearer(STATIC))
    assert history.versions[0].principal == "team-a"

    revoked = await asyncio.to_thread(cli, "tokens", "revoke", "team-a", dsn=dsn)
    assert revoked.returncode == 0, revoked.stderr
    began = time.monotonic()
    while True:
        try:
            await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 7, "after")), metadata=bearer(secret))
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() - began < 6.0, "the revoked token still works after 5 s"
        await asyncio.sleep(0.2)
    (line,) = [
        json.loads(text) for text in (await asyncio.to_thread(cli, "tokens", "list", dsn=dsn)).stdout.splitlines()
    ]
    assert line["revoked"] is not None and line["last_used"] is not None


async def test_permissions_and_expiry(served: tuple[str, object]) -> None:
    dsn, start = served
    reader = bearer(await create_token(dsn, "reader", ["agent:1"], permissions=READ_ONLY))
    writer = bearer(await create_token(dsn, "writer", ["agent:1"], permissions=frozenset({Permission.WRITE})))
    running = await start()  # type: ignore[operator]
    stub, denied = running.memory, grpc.StatusCode.PERMISSION_DENIED
    stored = await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 1, "kept")), metadata=writer)
    assert (await stub.Get(memory_pb2.GetRequest(id=stored.id), metadata=reader)).memory.value == "kept"
    for call in (
        stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 1, "x")), metadata=reader),
        stub.Delete(memory_pb2.DeleteRequest(id=stored.id), metadata=reader),
        stub.Embed(memory_pb2.EmbedRequest(texts=["x"]), metadata=reader),
        stub.Erase(
            memory_pb2.EraseRequest(scope=memory_pb2.ScopeRef(scope=AGENT, scope_id=1), id=stored.id), metadata=writer
        ),
        stub.Get(memory_pb2.GetRequest(id=stored.id), metadata=writer),
        running.leases.List(lease_pb2.ListLeasesRequest(namespace="jobs"), metadata=reader),
    ):
        await refused(call, denied)
    # Made while the server runs (a loaded machine may take seconds to start one), used before it expires.
    began = time.monotonic()
    brief = bearer(await create_token(dsn, "brief", ["agent:1"], expires_in=timedelta(seconds=3)))
    await stub.Get(memory_pb2.GetRequest(id=stored.id), metadata=brief)
    while True:
        try:
            await stub.Get(memory_pb2.GetRequest(id=stored.id), metadata=brief)
        except grpc.aio.AioRpcError as error:
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() - began < 3.0 + 6.0, "the expired token still works 5 s after its expiry"
        await asyncio.sleep(0.2)


async def test_memory_quota_refuses_the_write_that_would_pass_it_and_stores_nothing_of_it(
    served: tuple[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="memory_service")
    dsn, start = served
    secret = await create_token(dsn, "capped", ["agent:3", "agent:4"], max_memories=3)
    capped = bearer(secret)
    running = await start()  # type: ignore[operator]
    stub = running.memory
    for i, scope_id in enumerate((3, 4, 3)):
        await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, scope_id, f"n{i}", key=f"k{i}")), metadata=capped)
    over = memory_pb2.StoreRequest(memory=memory(AGENT, 4, "one too many", key="k3"))
    error = await refused(stub.Store(over, metadata=capped), grpc.StatusCode.RESOURCE_EXHAUSTED)
    ((subject, description),) = quota_violations(error)
    assert subject == "token:capped" and description.startswith("max_memories:")
    listed = await stub.List(memory_pb2.ListRequest(), metadata=capped)
    assert sorted(m.value for m in listed.memories) == ["n0", "n1", "n2"]
    # Updating a memory adds none; deleting one makes room again.
    await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 3, "n0 changed", key="k0")), metadata=capped)
    await stub.Delete(memory_pb2.DeleteRequest(id=listed.memories[1].id), metadata=capped)
    await stub.Store(over, metadata=capped)

    async def bulk() -> AsyncIterator[memory_pb2.BulkStoreRequest]:
        yield memory_pb2.BulkStoreRequest(
            items=[memory_pb2.BulkItem(sequence=i, memory=memory(AGENT, 3, f"bulk {i}", key=f"b{i}")) for i in (1, 2)]
        )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.BulkStore(bulk(), metadata=capped):
            pass
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota_violations(caught.value)[0][0] == "token:capped"
    # Logs name the token, never its secret.
    assert "bulk stream of capped ended" in caplog.text and secret not in caplog.text
    listed = await stub.List(memory_pb2.ListRequest(), metadata=capped)
    assert len(listed.memories) == 3 and not any(m.value.startswith("bulk") for m in listed.memories)
    refusals = running.server.metrics.registry.get_sample_value(
        "memory_token_quota_refusals_total", {"token": "capped", "quota": "max_memories"}
    )
    assert refusals == 2
    assert running.server.metrics.registry.get_sample_value("memory_token_memories", {"token": "capped"}) is not None


async def test_rate_quota_answers_resource_exhausted(served: tuple[str, object]) -> None:
    dsn, start = served
    limited = bearer(await create_token(dsn, "limited", ["agent:5"], rate=2.0))
    running = await start()  # type: ignore[operator]

    async def list_once() -> grpc.StatusCode:
        try:
            await running.memory.List(memory_pb2.ListRequest(), metadata=limited)
        except grpc.aio.AioRpcError as error:
            assert quota_violations(error) == [("token:limited", "rate: at most 2 calls per second")]
            return error.code()
        return grpc.StatusCode.OK

    # All at once, so a slow machine cannot spread them over enough seconds for the bucket to refill.
    codes = await asyncio.gather(*(list_once() for _ in range(8)))
    assert 1 <= codes.count(grpc.StatusCode.OK) <= 4, codes
    assert codes.count(grpc.StatusCode.OK) + codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(codes)
    calls = running.server.metrics.registry.get_sample_value(
        "memory_token_calls_total", {"token": "limited", "grpc_code": "RESOURCE_EXHAUSTED"}
    )
    assert calls == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)


async def test_the_server_refuses_to_start_when_isolation_is_not_in_force(database_url: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE memory.changes NO FORCE ROW LEVEL SECURITY")
    finally:
        await conn.close()
    with pytest.raises(StartupError, match=r"row-level security is not enabled and FORCEd on memory\.changes"):
        await start_server(server_env(database_url))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "memory_service", "serve"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **server_env(database_url)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("memory-service: error: tenant isolation is not in force, refusing to start:")


MISCONFIGURED = {
    # Role attributes belong to the cluster: each case undoes itself, whatever the test's outcome.
    "bypassrls": (
        "ALTER ROLE memory_calls BYPASSRLS",
        "ALTER ROLE memory_calls NOBYPASSRLS",
        r"the role memory_calls bypasses row-level security \(it is a superuser or has BYPASSRLS\)",
    ),
    "superuser": (
        "ALTER ROLE memory_calls_kinds SUPERUSER",
        "ALTER ROLE memory_calls_kinds NOSUPERUSER",
        r"the role memory_calls_kinds bypasses row-level security",
    ),
    "open policy": (
        "CREATE POLICY everything ON memory.memory_versions TO memory_calls USING (true)",
        "DROP POLICY everything ON memory.memory_versions",
        r"policies of memory\.memory_versions other than the calls roles' apply to memory_calls: everything",
    ),
}


@pytest.mark.parametrize("case", list(MISCONFIGURED))
async def test_the_server_refuses_to_start_when_the_calls_role_can_bypass_the_policies(
    database_url: str, case: str
) -> None:
    breaks, repairs, message = MISCONFIGURED[case]
    conn = await asyncpg.connect(database_url)
    try:
        if breaks.startswith("ALTER ROLE") and not await conn.fetchval(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ):
            pytest.skip("changing a role's attributes needs a superuser (TEST_DATABASE_URL's user is not one)")
        await conn.execute(breaks)
        try:
            with pytest.raises(StartupError, match="tenant isolation is not in force, refusing to start: " + message):
                await start_server(server_env(database_url))
        finally:
            await conn.execute(repairs)
        running = await start_server(server_env(database_url))  # repaired, it starts
        await stop_server(running)
    finally:
        await conn.close()


async def test_a_revoked_token_is_refused_within_5s_by_every_instance(database_url: str) -> None:
    secret = bearer(await create_token(database_url, "everywhere", ["agent:2"]))
    instances = [await start_server(server_env(database_url)) for _ in range(2)]
    try:
        for running in instances:  # each instance has resolved and cached the grant
            await running.memory.List(memory_pb2.ListRequest(), metadata=secret)
        revoked = await asyncio.to_thread(cli, "tokens", "revoke", "everywhere", dsn=database_url)
        assert revoked.returncode == 0, revoked.stderr
        began = time.monotonic()
        refused_after: dict[int, float] = {}
        while len(refused_after) < len(instances):
            for n, running in enumerate(instances):
                if n in refused_after:
                    continue
                try:
                    await running.memory.List(memory_pb2.ListRequest(), metadata=secret)
                except grpc.aio.AioRpcError as error:
                    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
                    refused_after[n] = time.monotonic() - began
            assert time.monotonic() - began < 6.0, f"still served after 5 s by instances not in {refused_after}"
            await asyncio.sleep(0.1)
        # Refused for good: no instance serves it again once it has refused it.
        for running in instances:
            await refused(
                running.memory.List(memory_pb2.ListRequest(), metadata=secret), grpc.StatusCode.UNAUTHENTICATED
            )
    finally:
        for running in instances:
            await stop_server(running)


async def test_scope_counts_stay_exact_and_fold_into_one_row(database_url: str) -> None:
    from memory_service.memories.purge import fold_scope_counts

    running = await start_server(server_env(database_url))
    try:
        stub = running.memory
        stored = [
            await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 9, f"note {i}", key=f"k{i}")))
            for i in range(5)
        ]
        await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 9, "note 0 changed", key="k0")))
        await stub.Delete(memory_pb2.DeleteRequest(id=stored[1].id))
        conn = await asyncpg.connect(database_url)
        try:
            query = "SELECT count(*), sum(memories) FROM memory.scope_usage WHERE scope = 'agent' AND scope_id = 9"
            rows, count = await conn.fetchrow(query)
            assert count == 4 and rows == 6  # five inserts and a delete appended; the update added nothing
            assert await fold_scope_counts(running.server.runtime.db) == 6
            assert tuple(await conn.fetchrow(query)) == (1, 4)
        finally:
            await conn.close()
    finally:
        await stop_server(running)


async def test_the_scopes_of_quota_bound_tokens_fold_every_few_seconds(database_url: str) -> None:
    from memory_service.memories.purge import fold_quota_scopes

    capped = bearer(await create_token(database_url, "capped-fold", ["agent:20"], max_memories=100))
    running = await start_server(server_env(database_url, AUTH_TOKENS=STATIC))  # PURGE_INTERVAL 1h: no purge fold
    conn = await asyncpg.connect(database_url)
    query = "SELECT count(*), sum(memories) FROM memory.scope_usage WHERE scope = 'agent' AND scope_id = $1"
    try:
        stub = running.memory
        for i in range(5):
            await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 20, f"n{i}", key=f"k{i}")), metadata=capped)
            await stub.Store(
                memory_pb2.StoreRequest(memory=memory(AGENT, 21 + i % 2, f"n{i}", key=f"k{i}")), metadata=bearer(STATIC)
            )
        began = time.monotonic()
        while tuple(await conn.fetchrow(query, 20)) != (1, 5):
            assert time.monotonic() - began < 8.0, "the quota-bound scope's counts were not folded"
            await asyncio.sleep(0.2)
        # Scopes no quota-bound token holds are left to the purge; a kind-wide grant folds the whole kind.
        assert tuple(await conn.fetchrow(query, 21)) == (3, 3)
        assert await fold_quota_scopes(running.server.runtime.db, {ScopeGrant.parse("agent:*")}) == 5
        assert [tuple(await conn.fetchrow(query, i)) for i in (20, 21, 22)] == [(1, 5), (1, 3), (1, 2)]
    finally:
        await conn.close()
        await stop_server(running)


async def test_bulk_loads_of_every_role_share_one_pooled_connection(database_url: str) -> None:
    """BulkStore stages rows in a temporary table that lives as long as the pooled connection; it belongs to the
    role that made it, and one connection serves full-access calls (the login role) and scoped ones (the calls
    roles). Before the staging table was granted to every role, a scoped token's BulkStore into its own scope
    failed with PERMISSION_DENIED (all of it, not the row) once a full-access load had run on its connection."""
    one_kind = bearer(await create_token(database_url, "bulk-one", ["agent:7"]))
    two_kinds = bearer(await create_token(database_url, "bulk-two", ["agent:8", "project:8"]))
    full = bearer(STATIC)
    running = await start_server(server_env(database_url, AUTH_TOKENS=STATIC, DATABASE_POOL_MAX="1"))
    try:
        for round_, (caller, scope_id, name) in enumerate(
            [(full, 9, "full"), (one_kind, 7, "one"), (two_kinds, 8, "two"), (full, 9, "full"), (one_kind, 7, "one")]
        ):

            async def rows(
                scope_id: int = scope_id, round_: int = round_
            ) -> AsyncIterator[memory_pb2.BulkStoreRequest]:
                yield memory_pb2.BulkStoreRequest(
                    items=[
                        memory_pb2.BulkItem(
                            sequence=1, memory=memory(AGENT, scope_id, f"row {round_}", key=f"k{round_}")
                        ),
                        memory_pb2.BulkItem(sequence=2, memory=memory(AGENT, 6, "not granted", key=f"x{round_}")),
                    ]
                )

            acks = [ack async for ack in running.memory.BulkStore(rows(), metadata=caller)]
            assert sum(ack.created for ack in acks) == (2 if name == "full" else 1), name
            rejected = [(r.sequence, r.field) for ack in acks for r in ack.rejections]
            assert rejected == ([] if name == "full" else [(2, "memory.scope")]), name
        got = await running.memory.List(memory_pb2.ListRequest(filter=scopes((AGENT, 7))), metadata=one_kind)
        assert sorted(m.value for m in got.memories) == ["row 1", "row 4"]
    finally:
        await stop_server(running)


async def test_an_admin_token_reaches_every_scope_as_documented(served: tuple[str, object]) -> None:
    """``--admin`` is "everything, in every scope": the command required a --scope with it, and the token was then
    confined to that scope for memories while it saw server-wide Stats. A token made that way before keeps working
    as an admin of every scope."""
    dsn, start = served
    made = await asyncio.to_thread(cli, "tokens", "create", "root", "--admin", dsn=dsn)
    assert made.returncode == 0, made.stderr
    admin = bearer(made.stdout.strip())
    mixed = await asyncio.to_thread(cli, "tokens", "create", "odd", "--admin", "--scope", "agent:1", dsn=dsn)
    assert mixed.returncode != 0 and "--scope" in mixed.stderr
    unscoped = await asyncio.to_thread(cli, "tokens", "create", "nobody", "--read", dsn=dsn)
    assert unscoped.returncode != 0 and "--scope" in unscoped.stderr
    legacy = await asyncio.to_thread(cli, "tokens", "create", "old-root", "--admin", dsn=dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE memory.tokens SET scopes = '{project:99}' WHERE name = 'old-root'")
    finally:
        await conn.close()
    one_scope = bearer(await create_token(dsn, "team", ["agent:1"]))
    running = await start()  # type: ignore[operator]
    stub = running.memory
    await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 1, "team note")), metadata=one_scope)
    for token in (admin, bearer(legacy.stdout.strip())):
        stored = await stub.Store(memory_pb2.StoreRequest(memory=memory(AGENT, 7, "admin note")), metadata=token)
        listed = await stub.List(memory_pb2.ListRequest(), metadata=token)
        assert {m.value for m in listed.memories} == {"team note", "admin note"}
        found = await stub.Search(memory_pb2.SearchRequest(query="team note", top_k=5), metadata=token)
        assert "team note" in [hit.memory.value for hit in found.hits]
        assert (await stub.Stats(memory_pb2.StatsRequest(), metadata=token)).memories == 2
        receipt = await stub.Erase(
            memory_pb2.EraseRequest(scope=memory_pb2.ScopeRef(scope=AGENT, scope_id=7), id=stored.id), metadata=token
        )
        assert list(receipt.memory_ids) == [stored.id]
