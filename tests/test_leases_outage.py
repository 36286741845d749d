"""Leases while PostgreSQL is down: UNAVAILABLE meanwhile, never a grant, and tokens keep rising afterwards.

This stops and starts a private embedded PostgreSQL of its own, never the shared session database.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
import pytest

from memory_service.storage.embedded import EmbeddedPostgres
from memory_service.v1 import lease_pb2
from tests.conftest import code_of, start_server, stop_server, test_env
from tests.test_leases import NS, acquire_request

pytestmark = pytest.mark.timeout(180)


async def _pg_ctl(postgres: EmbeddedPostgres, call: str) -> None:
    """``postgres.<call>`` in a child Python that never loaded gRPC.

    Run as root, pgserver starts pg_ctl with ``user=``, which makes subprocess fork instead of vfork; in a process
    that uses gRPC, gRPC's fork handlers then crash that child before it can exec.
    """
    script = (
        "from pathlib import Path\n"
        "from memory_service.storage.embedded import EmbeddedPostgres\n"
        f"EmbeddedPostgres(Path({str(postgres.data_dir)!r})).{call}\n"
    )
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
    assert await process.wait() == 0, call


@pytest.fixture
async def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedPostgres]:
    postgres = EmbeddedPostgres(tmp_path_factory.mktemp("outage"))
    await _pg_ctl(postgres, "start()")
    yield postgres
    await _pg_ctl(postgres, "stop(force=True)")


async def test_database_outage_answers_unavailable_then_recovers(private_postgres: EmbeddedPostgres) -> None:
    running = await start_server(test_env(private_postgres.dsn, LEASE_MIN_TTL="100ms"))
    try:
        stub = running.leases
        survivor = (await stub.Acquire(acquire_request("survivor", ttl=300))).lease
        hold = stub.Hold()
        await hold.write(lease_pb2.HoldRequest(acquire=acquire_request("held", ttl=1.0)))
        granted = await hold.read()
        assert granted.kind == lease_pb2.HoldEvent.KIND_GRANTED

        await _pg_ctl(private_postgres, "stop(force=True)")
        calls = [
            stub.Acquire(acquire_request("during-outage")),
            stub.Acquire(acquire_request("during-outage-waiting", wait=0.5)),
            stub.Renew(lease_pb2.RenewRequest(lease_id=survivor.lease_id)),
            stub.Release(lease_pb2.ReleaseRequest(lease_id=survivor.lease_id)),
            stub.Get(lease_pb2.GetLeaseRequest(namespace=NS, name="survivor")),
            stub.List(lease_pb2.ListLeasesRequest()),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                await call
            assert code_of(caught.value) == grpc.StatusCode.UNAVAILABLE, caught.value.details()

        # The Hold stream cannot renew and says so before its TTL has run out.
        async with asyncio.timeout(30):
            while (event := await hold.read()).kind != lease_pb2.HoldEvent.KIND_LOST:
                assert event.kind == lease_pb2.HoldEvent.KIND_RENEWED
        hold.cancel()

        await _pg_ctl(private_postgres, "start()")
        async with asyncio.timeout(60):
            while True:
                try:
                    after = await stub.Acquire(acquire_request("after-outage"))
                    break
                except grpc.RpcError as exc:
                    assert code_of(exc) == grpc.StatusCode.UNAVAILABLE
                    await asyncio.sleep(0.1)
        assert after.acquired and after.lease.fencing_token > granted.lease.fencing_token > survivor.fencing_token
        # Nothing was granted while the database was away: the names asked for then are free.
        assert (await stub.Acquire(acquire_request("during-outage"))).acquired

        # The outage was shorter than the survivor's TTL: it is still held and renews.
        renewed = (await stub.Renew(lease_pb2.RenewRequest(lease_id=survivor.lease_id))).lease
        assert renewed.fencing_token == survivor.fencing_token
        # The held lease's TTL has passed: its name is free again, under a higher token.
        retaken = await stub.Acquire(acquire_request("held", wait=5))
        assert retaken.acquired and retaken.lease.fencing_token > after.lease.fencing_token
    finally:
        await stop_server(running)
