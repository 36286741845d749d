"""Shared fixtures: a real PostgreSQL (TEST_DATABASE_URL, or an embedded one) and real gRPC servers on loopback."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from grpc import aio

from memory_service.app.server import MemoryServer
from memory_service.config.settings import Settings
from memory_service.storage.embedded import EmbeddedPostgres
from memory_service.storage.migrations import apply_migrations
from memory_service.v1 import lease_pb2_grpc, memory_pb2_grpc

TEMPLATE_DB = "memory_service_test_template"


def with_database(dsn: str, database: str) -> str:
    """The same server, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def embedded_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres | None]:
    if os.environ.get("TEST_DATABASE_URL"):
        yield None
        return
    # A short path keeps the Unix socket inside the data directory.
    embedded = EmbeddedPostgres(Path(tmp_path_factory.mktemp("pg")))
    embedded.start()
    yield embedded
    embedded.stop(force=True)


@pytest.fixture(scope="session")
def server_dsn(embedded_postgres: EmbeddedPostgres | None) -> str:
    """DSN of the maintenance database on the test server."""
    return os.environ.get("TEST_DATABASE_URL") or embedded_postgres.dsn  # type: ignore[union-attr]


@pytest.fixture(scope="session")
async def template_dsn(server_dsn: str) -> str:
    """A migrated database that each test's database is cloned from."""
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    finally:
        await conn.close()
    dsn = with_database(server_dsn, TEMPLATE_DB)
    await apply_migrations(dsn)
    return dsn


async def create_database(server_dsn: str, template: str | None = None) -> str:
    name = "t_" + uuid.uuid4().hex[:16]
    conn = await asyncpg.connect(server_dsn)
    try:
        suffix = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{suffix}')
    finally:
        await conn.close()
    return with_database(server_dsn, name)


async def drop_database(server_dsn: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def database_url(server_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    dsn = await create_database(server_dsn, TEMPLATE_DB)
    yield dsn
    await drop_database(server_dsn, dsn)


@pytest.fixture
async def empty_database_url(server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no migrations applied."""
    dsn = await create_database(server_dsn)
    yield dsn
    await drop_database(server_dsn, dsn)


def test_env(database_url: str, **overrides: str) -> dict[str, str]:
    """Environment for a server under test: loopback, free ports, the given database."""
    env = {
        "DATABASE_URL": database_url,
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": "0",
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": "0",
        "DATABASE_POOL_MIN": "1",
        "DATABASE_POOL_MAX": "8",
        "SHUTDOWN_GRACE": "5s",
        "PURGE_INTERVAL": "1h",
        # One process: what a test signals or kills is the server itself (tests/test_processes.py runs several).
        "SERVER_PROCESSES": "1",
        # VECTOR_INDEX is left at its default (hnsw); the tests of ivfflat's lists and probes ask for ivfflat.
    }
    env.update(overrides)
    return env


test_env.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test, despite its name


class RunningServer:
    """An in-process server and channels to it."""

    def __init__(self, server: MemoryServer, channel: aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.memory = memory_pb2_grpc.MemoryServiceStub(channel)
        self.leases = lease_pb2_grpc.LeaseServiceStub(channel)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def start_server(env: dict[str, str]) -> RunningServer:
    server = MemoryServer(Settings.from_env(env))
    await server.start()
    channel = aio.insecure_channel(f"127.0.0.1:{server.port}")
    return RunningServer(server, channel)


async def stop_server(running: RunningServer) -> None:
    await running.channel.close()
    await running.server.stop(grace=1)


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(test_env(database_url))
    yield running
    await stop_server(running)


def code_of(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, grpc.RpcError), error
    return error.code()  # type: ignore[no-any-return]


def bad_request_fields(error: BaseException) -> list[str]:
    """The fields of the ``google.rpc.BadRequest`` violations an INVALID_ARGUMENT carries, decoded as a client would."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    assert isinstance(error, grpc.RpcError), error
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    fields = []
    for detail in status.details:
        request = error_details_pb2.BadRequest()
        if detail.Unpack(request):
            fields.extend(v.field for v in request.field_violations)
    return fields
