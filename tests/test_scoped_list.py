"""A page of one scope reads that scope's rows only, however large the table (keyset on (scope, scope_id, id))."""

from __future__ import annotations

import asyncpg

from bench.datasets import clustered, copy_into_memories, records
from memory_service.models import MemoryFilter, Scope, ScopeRef
from memory_service.storage.database import init_connection
from memory_service.storage.filters import Params, where_clause
from memory_service.v1 import memory_pb2
from tests.conftest import start_server, stop_server, test_env

ROWS = 20_000
SCOPES = 1000  # scope_id % 1000: each scope holds 20 rows


async def test_a_scope_page_is_an_index_range_not_a_walk_of_the_table(database_url: str) -> None:
    running = await start_server(test_env(database_url))
    try:
        await running.server.runtime.binding.bind_now()  # the rows below are copied in behind the service's back
        conn = await asyncpg.connect(database_url)
        try:
            await init_connection(conn)
            await copy_into_memories(
                conn, records(clustered(ROWS, topics=10, scopes=SCOPES), model="hash-ngram-v1", scope="agent")
            )
            await conn.execute("ANALYZE memory.memories")
            # The statement List runs (memories_sql.list_page), for one scope and a cursor inside it.
            params = Params()
            where = where_clause(MemoryFilter(scopes=(ScopeRef(scope=Scope.AGENT, scope_id=7),)), params)
            sql = (
                f"SELECT m.id FROM memory.memories m WHERE {where} AND m.id > {params.add(0)} "
                f"ORDER BY m.id LIMIT {params.add(10)}"
            )
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *params.values))
        finally:
            await conn.close()
        assert "memories_scope_list" in plan, plan
        assert "Seq Scan" not in plan and "memories_pkey" not in plan, plan

        scope = memory_pb2.MemoryFilter(scopes=[memory_pb2.ScopeRef(scope=memory_pb2.SCOPE_AGENT, scope_id=7)])
        first = await running.memory.List(memory_pb2.ListRequest(filter=scope, page_size=15))
        second = await running.memory.List(
            memory_pb2.ListRequest(filter=scope, page_size=15, page_token=first.next_page_token)
        )
        ids = [m.id for m in first.memories] + [m.id for m in second.memories]
        assert len(ids) == ROWS // SCOPES and ids == sorted(ids)
        assert all(m.scope_id == 7 for m in [*first.memories, *second.memories])
        assert second.next_page_token == ""
    finally:
        await stop_server(running)
