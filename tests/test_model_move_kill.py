"""kill -9 of the instance holding the re-embedding backfill, with writers, deleters and erasers running.

Two real server processes are configured with the next model (the hash embedder at 256 dimensions); the one that
took the backfill's lease is killed mid-way. The survivor takes the lease over once it expires and goes on from
the last committed checkpoint. Afterwards every memory has a vector of the next generation, and it is the vector of
the memory's content as it is now: nothing lost, duplicated, stale or left empty.
"""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import numpy as np
from grpc import aio

from memory_service.embeddings.hashing import HashEmbedder
from memory_service.v1 import memory_pb2, memory_pb2_grpc
from tests.conftest import start_server, stop_server, test_env
from tests.processes import ServerProcess

ROWS = 3000
NEXT = {"EMBEDDING_NEXT_PROVIDER": "hash", "EMBEDDING_NEXT_MODEL": "hash-ngram-v1-256", "EMBEDDING_NEXT_DIM": "256"}
SLOW = {"MODEL_BACKFILL_RATE": "250", "MODEL_BACKFILL_BATCH": "50", "LOG_LEVEL": "INFO"}


def memory(value: str, key: str) -> memory_pb2.MemoryInput:
    return memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_PROJECT, scope_id=1, key=key, value=value)


async def load(address: str) -> None:
    async with aio.insecure_channel(address) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)

        async def requests():  # type: ignore[no-untyped-def]
            for start in range(0, ROWS, 500):
                yield memory_pb2.BulkStoreRequest(
                    items=[
                        memory_pb2.BulkItem(sequence=i, memory=memory(f"fact {i} on subject {i % 13}", f"k{i}"))
                        for i in range(start, start + 500)
                    ]
                )

        async for _ in stub.BulkStore(requests()):
            pass


async def backfill_state(conn: asyncpg.Connection) -> dict[str, object]:
    raw = await conn.fetchval("SELECT value FROM memory.settings WHERE key = 'embedding_backfill'")
    return {} if raw is None else dict(json.loads(raw))


async def churn(address: str, stop: asyncio.Event) -> tuple[int, int, int]:
    """Until ``stop``: store new memories, rewrite stored ones (the second half of the ids), delete and erase
    others (the first half). Returns how many were created, rewritten and removed."""
    stored = changed = removed = 0
    half = ROWS // 2
    async with aio.insecure_channel(address) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        i = 0
        while not stop.is_set():
            await stub.Store(memory_pb2.StoreRequest(memory=memory(f"new fact {i}", f"new{i}")))
            stored += 1
            rewrite = memory(f"rewritten fact {i}", f"k{half + (i * 7) % half}")
            await stub.Store(memory_pb2.StoreRequest(memory=rewrite))
            changed += 1
            target = (i * 11) % half + 1
            if i % 2:
                removed += (await stub.Delete(memory_pb2.DeleteRequest(id=target))).deleted
            else:
                scope = memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_PROJECT, scope_id=1)
                erased = await stub.Erase(memory_pb2.EraseRequest(scope=scope, id=target))
                removed += len(erased.memory_ids)
            i += 1
            await asyncio.sleep(0.005)
    return stored, changed, removed


async def test_the_backfill_survives_kill_9_of_its_holder(database_url: str) -> None:
    env = test_env(database_url)
    loader = await start_server(env)
    try:
        await load(loader.address)
    finally:
        await stop_server(loader)

    conn = await asyncpg.connect(database_url)
    first = ServerProcess({**env, **NEXT, **SLOW})
    second: ServerProcess | None = None
    stop = asyncio.Event()
    try:
        first.wait_serving()
        deadline = time.monotonic() + 60
        while not (state := await backfill_state(conn)).get("after_id"):
            assert time.monotonic() < deadline, "\n".join(first.log[-20:])
            await asyncio.sleep(0.2)
        holder = state["holder"]
        second = ServerProcess({**env, **NEXT, **SLOW})
        second.wait_serving()
        writers = asyncio.create_task(churn(second.address, stop))
        await asyncio.sleep(0.3)
        checkpoint = (await backfill_state(conn))["after_id"]
        first.kill()  # SIGKILL: no release of the lease, a transaction may be cut off mid-batch
        assert not (await backfill_state(conn)).get("complete")

        deadline = time.monotonic() + 90
        while not (state := await backfill_state(conn)).get("complete"):
            assert time.monotonic() < deadline, "\n".join(second.log[-20:])
            await asyncio.sleep(0.5)
        stop.set()
        stored, changed, removed = await writers
        assert stored and changed and removed
        assert state["holder"] != holder
        assert int(str(state["passes"])) >= 1
        assert int(str(checkpoint)) > 0
        token = await conn.fetchval(
            "SELECT fencing_token FROM memory.leases WHERE namespace = 'memory-service' AND name = 'model-backfill'"
        )
        assert token >= 2  # the survivor holds a newer grant than the killed holder's

        # Writers ran until now: let the survivor's next round pick up what they left (it dual-writes anyway).
        deadline = time.monotonic() + 30
        while await conn.fetchval("SELECT count(*) FROM memory.memories WHERE embedding_alt IS NULL"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)
        rows = await conn.fetch("SELECT key, value, embedding_alt::text AS alt FROM memory.memories")
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)) == ROWS + stored - removed
        embedder = HashEmbedder(model="hash-ngram-v1-256", dimension=256)
        expected = embedder.embed_now([r["value"] for r in rows])
        for row, vector in zip(rows, expected, strict=True):
            stored_vector = np.array(json.loads(row["alt"]), dtype=np.float32)
            assert np.allclose(stored_vector, vector, atol=1e-6), row["key"]
    finally:
        stop.set()
        await conn.close()
        first.stop()
        if second is not None:
            second.stop()
