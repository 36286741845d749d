"""The search SQL: vector candidates, text candidates, or both in one round trip.

Vector candidates come either from the ivfflat index (``ORDER BY embedding <=> q LIMIT n`` directly on the table)
or from an exact scan: ``OFFSET 0`` fences the subquery so PostgreSQL cannot use the index order and must compute
every distance among the filtered rows.
"""

from __future__ import annotations

import asyncpg

from memory_service.models import Candidate, Memory, MemoryFilter, Vector
from memory_service.storage.filters import Params, where_clause
from memory_service.storage.memories_sql import COLUMNS, COLUMNS_WITH_EMBEDDING, memory_from_row

TEXT_CONFIG = "english"


def _vector_cte(where: str, query: str, limit: str, *, exact: bool) -> str:
    if exact:
        return (
            f"SELECT id, distance FROM (SELECT m.id, m.embedding <=> {query} AS distance FROM memory.memories m "
            f"WHERE {where} AND m.embedding IS NOT NULL OFFSET 0) s ORDER BY distance, id LIMIT {limit}"
        )
    return (
        f"SELECT m.id, m.embedding <=> {query} AS distance FROM memory.memories m "
        f"WHERE {where} AND m.embedding IS NOT NULL ORDER BY m.embedding <=> {query} LIMIT {limit}"
    )


def _text_cte(where: str, query: str, limit: str) -> str:
    return (
        f"SELECT m.id, ts_rank_cd(m.search_tsv, q) AS text_score "
        f"FROM memory.memories m, websearch_to_tsquery('{TEXT_CONFIG}', {query}) q "
        f"WHERE m.search_tsv @@ q AND {where} ORDER BY text_score DESC, m.id LIMIT {limit}"
    )


async def candidates(
    conn: asyncpg.Connection,
    memory_filter: MemoryFilter,
    *,
    vector: Vector | None,
    text: str | None,
    limit: int,
    exact: bool,
    full_rows: bool,
    with_embedding: bool = False,
) -> list[Candidate]:
    """Up to ``limit`` nearest by vector and up to ``limit`` best by text (whichever are asked for), merged by id.

    With ``full_rows`` each candidate carries its whole memory; without, only what ranking needs, so a hybrid
    search that keeps 10 of 80 candidates decodes 10 memories (``memories_by_id``), not 80.
    """
    params = Params()
    where = where_clause(memory_filter, params)
    limit_param = params.add(limit)
    ctes: list[str] = []
    sources: list[str] = []
    joins: list[str] = []
    distance, text_score = "NULL::float8", "NULL::float4"
    if vector is not None:
        ctes.append(f"v AS ({_vector_cte(where, params.add(vector), limit_param, exact=exact)})")
        sources.append("SELECT id FROM v")
        joins.append("LEFT JOIN v ON v.id = m.id")
        distance = "v.distance"
    if text is not None:
        ctes.append(f"t AS ({_text_cte(where, params.add(text), limit_param)})")
        sources.append("SELECT id FROM t")
        joins.append("LEFT JOIN t ON t.id = m.id")
        text_score = "t.text_score"
    if full_rows:
        columns = COLUMNS_WITH_EMBEDDING if with_embedding else COLUMNS
    else:
        columns = "m.id, m.importance, m.updated_at"
    sql = (
        f"WITH {', '.join(ctes)} "
        f"SELECT {columns}, {distance} AS distance, {text_score} AS text_score "
        f"FROM ({' UNION '.join(sources)}) ids JOIN memory.memories m ON m.id = ids.id {' '.join(joins)}"
    )
    rows = await conn.fetch(sql, *params.values)
    return [
        Candidate(
            id=row["id"],
            distance=row["distance"],
            text_score=row["text_score"],
            importance=row["importance"],
            updated_at=row["updated_at"],
            memory=memory_from_row(row) if full_rows else None,
        )
        for row in rows
    ]


async def memories_by_id(conn: asyncpg.Connection, ids: list[int], *, with_embedding: bool) -> dict[int, Memory]:
    columns = COLUMNS_WITH_EMBEDDING if with_embedding else COLUMNS
    rows = await conn.fetch(f"SELECT {columns} FROM memory.memories m WHERE m.id = ANY($1::bigint[])", ids)
    return {row["id"]: memory_from_row(row) for row in rows}


async def count_matching(conn: asyncpg.Connection, memory_filter: MemoryFilter, *, cap: int) -> int:
    """How many live memories match, counting no further than ``cap`` (cheap for narrow filters)."""
    params = Params()
    where = where_clause(memory_filter, params)
    value: int = await conn.fetchval(
        f"SELECT count(*) FROM (SELECT 1 FROM memory.memories m WHERE {where} "
        f"AND m.embedding IS NOT NULL LIMIT {params.add(cap)}) s",
        *params.values,
    )
    return value
