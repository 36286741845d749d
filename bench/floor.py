"""The bare floor: the least any gRPC service could do for a search, read, page or write, run as its own process.

    python -m bench.floor        # DATABASE_URL, VECTOR_INDEX, FLOOR_POOL from the environment

It speaks the service's own protocol (``memory_service.v1.MemoryService``, and ``LeaseService``'s Acquire and
Release from ``bench.lease_floor``), so one client stub calls both, and implements only Store, Get, List (one
scope, keyset on id) and Search with the least SQL that gives the same answer: VECTOR is one
``ORDER BY embedding <=> $1 LIMIT k`` with the full rows, unfiltered or within one scope; TEXT is the service's
BM25 statement (``memory_service.storage.search_sql``) with the full rows; HYBRID is the service's one-statement
vector and text candidates, fused here by the weighted sum, and the winners' rows. No validation, no metrics, no
interceptors, no history, no embedding, no planning: each call is its statements.

The caller says how to scan, in the request's own fields, so that the floor gives the answer the service gave:
``exact`` scans exactly, ``probes`` is ``ivfflat.probes`` or ``hnsw.ef_search`` (``bench.scale`` sends what the
service's response reported). Scan settings are startup settings of a pool per setting (with relaxed-order
iterative scans, so a filtered index scan still finds k rows): set once, never sent again, kept across asyncpg's
reset. Measured against it, the service's extra time is what it spends on being a service.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np
from grpc import aio
from pgvector.asyncpg import register_vector

from bench.lease_floor import BareLeases
from memory_service.models import MemoryFilter, Scope, ScopeRef
from memory_service.search.tuning import DEFAULT_TEXT_RANKING
from memory_service.storage import index_sql, search_sql
from memory_service.v1 import lease_pb2_grpc, memory_pb2, memory_pb2_grpc

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_COLUMNS = (
    "id, scope::text AS scope, scope_id, memory_type::text AS memory_type, key, value, importance, tags, "
    "metadata::text AS metadata, content_hash, embedding_model, created_at, updated_at, expires_at"
)
_SCOPE_TO_WIRE = {
    "global": memory_pb2.SCOPE_GLOBAL,
    "circle": memory_pb2.SCOPE_CIRCLE,
    "agent": memory_pb2.SCOPE_AGENT,
    "conversation": memory_pb2.SCOPE_CONVERSATION,
    "project": memory_pb2.SCOPE_PROJECT,
}
_SCOPE_FROM_WIRE = {v: k for k, v in _SCOPE_TO_WIRE.items()}
_TYPE_TO_WIRE = {name.removeprefix("MEMORY_TYPE_").lower(): v for name, v in memory_pb2.MemoryType.items() if v}
_UPSERT = """
INSERT INTO memory.memories AS m (scope, scope_id, key, value, embedding, importance, content_hash, embedding_model)
VALUES ($1::text::memory.scope, $2, $3, $4, $5, $6, sha256(convert_to($4, 'UTF8')), $7)
ON CONFLICT (scope, scope_id, key) DO UPDATE SET value = EXCLUDED.value, embedding = EXCLUDED.embedding,
    importance = EXCLUDED.importance, content_hash = EXCLUDED.content_hash, updated_at = clock_timestamp()
RETURNING id, (xmax = 0) AS created
"""
# The service's hybrid candidate depth and its default weight with the hash embedder (see search/engine.py).
_HYBRID_CANDIDATES = 40
_HYBRID_ALPHA = 0.2


def vector_statement(*, scoped: bool, top_k: int, exact: bool, watermark: int | None = None) -> str:
    """The floor's VECTOR search: $1 the query vector, then scope and scope_id when ``scoped``. An HNSW graph up to
    a watermark (``index_sql.IndexInfo.watermark``) is only usable by a statement carrying its predicate, and the
    rows past it are found by an exact scan of the tail: the least SQL that still finds every row."""
    where = "scope = $2::text::memory.scope AND scope_id = $3 AND " if scoped else ""
    if watermark is not None and not exact:
        k, w = int(top_k), int(watermark)
        nearest = f"SELECT {_COLUMNS}, embedding <=> $1 AS distance FROM memory.memories WHERE {where}"
        graph = f"{nearest}graph_seq <= {w} AND embedding IS NOT NULL ORDER BY embedding <=> $1 LIMIT {k}"
        tail = f"{nearest}graph_seq > {w} AND embedding IS NOT NULL ORDER BY distance LIMIT {k}"
        return f"SELECT * FROM (({graph}) UNION ALL ({tail})) g ORDER BY distance LIMIT {k}"
    if exact:
        # OFFSET 0 fences the subquery, so the planner cannot take the index's order; only the k nearest are then
        # read whole.
        return (
            "WITH nearest AS (SELECT id, distance FROM (SELECT id, embedding <=> $1 AS distance "
            f"FROM memory.memories WHERE {where}embedding IS NOT NULL OFFSET 0) s "
            f"ORDER BY distance LIMIT {int(top_k)}) "
            f"SELECT {_COLUMNS}, distance FROM memory.memories JOIN nearest USING (id) ORDER BY distance"
        )
    return (
        f"SELECT {_COLUMNS}, embedding <=> $1 AS distance FROM memory.memories "
        f"WHERE {where}embedding IS NOT NULL ORDER BY embedding <=> $1 LIMIT {int(top_k)}"
    )


def _timestamp(message: Any, value: datetime) -> None:
    delta = value - _EPOCH
    message.seconds = delta.days * 86400 + delta.seconds
    message.nanos = delta.microseconds * 1000


def memory_message(row: asyncpg.Record) -> memory_pb2.Memory:
    message = memory_pb2.Memory(
        id=row["id"],
        scope=_SCOPE_TO_WIRE[row["scope"]],
        scope_id=row["scope_id"],
        memory_type=_TYPE_TO_WIRE[row["memory_type"]],
        key=row["key"],
        value=row["value"],
        importance=row["importance"],
        tags=row["tags"],
        embedding_model=row["embedding_model"] or "",
        content_hash=row["content_hash"].hex(),
    )
    if row["metadata"] != "{}":
        message.metadata.update(json.loads(row["metadata"]))
    _timestamp(message.created_at, row["created_at"])
    _timestamp(message.updated_at, row["updated_at"])
    if row["expires_at"] is not None:
        _timestamp(message.expires_at, row["expires_at"])
    return message


def one_scope(request_filter: memory_pb2.MemoryFilter) -> tuple[str, int] | None:
    """The one (scope, scope_id) a floor request may filter on, or None for no filter."""
    if not request_filter.scopes:
        return None
    ref = request_filter.scopes[0]
    return _SCOPE_FROM_WIRE[ref.scope], ref.scope_id


class Pools:
    """One pool for scans that need no settings, and one per index scan setting, opened on first use."""

    def __init__(self, dsn: str, *, index: str, size: int) -> None:
        self.dsn = dsn
        self.index = index
        self.size = size
        self._pools: dict[int, asyncpg.Pool] = {}
        self._lock = asyncio.Lock()

    async def get(self, setting: int = 0) -> asyncpg.Pool:
        pool = self._pools.get(setting)
        if pool is None:
            async with self._lock:
                pool = self._pools.get(setting)
                if pool is None:
                    pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=self.size,
                        max_size=self.size,
                        init=register_vector,
                        server_settings=scan_settings(self.index, setting),
                    )
                    self._pools[setting] = pool
        return pool

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()


class Floor(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(self, pools: Pools, model: str, watermark: int | None = None) -> None:
        self._watermark = watermark
        self.pools = pools
        self.model = model

    async def _pool(self, request: memory_pb2.SearchRequest, limit: int) -> asyncpg.Pool:
        if request.exact or request.mode == memory_pb2.SEARCH_MODE_TEXT:
            return await self.pools.get()
        setting = request.probes or 1
        if self.pools.index == "hnsw":
            # As the service does: HNSW returns at most ef_search rows from a plain scan.
            setting = min(max(setting, limit), 1000)
        return await self.pools.get(setting)

    async def Store(self, request: memory_pb2.StoreRequest, context: aio.ServicerContext) -> memory_pb2.StoreResponse:
        m = request.memory
        importance = m.importance if m.HasField("importance") else 0.5
        embedding = np.asarray(m.embedding, dtype=np.float32)
        scope = _SCOPE_FROM_WIRE[m.scope]
        async with (await self.pools.get()).acquire() as conn:
            row = await conn.fetchrow(_UPSERT, scope, m.scope_id, m.key, m.value, embedding, importance, self.model)
        outcome = memory_pb2.WRITE_OUTCOME_CREATED if row["created"] else memory_pb2.WRITE_OUTCOME_UPDATED
        return memory_pb2.StoreResponse(id=row["id"], outcome=outcome, key=m.key)

    async def Get(self, request: memory_pb2.GetRequest, context: aio.ServicerContext) -> memory_pb2.GetResponse:
        async with (await self.pools.get()).acquire() as conn:
            row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM memory.memories WHERE id = $1", request.id)
        return memory_pb2.GetResponse(memory=memory_message(row))

    async def List(self, request: memory_pb2.ListRequest, context: aio.ServicerContext) -> memory_pb2.ListResponse:
        scope = one_scope(request.filter)
        assert scope is not None, "the floor lists one scope"
        after = int(request.page_token or 0)
        limit = request.page_size or 100
        async with (await self.pools.get()).acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM memory.memories WHERE scope = $1::text::memory.scope AND scope_id = $2 "
                f"AND id > $3 ORDER BY id LIMIT {int(limit) + 1}",
                *scope,
                after,
            )
        page = rows[:limit]
        token = str(page[-1]["id"]) if len(rows) > limit else ""
        return memory_pb2.ListResponse(memories=[memory_message(r) for r in page], next_page_token=token)

    async def Search(
        self, request: memory_pb2.SearchRequest, context: aio.ServicerContext
    ) -> memory_pb2.SearchResponse:
        top_k = request.top_k or 10
        scope = one_scope(request.filter)
        if request.mode == memory_pb2.SEARCH_MODE_VECTOR:
            pool = await self._pool(request, top_k)
            vector = np.asarray(request.query_embedding, dtype=np.float32)
            hits = await self._vector(pool, vector, scope, top_k, exact=request.exact)
        else:
            hits = await self._ranked(request, scope, top_k)
        return memory_pb2.SearchResponse(hits=hits, mode=request.mode)

    async def _vector(
        self, pool: asyncpg.Pool, vector: np.ndarray, scope: tuple[str, int] | None, top_k: int, *, exact: bool
    ) -> list[Any]:
        sql = vector_statement(scoped=scope is not None, top_k=top_k, exact=exact, watermark=self._watermark)
        async with pool.acquire() as conn:
            rows = await conn.fetch(sql, vector, *(scope or ()))
        return [
            memory_pb2.SearchHit(
                memory=memory_message(r), score=1 - r["distance"], cosine_similarity=1 - r["distance"], vector_rank=i
            )
            for i, r in enumerate(rows, 1)
        ]

    async def _ranked(self, request: memory_pb2.SearchRequest, scope: tuple[str, int] | None, top_k: int) -> list[Any]:
        memory_filter = (
            MemoryFilter(scopes=(ScopeRef(scope=Scope(scope[0]), scope_id=scope[1]),)) if scope else MemoryFilter()
        )
        hybrid = request.mode == memory_pb2.SEARCH_MODE_HYBRID
        sql, values = search_sql.candidates_statement(
            memory_filter,
            vector=np.asarray(request.query_embedding, dtype=np.float32) if hybrid else None,
            text=request.query,
            limit=_HYBRID_CANDIDATES if hybrid else top_k,
            exact=request.exact,
            full_rows=not hybrid,
            text_ranking=DEFAULT_TEXT_RANKING.values,
        )
        async with (await self._pool(request, _HYBRID_CANDIDATES)).acquire() as conn:
            rows = await conn.fetch(sql, *values)
            if not hybrid:
                rows = sorted(rows, key=lambda r: (-r["text_score"], r["id"]))
                return [
                    memory_pb2.SearchHit(
                        memory=memory_message(r), score=r["text_score"], text_score=r["text_score"], text_rank=i
                    )
                    for i, r in enumerate(rows, 1)
                ]
            best_cosine = max((1 - r["distance"] for r in rows), default=1.0) or 1.0
            best_text = max((r["text_score"] for r in rows), default=1.0) or 1.0

            def fused(r: asyncpg.Record) -> float:
                cosine = (1 - r["distance"]) / best_cosine
                return float(_HYBRID_ALPHA * cosine + (1 - _HYBRID_ALPHA) * r["text_score"] / best_text)

            winners = sorted(rows, key=lambda r: (-fused(r), r["id"]))[:top_k]
            found = await conn.fetch(
                f"SELECT {_COLUMNS} FROM memory.memories WHERE id = ANY($1::bigint[])", [r["id"] for r in winners]
            )
        by_id = {r["id"]: r for r in found}
        return [
            memory_pb2.SearchHit(
                memory=memory_message(by_id[w["id"]]),
                score=fused(w),
                cosine_similarity=1 - w["distance"],
                text_score=w["text_score"],
            )
            for w in winners
            if w["id"] in by_id
        ]


def scan_settings(index: str, probes: int) -> dict[str, str]:
    """Startup settings of every pooled connection: set once, and kept across asyncpg's RESET ALL (``probes`` 0:
    none, for scans that need none).

    Every execution is planned for its own values: one statement serves every scope, and a generic plan made for
    the typical scope (about 1% of the rows: the btree and a sort) read all 10,000 rows of the large scope."""
    custom = {"plan_cache_mode": "force_custom_plan"}
    if not probes:
        return custom
    if index == "hnsw":
        return {**custom, "hnsw.ef_search": str(probes), "hnsw.iterative_scan": "relaxed_order"}
    return {**custom, "ivfflat.probes": str(probes), "ivfflat.iterative_scan": "relaxed_order"}


async def serve() -> None:
    index = os.environ.get("VECTOR_INDEX", "ivfflat")
    pools = Pools(os.environ["DATABASE_URL"], index=index, size=int(os.environ.get("FLOOR_POOL", "4")))
    pool = await pools.get()
    model = await pool.fetchval("SELECT value FROM memory.settings WHERE key = 'embedding_model'") or "floor"
    async with pool.acquire() as conn:
        watermark = (await index_sql.index_info(conn, "hnsw" if index == "hnsw" else "ivfflat")).watermark
    # Leases on a plain pool of their own: their statements need neither the vector codecs nor the scan settings.
    lease_pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=pools.size, max_size=pools.size)
    server = aio.server()
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(Floor(pools, model, watermark), server)
    lease_pb2_grpc.add_LeaseServiceServicer_to_server(BareLeases(lease_pool), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # The line bench.harness.ServerProcess waits for.
    print(f"floor serving gRPC on 127.0.0.1:{port} ({index})", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    await pools.close()
    await lease_pool.close()


if __name__ == "__main__":
    asyncio.run(serve())
