"""Bearer tokens, TLS, and deadlines that cancel the SQL they were waiting on."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory_service.client import MemoryClient
from memory_service.v1 import memory_pb2, memory_pb2_grpc
from tests.conftest import RunningServer, code_of, start_server, stop_server, test_env

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture
async def authed_server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(test_env(database_url, AUTH_TOKENS=f"another-token-abcdefghijkl,{TOKEN}"))
    yield running
    await stop_server(running)


async def test_calls_without_a_valid_token_are_unauthenticated(authed_server: RunningServer) -> None:
    request = memory_pb2.StatsRequest()
    for metadata in ((), (("authorization", "Bearer wrong-token-xxxxxxxxxxxx"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as caught:
            await authed_server.memory.Stats(request, metadata=metadata)
        assert code_of(caught.value) == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in (caught.value.details() or "")
    response = await authed_server.memory.Stats(request, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert response.dimension == 384


async def test_health_stays_open_with_auth(authed_server: RunningServer) -> None:
    health = health_pb2_grpc.HealthStub(authed_server.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING


async def test_client_sends_its_token(authed_server: RunningServer) -> None:
    async with MemoryClient(authed_server.address, token=TOKEN) as client:
        stored = await client.store("Alice prefers green tea", scope="agent", scope_id=7)
        hits = (await client.search("green tea", scope="agent", scope_id=7)).hits
    assert [h.memory.id for h in hits] == [stored.id]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_tls(database_url: str, tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    running = await start_server(test_env(database_url, TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key)))
    try:
        async with MemoryClient(f"localhost:{running.server.port}", root_certificates=cert.read_bytes()) as client:
            assert (await client.stats()).dimension == 384
        async with aio.insecure_channel(f"127.0.0.1:{running.server.port}") as plain:
            with pytest.raises(grpc.RpcError) as caught:
                await memory_pb2_grpc.MemoryServiceStub(plain).Stats(memory_pb2.StatsRequest(), timeout=3)
            assert code_of(caught.value) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        await stop_server(running)


async def test_deadline_cancels_the_waiting_query(server: RunningServer, database_url: str) -> None:
    blocker = await asyncpg.connect(database_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE memory.memories IN EXCLUSIVE MODE")
        request = memory_pb2.StoreRequest(
            memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value="too slow")
        )
        with pytest.raises(grpc.RpcError) as caught:
            await server.memory.Store(request, timeout=1.0)
        assert code_of(caught.value) == grpc.StatusCode.DEADLINE_EXCEEDED

        async def waiting() -> int:
            value: int = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() AND pid <> pg_backend_pid()"
            )
            return value

        async with asyncio.timeout(10):
            while await waiting():
                await asyncio.sleep(0.05)
        await transaction.rollback()
    finally:
        await blocker.close()
    # Nothing was written, and the server is healthy afterwards.
    listed = await server.memory.List(memory_pb2.ListRequest())
    assert [m.value for m in listed.memories] == []
