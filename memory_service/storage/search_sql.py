"""The search SQL: vector candidates, text candidates, or both in one round trip.

Vector candidates come either from the ivfflat index (``ORDER BY embedding <=> q LIMIT n`` directly on the table)
or from an exact scan: ``OFFSET 0`` fences the subquery so PostgreSQL cannot use the index order and must compute
every distance among the filtered rows. A partial HNSW index (``WHERE graph_seq <= W``, ``storage.index_sql``) serves
the rows up to its watermark, named in the statement as the same literal so the planner can prove the index
covers them; the rows above it, the tail, are scanned exactly, and the two lists merge by distance.

Text candidates are ranked by Okapi BM25, computed here from the stored ``search_tsv``:

* the query's lexemes are ``to_tsvector`` of its text (the text configuration's stopwords and stemming), and a
  memory matches when it holds any of them;
* idf comes from ``memory.text_terms`` (document frequencies of the live memories, refreshed in the background by
  ``search/text_stats.py``), ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``;
* a term's frequency is the number of positions the tsvector keeps for it, and a memory's length is its number
  of distinct lexemes, ``length(search_tsv)``, normalised by the corpus average.

Broad queries stay bounded: terms are taken rarest first until their documents would exceed ``max_scored``, and
no more than ``max_scored`` memories are scored. The more common terms still score every candidate; they only stop
bringing in candidates of their own. In hybrid searches every candidate gets both its exact cosine and its exact
BM25 score, so fusion compares like with like.
"""

from __future__ import annotations

import functools
from typing import Any

import asyncpg
import numpy as np

from memory_service.models import NO_FILTER, Candidate, Memory, MemoryFilter, Vector, assemble
from memory_service.storage.filters import Params, where_clause
from memory_service.storage.index_sql import vector_column
from memory_service.storage.memories_sql import COLUMNS, COLUMNS_WITH_EMBEDDING, memory_from_row

TEXT_CONFIG = "english"
# A query of hundreds of words is still valid; its rarest terms carry its meaning, so only these many are ranked.
MAX_QUERY_TERMS = 64


def _vector_cte(
    where: str, query: str, limit: str, *, exact: bool, column: str = "embedding", watermark: int | None = None
) -> str:
    c = vector_column(column)
    if exact:
        return (
            f"SELECT id, distance FROM (SELECT m.id, m.{c} <=> {query} AS distance FROM memory.memories m "
            f"WHERE {where} AND m.{c} IS NOT NULL OFFSET 0) s ORDER BY distance, id LIMIT {limit}"
        )
    if watermark is not None:
        w = _bound(watermark)
        graph = _vector_cte(f"{where} AND m.graph_seq <= {w}", query, limit, exact=False, column=c)
        tail = _vector_cte(f"{where} AND m.graph_seq > {w}", query, limit, exact=True, column=c)
        return f"SELECT id, distance FROM (({graph}) UNION ALL ({tail})) g ORDER BY distance, id LIMIT {limit}"
    return (
        f"SELECT m.id, m.{c} <=> {query} AS distance FROM memory.memories m "
        f"WHERE {where} AND m.{c} IS NOT NULL ORDER BY m.{c} <=> {query} LIMIT {limit}"
    )


def generation_guard(params: Params, generation: int | None) -> str:
    """A condition that fails the statement (GenerationChanged) unless ``generation`` is still the database's
    embedding epoch; empty when the caller names none (maintenance on its own locked connection)."""
    if generation is None:
        return ""
    return f"memory.embedding_generation_is({params.add(generation)})"


def _term_ctes(text: str, budget: str) -> str:
    """``qt`` (query lexemes with df), ``tc`` (corpus size, average length), ``w`` (idf per lexeme) and ``wa``
    (every lexeme; ``core``, the any-word tsquery of the rarest lexemes whose documents fit in ``budget``, at least
    one; ``broad``, the tsquery of them all)."""
    return (
        f"qt AS (SELECT u.lexeme, coalesce(s.df, 0)::float8 AS df "
        f"FROM unnest(to_tsvector('{TEXT_CONFIG}', {text})) u LEFT JOIN memory.text_terms s ON s.lexeme = u.lexeme "
        f"ORDER BY 2, 1 LIMIT {MAX_QUERY_TERMS}), "
        "tc AS (SELECT coalesce(max(docs), 0)::float8 AS docs, "
        "max(total_length)::float8 / nullif(max(docs), 0) AS avgdl FROM memory.text_corpus), "
        "w AS (SELECT qt.lexeme, qt.df, ln(1 + (greatest(tc.docs, qt.df) - qt.df + 0.5) / (qt.df + 0.5)) AS idf, "
        "sum(qt.df) OVER (ORDER BY qt.df, qt.lexeme) AS reach, "
        "row_number() OVER (ORDER BY qt.df, qt.lexeme) AS n FROM qt, tc), "
        "wa AS (SELECT array_agg(lexeme) AS lexemes, memory.any_lexeme_query(array_agg(lexeme)) AS broad, "
        f"memory.any_lexeme_query(array_agg(lexeme) FILTER (WHERE n = 1 OR reach <= {budget}::bigint)) AS core, "
        f"coalesce(bool_and(n = 1 OR reach <= {budget}::bigint), true) AS every_term "
        "FROM w)"
    )


def _bm25(k1_param: str, b_param: str) -> str:
    """BM25 of memory ``m`` for the query in ``w``: 0 when it holds none of the query's lexemes.

    The query's lexemes are marked with weight A on a copy of the tsvector and filtered out, which leaves their
    positions (the term frequencies) without unnesting the whole document."""
    k1, b = f"{k1_param}::float8", f"{b_param}::float8"
    return (
        f"(SELECT coalesce(sum(w.idf * u.tf * ({k1} + 1) / (u.tf + {k1} * (1 - {b} + {b} * "
        "coalesce(length(m.search_tsv) / (SELECT avgdl FROM tc), 1)))), 0) "
        "FROM (SELECT lexeme, array_length(positions, 1)::float8 AS tf FROM unnest(ts_filter(setweight(setweight("
        "m.search_tsv, 'D'), 'A', (SELECT lexemes FROM wa)), '{a}'))) u JOIN w ON w.lexeme = u.lexeme)"
    )


def _matches(terms: str, *, rls: bool) -> str:
    """Memory ``m`` holds one of ``terms`` (``core`` or ``broad``). Under row-level security ``@@`` (not leakproof)
    could not use the GIN index, so the match runs in ``memory.text_matches`` (migration 0011), which returns the
    matching ids within the call's grants, and the rows are read by id under the policies."""
    if rls:
        return f"m.id = ANY (ARRAY(SELECT memory.text_matches((SELECT {terms} FROM wa))))"
    return f"m.search_tsv @@ (SELECT {terms} FROM wa)"


def _text_cte(where: str, limit: str, budget: str, bm25: str, *, pruned: bool, rls: bool = False) -> str:
    """The best ``limit`` by BM25 among at most ``budget`` memories holding the core terms (plus, unpruned, at
    most ``budget`` more holding any term)."""
    core = f"{_matches('core', rls=rls)} AND {where}"
    if pruned:
        # Scored as the index finds them: one visit to each memory.
        scored = f"SELECT m.id, {bm25} AS text_score FROM memory.memories m WHERE {core} LIMIT {budget}"
    else:
        broad = f"{_matches('broad', rls=rls)} AND {where}"
        ids = (
            f"(SELECT m.id FROM memory.memories m WHERE {core} LIMIT {budget}) UNION "
            f"(SELECT m.id FROM memory.memories m WHERE {broad} LIMIT {budget})"
        )
        scored = f"SELECT m.id, {bm25} AS text_score FROM memory.memories m WHERE m.id IN ({ids})"
    return f"SELECT id, text_score FROM ({scored}) s ORDER BY text_score DESC, id LIMIT {limit}"


def _bound(value: int) -> str:
    """A planner-relevant bound as a literal: ``int()`` lets nothing but digits into the SQL text.

    PostgreSQL's generic plan assumes a ``LIMIT $n`` keeps 10% of the rows, plans a sequential scan and a sort for
    it, and so never adopts the generic plan; written as a literal, the statement is planned once per connection."""
    return str(int(value))


def candidates_statement(
    memory_filter: MemoryFilter,
    *,
    vector: Vector | None,
    text: str | None,
    limit: int,
    exact: bool,
    full_rows: bool,
    text_ranking: tuple[float, float, int] | None = None,
    pruned: bool = True,
    with_embedding: bool = False,
    column: str = "embedding",
    generation: int | None = None,
    rls: bool = False,
    watermark: int | None = None,
) -> tuple[str, list[Any]]:
    """The SQL and parameters of ``candidates``: every user value a ``$n`` parameter, the bounds literals.

    ``column`` is the vector column searched (a move's other generation is ``embedding_alt``); ``generation`` the
    embedding epoch the query vector was made for (``generation_guard``); ``watermark`` that of a partial HNSW
    index on ``column`` (an index search then scans the rows above it exactly)."""
    params = Params()
    where = where_clause(memory_filter, params)
    limit_sql = _bound(limit)
    ctes: list[str] = []
    sources: list[str] = []
    joins: list[str] = []
    distance, text_score = "NULL::float8", "NULL::float8"
    from_vector, from_text, every_term = "false", "false", "false"
    if vector is not None:
        vector_param = params.add(vector)
        ctes.append(
            f"v AS ({_vector_cte(where, vector_param, limit_sql, exact=exact, column=column, watermark=watermark)})"
        )
        sources.append("SELECT id FROM v")
        joins.append("LEFT JOIN v ON v.id = m.id")
        distance = f"m.{vector_column(column)} <=> {vector_param}"
        from_vector = "v.id IS NOT NULL"
    if text is not None:
        if text_ranking is None:
            raise TypeError("a text search needs its text_ranking: BM25's k1 and b, and the most memories scored")
        k1, b, max_scored = text_ranking
        budget = _bound(max_scored)
        bm25 = _bm25(params.add(k1), params.add(b))
        ctes.append(_term_ctes(params.add(text), budget))
        ctes.append(f"t AS ({_text_cte(where, limit_sql, budget, bm25, pruned=pruned, rls=rls)})")
        sources.append("SELECT id FROM t")
        joins.append("LEFT JOIN t ON t.id = m.id")
        text_score = f"coalesce(t.text_score, {bm25})" if vector is not None else "t.text_score"
        from_text = "t.id IS NOT NULL"
        every_term = "true" if not pruned else "(SELECT every_term FROM wa)"
    if full_rows:
        columns = COLUMNS_WITH_EMBEDDING if with_embedding else COLUMNS
    else:
        columns = "m.id, m.importance, m.updated_at"
    guard = generation_guard(params, generation if vector is not None or with_embedding else None)
    sql = (
        f"WITH {', '.join(ctes)} "
        f"SELECT {columns}, {distance} AS distance, {text_score} AS text_score, "
        f"{from_vector} AS from_vector, {from_text} AS from_text, {every_term} AS text_every_term "
        f"FROM ({' UNION '.join(sources)}) ids JOIN memory.memories m ON m.id = ids.id {' '.join(joins)}"
        + (f" WHERE {guard}" if guard else "")
    )
    return sql, params.values


async def candidates(
    conn: asyncpg.Connection,
    memory_filter: MemoryFilter,
    *,
    vector: Vector | None,
    text: str | None,
    limit: int,
    exact: bool,
    full_rows: bool,
    text_ranking: tuple[float, float, int] | None = None,
    pruned: bool = True,
    with_embedding: bool = False,
    column: str = "embedding",
    generation: int | None = None,
    rls: bool = False,
    watermark: int | None = None,
) -> list[Candidate]:
    """Up to ``limit`` nearest by vector and up to ``limit`` best by text (whichever are asked for), merged by id.

    With both, each candidate carries its exact distance and BM25 score whichever list found it. With
    ``full_rows`` each candidate carries its whole memory; without, only what ranking needs, so a hybrid search
    that keeps 10 of 80 candidates decodes 10 memories (``memories_by_id``), not 80. Without ``pruned`` every
    query term brings in candidates too (at most ``max_scored`` more). ``text_ranking`` is (k1, b, max_scored),
    needed with ``text``. ``rls``: the connection runs under row-level security (a scoped call), which changes how
    text matches are found, not which.
    """
    if vector is not None and text is None and memory_filter.is_empty:
        # The commonest search, whose text depends on its bounds and flags only: built once, not on every call.
        sql = _unfiltered_vector_sql(
            limit,
            exact=exact,
            full_rows=full_rows,
            with_embedding=with_embedding,
            column=column,
            guarded=generation is not None,
            watermark=watermark,
        )
        values: list[Any] = [vector] if generation is None else [vector, generation]
    else:
        sql, values = candidates_statement(
            memory_filter,
            vector=vector,
            text=text,
            limit=limit,
            exact=exact,
            full_rows=full_rows,
            text_ranking=text_ranking,
            pruned=pruned,
            with_embedding=with_embedding,
            column=column,
            generation=generation,
            rls=rls,
            watermark=watermark,
        )
    rows = await conn.fetch(sql, *values)
    return [
        assemble(
            Candidate,
            {
                "id": row["id"],
                "distance": row["distance"],
                "text_score": row["text_score"],
                "importance": row["importance"],
                "updated_at": row["updated_at"],
                "memory": memory_from_row(row) if full_rows else None,
                "from_vector": row["from_vector"],
                "from_text": row["from_text"],
                "text_every_term": row["text_every_term"],
            },
        )
        for row in rows
    ]


@functools.lru_cache(maxsize=256)
def _unfiltered_vector_sql(
    limit: int,
    *,
    exact: bool,
    full_rows: bool,
    with_embedding: bool,
    column: str,
    guarded: bool,
    watermark: int | None,
) -> str:
    """``candidates_statement`` of an unfiltered vector search, whose parameters are the vector and (``guarded``)
    the generation, in that order. The HNSW watermark is part of the key: it changes once a rebuild."""
    sql, _ = candidates_statement(
        NO_FILTER,
        vector=np.zeros(1, dtype=np.float32),
        text=None,
        limit=limit,
        exact=exact,
        full_rows=full_rows,
        with_embedding=with_embedding,
        column=column,
        generation=0 if guarded else None,
        watermark=watermark,
    )
    return sql


def memories_by_id_statement(*, with_embedding: bool) -> str:
    if with_embedding:
        # The vectors returned are those of the generation the search ran in.
        return (
            f"SELECT {COLUMNS_WITH_EMBEDDING} FROM memory.memories m WHERE m.id = ANY($1::bigint[]) "
            "AND memory.embedding_generation_is($2)"
        )
    return f"SELECT {COLUMNS} FROM memory.memories m WHERE m.id = ANY($1::bigint[])"


async def memories_by_id(
    conn: asyncpg.Connection, ids: list[int], *, with_embedding: bool, generation: int = 0
) -> dict[int, Memory]:
    statement = memories_by_id_statement(with_embedding=with_embedding)
    rows = await conn.fetch(statement, ids, generation) if with_embedding else await conn.fetch(statement, ids)
    return {row["id"]: memory_from_row(row) for row in rows}


def count_matching_statement(memory_filter: MemoryFilter, *, cap: int) -> tuple[str, list[Any]]:
    params = Params()
    # Only the filter's own conditions: a scope filter is then answered by an index-only scan of
    # memories_scope_list, without visiting the heap rows the exact scan reads next. Expired memories and those
    # without an embedding count too; a count too high only sends a search to the index, whose short answers
    # fall back to the exact scan, so it stays complete.
    where = where_clause(memory_filter, params, live_only=False)
    return f"SELECT count(*) FROM (SELECT 1 FROM memory.memories m WHERE {where} LIMIT {_bound(cap)}) s", params.values


def count_is_bounded(memory_filter: MemoryFilter) -> bool:
    """Whether an index narrows the count: a filter of importance or memory types alone has none, and counting
    its matches up to a cap reads the table until the cap, which on a large table costs more than the search."""
    f = memory_filter
    return bool(
        f.scopes or f.agent_id is not None or f.tags or f.metadata_contains or f.created_after or f.created_before
    )


async def count_matching(conn: asyncpg.Connection, memory_filter: MemoryFilter, *, cap: int) -> int:
    """How many memories match the filter (live or not), counting no further than ``cap`` (cheap when narrow)."""
    sql, values = count_matching_statement(memory_filter, cap=cap)
    value: int = await conn.fetchval(sql, *values)
    return value
