"""The health status follows PostgreSQL: NOT_SERVING while it is down, SERVING again when it is back."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory_service.app.server import SERVICE_NAMES
from memory_service.storage.embedded import EmbeddedPostgres
from memory_service.v1 import memory_pb2
from tests.conftest import start_server, stop_server, test_env
from tests.test_leases_outage import _pg_ctl, private_postgres

__all__ = ["private_postgres"]  # the fixture, used by name below

pytestmark = pytest.mark.timeout(180)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def statuses(stub: health_pb2_grpc.HealthStub) -> set[int]:
    """The status of the server as a whole and of each service, as a load balancer would ask."""
    found = set()
    for name in ("", *SERVICE_NAMES):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        found.add(response.status)
    return found


async def until(stub: health_pb2_grpc.HealthStub, status: int) -> None:
    """Poll until every service reports ``status``; the bound is on the test, not a claim about the probe."""
    async with asyncio.timeout(30):
        while await statuses(stub) != {status}:
            await asyncio.sleep(0.1)


async def test_health_follows_the_database(private_postgres: EmbeddedPostgres) -> None:
    running = await start_server(test_env(private_postgres.dsn, HEALTH_CHECK_INTERVAL="500ms"))
    try:
        health = health_pb2_grpc.HealthStub(running.channel)
        assert await statuses(health) == {SERVING}
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING

        await _pg_ctl(private_postgres, "stop(force=True)")
        await until(health, NOT_SERVING)
        assert (await watch.read()).status == NOT_SERVING  # watchers are told too

        await _pg_ctl(private_postgres, "start()")
        await until(health, SERVING)
        assert (await watch.read()).status == SERVING
        watch.cancel()
        # Without a restart, the instance serves again.
        async with asyncio.timeout(30):
            while True:
                try:
                    request = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=1, value="back")
                    await running.memory.Store(memory_pb2.StoreRequest(memory=request))
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                    await asyncio.sleep(0.1)
    finally:
        await stop_server(running)
