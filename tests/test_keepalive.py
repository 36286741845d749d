"""A Hold client that goes silent loses its lease within about one TTL plus the keepalive bound.

Before keepalive was configured, such a client kept its lease renewed indefinitely: the server saw an open
stream and kept renewing, while the client could neither hear nor stop.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from memory_service.client import open_channel
from memory_service.v1 import lease_pb2, lease_pb2_grpc
from tests.conftest import start_server, stop_server, test_env
from tests.tcp_proxy import SilenceableProxy
from tests.test_leases import acquire_request

pytestmark = pytest.mark.timeout(120)

TTL = 1.0
KEEPALIVE_TIME, KEEPALIVE_TIMEOUT = 1.0, 1.0
CLIENT_KEEPALIVE_TIME = 5.0
"""The shortest the server permits a client (it refuses pings more often than every 5 s)."""
SLACK = 10.0
"""Generous room for a loaded machine: the bound under test is TTL + keepalive time + timeout (3 s)."""


async def test_a_silent_hold_client_loses_its_lease_within_the_bound(database_url: str) -> None:
    running = await start_server(
        test_env(
            database_url,
            LEASE_MIN_TTL="100ms",
            GRPC_KEEPALIVE_TIME=f"{KEEPALIVE_TIME}s",
            GRPC_KEEPALIVE_TIMEOUT=f"{KEEPALIVE_TIMEOUT}s",
        )
    )
    proxy = SilenceableProxy("127.0.0.1", running.server.port)
    await proxy.start()
    # The client's own keepalive (memory_service.client) tells it too, within its keepalive time + timeout.
    silent_channel = open_channel(
        proxy.address, attempts=1, keepalive_time=CLIENT_KEEPALIVE_TIME, keepalive_timeout=1.0
    )
    try:
        hold = lease_pb2_grpc.LeaseServiceStub(silent_channel).Hold()
        await hold.write(lease_pb2.HoldRequest(acquire=acquire_request("silent", ttl=TTL, holder="silent")))
        granted = await hold.read()
        assert granted.kind == lease_pb2.HoldEvent.KIND_GRANTED
        # It renews while the connection carries bytes.
        assert (await hold.read()).kind == lease_pb2.HoldEvent.KIND_RENEWED

        await proxy.silence()
        contender = await running.leases.Acquire(
            acquire_request("silent", ttl=5, wait=TTL + KEEPALIVE_TIME + KEEPALIVE_TIMEOUT + SLACK, holder="next"),
            timeout=60,
        )
        assert contender.acquired, contender.current_holder
        assert contender.lease.fencing_token > granted.lease.fencing_token

        with pytest.raises(grpc.RpcError) as caught:
            async with asyncio.timeout(CLIENT_KEEPALIVE_TIME + 1.0 + SLACK):
                while True:
                    await hold.read()  # events renewed before the silence may still be buffered
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        await silent_channel.close(grace=0)
        await proxy.close()
        await stop_server(running)
