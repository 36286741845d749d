"""The Python client through a real server: paging, delete, embed and the lease calls."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from memory_service.client import MemoryClient, scope_filter
from tests.conftest import RunningServer, code_of


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[MemoryClient]:
    async with MemoryClient(server.address, timeout=10) as opened:
        yield opened


async def test_list_pages_through_every_memory_and_delete(client: MemoryClient) -> None:
    ids = [(await client.store(f"memory number {i}", scope="agent", scope_id=5, key=f"k{i}")).id for i in range(7)]
    await client.store("elsewhere", scope="agent", scope_id=6)
    pages = [page async for page in client.list_pages(scope_filter("agent", 5), page_size=3)]
    assert [len(page.memories) for page in pages] == [3, 3, 1]
    listed = [memory.id async for memory in client.list_memories(scope_filter("agent", 5), page_size=3)]
    assert listed == sorted(ids)
    assert await client.delete(ids[0]) == 1
    assert await client.delete(ids[0]) == 0  # a retried delete is safe
    assert await client.delete_matching(scope_filter("agent", 5)) == 6
    assert [m.value async for m in client.list_memories()] == ["elsewhere"]


async def test_embed(client: MemoryClient) -> None:
    response = await client.embed(["green tea", "black coffee"])
    assert response.dimension == 384 and [len(e.values) for e in response.embeddings] == [384, 384]


async def test_lease_calls(client: MemoryClient) -> None:
    granted = await client.acquire("nightly", ttl=5, holder="me")
    assert granted.acquired
    lease = granted.lease
    contender = await client.acquire("nightly", ttl=5)
    assert not contender.acquired and contender.current_holder.holder == "me"
    assert (await client.get_lease("nightly")).fencing_token == lease.fencing_token
    assert [listed.name async for listed in client.list_leases(namespace="default")] == ["nightly"]
    renewed = await client.renew(lease.lease_id, ttl=10)
    assert renewed.fencing_token == lease.fencing_token
    assert await client.release(lease.lease_id)
    assert not await client.release(lease.lease_id)  # idempotent
    with pytest.raises(grpc.RpcError) as caught:
        await client.renew(lease.lease_id)
    assert code_of(caught.value) is grpc.StatusCode.ABORTED
    regranted = await client.acquire("nightly", ttl=5)
    assert regranted.acquired and regranted.lease.fencing_token > lease.fencing_token
