"""A database that answers but refuses writes: made read-only (ALTER DATABASE ... default_transaction_read_only, the
sessions terminated so they pick it up) or out of disk (a tablespace on a full filesystem), on the real test server.

Writes answer UNAVAILABLE (read-only) or RESOURCE_EXHAUSTED (out of resources) with a message that says so, never
INTERNAL; reads go on; the episode is logged once, not once per call, and shows in Stats and in the
``memory_db_writes_refused`` gauge; health stays SERVING (reads work, and the database is every instance's); once
the database accepts writes again the server notices by itself and writes succeed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory_service.errors import DatabaseResourcesExhausted
from memory_service.storage.database import driver_error
from memory_service.storage.embedded import EmbeddedPostgres
from memory_service.v1 import lease_pb2, memory_pb2
from tests.conftest import RunningServer, code_of, start_server, stop_server, test_env, with_database

REFUSED_LINE = "database refuses writes from now on"
RESUMED_LINE = "database accepts writes again"


def note(value: str) -> memory_pb2.StoreRequest:
    return memory_pb2.StoreRequest(memory={"scope": memory_pb2.SCOPE_AGENT, "scope_id": 4, "value": value})


async def admin(server_dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def refused_code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.RpcError as error:
        return code_of(error), error.details() or ""
    return grpc.StatusCode.OK, ""


async def writes(server: RunningServer) -> list[tuple[str, grpc.StatusCode, str]]:
    """One Store, one BulkStore and one lease Acquire, with how each ended."""
    results = []
    code, details = await refused_code(server.memory.Store(note(f"store {uuid.uuid4()}"), timeout=20))
    results.append(("Store", code, details))
    bulk = memory_pb2.BulkStoreRequest(
        items=[
            memory_pb2.BulkItem(sequence=1, memory={"scope": memory_pb2.SCOPE_AGENT, "scope_id": 4, "value": "bulk"})
        ]
    )
    try:
        async for _ in server.memory.BulkStore(iter([bulk]), timeout=20):
            pass
        results.append(("BulkStore", grpc.StatusCode.OK, ""))
    except grpc.RpcError as error:
        results.append(("BulkStore", code_of(error), error.details() or ""))
    acquire = lease_pb2.AcquireRequest(namespace="refusals", name=uuid.uuid4().hex, ttl={"seconds": 30})
    code, details = await refused_code(server.leases.Acquire(acquire, timeout=20))
    results.append(("Acquire", code, details))
    return results


async def until_refusing(server: RunningServer, expected: grpc.StatusCode) -> None:
    """Store until it is refused with ``expected`` (the first calls may meet connections the fault terminated)."""
    for _ in range(100):
        code, _ = await refused_code(server.memory.Store(note(f"probe {uuid.uuid4()}"), timeout=20))
        if code is expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"writes were never refused with {expected.name}")


async def until_stats(server: RunningServer, *, refused: bool) -> memory_pb2.StatsResponse:
    for _ in range(200):
        stats = await server.memory.Stats(memory_pb2.StatsRequest(), timeout=20)
        if stats.HasField("writes_refused") == refused:
            return stats
        await asyncio.sleep(0.1)
    raise AssertionError(f"Stats never showed writes_refused={refused}")


def lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


async def assert_refusal_episode(
    server: RunningServer, caplog: pytest.LogCaptureFixture, expected: grpc.StatusCode, wording: str, before: int
) -> None:
    await until_refusing(server, expected)
    for _ in range(3):
        for rpc, code, details in await writes(server):
            assert code is expected, (rpc, code, details)
            assert wording in details, (rpc, details)
    # Reads go on, and health stays SERVING.
    got = await server.memory.Get(memory_pb2.GetRequest(id=before))
    assert got.memory.value == "stored before the episode"
    health = health_pb2_grpc.HealthStub(server.channel)
    checked = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    stats = await until_stats(server, refused=True)
    assert stats.writes_refused.refused_calls >= 9 and wording in stats.writes_refused.reason
    assert server.server.metrics.registry.get_sample_value("memory_db_writes_refused") == 1.0
    # Once per episode, not once per call; never a traceback.
    assert lines(caplog, REFUSED_LINE) == 1
    assert not [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]


@pytest.fixture
async def refusable(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(test_env(database_url, HEALTH_CHECK_INTERVAL="200ms"))
    yield running
    await stop_server(running)


async def test_a_read_only_database_refuses_writes_as_unavailable_once_per_episode(
    refusable: RunningServer, database_url: str, server_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    name = urlsplit(database_url).path.lstrip("/")
    terminate = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    before = await refusable.memory.Store(note("stored before the episode"))
    await admin(server_dsn, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on', terminate)
    try:
        await assert_refusal_episode(refusable, caplog, grpc.StatusCode.UNAVAILABLE, "read-only", before.id)
    finally:
        await admin(server_dsn, f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    await until_stats(refusable, refused=False)
    assert refusable.server.metrics.registry.get_sample_value("memory_db_writes_refused") == 0.0
    assert lines(caplog, RESUMED_LINE) == 1
    # The pooled connections opened read-only were replaced: every write works again.
    assert all(code is grpc.StatusCode.OK for _, code, _ in await writes(refusable))


def test_out_of_resources_maps_to_resource_exhausted() -> None:
    """Each SQLSTATE of class 53 but too-many-connections (which is unavailable) refuses as out of resources."""
    for cls in (asyncpg.DiskFullError, asyncpg.OutOfMemoryError, asyncpg.InsufficientResourcesError):
        assert isinstance(driver_error(cls("could not extend file")), DatabaseResourcesExhausted)
    assert not isinstance(driver_error(asyncpg.TooManyConnectionsError("too many")), DatabaseResourcesExhausted)


@pytest.fixture
def small_filesystem(embedded_postgres: EmbeddedPostgres | None) -> Iterator[Path]:
    """A 64 MiB tmpfs owned by the embedded server's user, or a skip where none can be mounted."""
    if embedded_postgres is None:
        pytest.skip("needs the embedded test server: the tablespace must be on this machine")
    # Not under pytest's tmp_path: the server's user must reach it, and pytest's directories are private.
    mount = Path(tempfile.mkdtemp(prefix="ms-full-", dir="/tmp"))
    owner = os.stat(embedded_postgres.pgdata)
    options = f"size=64m,uid={owner.st_uid},gid={owner.st_gid},mode=0700"
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


async def test_a_full_disk_refuses_writes_as_resource_exhausted(
    small_filesystem: Path, server_dsn: str, template_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    space, name = f"full_{uuid.uuid4().hex[:8]}", f"t_{uuid.uuid4().hex[:16]}"
    await admin(
        server_dsn,
        f"CREATE TABLESPACE {space} LOCATION '{small_filesystem}'",
        f'CREATE DATABASE "{name}" TEMPLATE "memory_service_test_template" TABLESPACE {space}',
    )
    dsn = with_database(server_dsn, name)
    running = await start_server(test_env(dsn, HEALTH_CHECK_INTERVAL="200ms"))
    filler = small_filesystem / "filler"
    try:
        before = await running.memory.Store(note("stored before the episode"))
        # The disk fills up (but for half a MiB), as it does when something else on it grows.
        free = os.statvfs(small_filesystem)
        filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 512 * 1024))
        for filled in range(200):  # values are random, so they do not compress
            value = f"{filled} {secrets.token_hex(15_000)}"
            code, details = await refused_code(running.memory.Store(note(value), timeout=20))
            if code is not grpc.StatusCode.OK:
                assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
                break
        await assert_refusal_episode(running, caplog, grpc.StatusCode.RESOURCE_EXHAUSTED, "out of resources", before.id)
        filler.unlink()  # room again: the probe notices, and writes go on
        await until_stats(running, refused=False)
        assert lines(caplog, RESUMED_LINE) == 1
        assert all(code is grpc.StatusCode.OK for _, code, _ in await writes(running))
    finally:
        await stop_server(running)
        await admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f"DROP TABLESPACE IF EXISTS {space}")
