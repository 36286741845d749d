"""The SQL behind the in-memory text index: its load from the stored tsvectors, the change log it follows, the query
terms with their statistics, and the rows its answers are checked against.

Postings leave PostgreSQL inverted (one row per lexeme) and as ``array_send`` bytes, which numpy reads without a
Python object per posting; a million memories hold some 60 million postings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from memory_service.models import Candidate, MemoryFilter, Vector
from memory_service.storage import search_sql
from memory_service.storage.filters import LIVE, Params, where_clause
from memory_service.storage.memories_sql import COLUMNS, COLUMNS_WITH_EMBEDDING, memory_from_row
from memory_service.storage.search_sql import MAX_QUERY_TERMS, TEXT_CONFIG

# Memories per statement of a load: the inversion (GROUP BY lexeme) stays within work_mem, and one answer (some
# 20 bytes per posting as it arrives) stays small.
LOAD_CHUNK = 25_000
# Change-log rows a search reads after the index's frontier; more are read in pages of this size.
PENDING_PAGE = 5000


@dataclasses.dataclass(frozen=True)
class QueryTerms:
    """A query's lexemes (rarest first, at most ``MAX_QUERY_TERMS``), their document frequencies and the corpus
    totals, all from the statistics snapshot; and the change-log rows after the caller's frontier."""

    lexemes: list[str]
    dfs: list[int]
    docs: int
    total_length: int
    pending: list[tuple[int, int]]
    """(seq, memory_id) of the changes after the frontier, in seq order."""
    filter_ids: npt.NDArray[np.int64] | None = None
    """Ids of the memories the search's filter holds for (up to the cap asked for), when one was given."""


@dataclasses.dataclass(frozen=True)
class DocText:
    """One memory as the index holds it: its distinct lexemes with their frequencies, when it expires, and its
    scope."""

    id: int
    lexemes: list[str]
    tfs: list[int]
    expires_at: float | None
    """Epoch seconds; None when it never expires."""
    scope: str
    scope_id: int


@dataclasses.dataclass(frozen=True)
class PostingsChunk:
    """The postings of the memories with ids in one range, inverted: ``ids[i]`` holds ``lexemes[term[i]]`` with
    frequency ``tfs[i]``."""

    lexemes: list[str]
    term: npt.NDArray[np.int32]
    ids: npt.NDArray[np.int64]
    tfs: npt.NDArray[np.uint16]


@dataclasses.dataclass(frozen=True)
class LoadedChunk:
    """The live memories with ids in one range, ascending: their expiry (inf: never), lengths and scopes, and their
    postings."""

    ids: npt.NDArray[np.int64]
    expiry: npt.NDArray[np.float64]
    lengths: npt.NDArray[np.int32]
    scopes: list[str]
    scope_ids: npt.NDArray[np.int64]
    postings: PostingsChunk


TERMS = f"""
WITH qt AS (
    SELECT u.lexeme, coalesce(s.df, 0) AS df
    FROM unnest(to_tsvector('{TEXT_CONFIG}', $1)) u LEFT JOIN memory.text_terms s ON s.lexeme = u.lexeme
    ORDER BY 2, 1 LIMIT {MAX_QUERY_TERMS}
)
SELECT (SELECT array_agg(lexeme ORDER BY df, lexeme) FROM qt) AS lexemes,
       (SELECT array_agg(df ORDER BY df, lexeme) FROM qt) AS dfs,
       (SELECT docs FROM memory.text_corpus) AS docs,
       (SELECT total_length FROM memory.text_corpus) AS total_length,
       ARRAY(SELECT ARRAY[c.seq, c.memory_id] FROM memory.changes c WHERE c.seq > $2 ORDER BY c.seq
             LIMIT {PENDING_PAGE}) AS pending
"""


def terms_statement(memory_filter: MemoryFilter | None, *, cap: int) -> tuple[str, list[Any]]:
    """``TERMS``, and with a filter also the ids of the memories its own conditions hold for (at most ``cap``, as
    ``array_send`` bytes): one round trip for a filtered search's terms, changes and candidates."""
    if memory_filter is None:
        return TERMS, [None, None]
    params = Params(None, None)
    # The filter's own conditions only (as the vector path's count): an index-only scan where the filter allows;
    # expiry is the index's to check.
    where = where_clause(memory_filter, params, live_only=False)
    ids = f"SELECT m.id FROM memory.memories m WHERE {where} LIMIT {int(cap)}"
    # ARRAY(subquery) rather than array_agg: 0.2-0.4 ms less for 10,000 ids.
    return f"{TERMS.rstrip()},\n       array_send(ARRAY({ids})) AS filter_ids\n", params.values


_DOCS = f"""
SELECT m.id, ARRAY(SELECT u.lexeme FROM unnest(m.search_tsv) u) AS lexemes,
       ARRAY(SELECT coalesce(array_length(u.positions, 1), 0) FROM unnest(m.search_tsv) u) AS tfs,
       extract(epoch FROM m.expires_at)::float8 AS expires_at, m.scope::text AS scope, m.scope_id
FROM memory.memories m WHERE m.id = ANY($1::bigint[]) AND {LIVE}
"""

_ID_RANGE = "SELECT min(id), max(id) FROM memory.memories"

_LOAD_DOCS = f"""
SELECT m.id, extract(epoch FROM m.expires_at)::float8 AS expires_at, length(m.search_tsv) AS length,
       m.scope::text AS scope, m.scope_id
FROM memory.memories m WHERE m.id >= $1 AND m.id < $2 AND {LIVE} ORDER BY m.id
"""

_LOAD_POSTINGS = f"""
SELECT u.lexeme, array_send(array_agg(m.id)) AS ids,
       array_send(array_agg(coalesce(array_length(u.positions, 1), 0)::int2)) AS tfs
FROM memory.memories m, unnest(m.search_tsv) u
WHERE m.id >= $1 AND m.id < $2 AND {LIVE}
GROUP BY u.lexeme
"""

_CHANGES = f"SELECT seq, memory_id FROM memory.changes WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT {PENDING_PAGE}"


def _array(buf: bytes, value: str, size: type[np.generic]) -> npt.NDArray[Any]:
    """The values of a one-dimensional ``array_send`` without NULLs: a 20-byte header, then per element its length
    (4 bytes) and its big-endian value."""
    if len(buf) <= 12:
        return np.empty(0, dtype=value)
    record = np.dtype([("length", ">i4"), ("value", value)])
    values: npt.NDArray[Any] = np.frombuffer(buf, dtype=record, offset=20)["value"].astype(size)
    return values


async def query_terms(
    conn: asyncpg.Connection, text: str, *, after: int, memory_filter: MemoryFilter | None = None, cap: int = 0
) -> QueryTerms:
    """The query's terms and the changes after ``after``; with ``memory_filter``, its matching ids too."""
    sql, values = terms_statement(memory_filter, cap=cap)
    values[0], values[1] = text, after
    row = await conn.fetchrow(sql, *values)
    assert row is not None
    filter_ids = None
    if memory_filter is not None:
        raw = row["filter_ids"]
        filter_ids = np.empty(0, np.int64) if raw is None else _array(raw, ">i8", np.int64)
    return QueryTerms(
        lexemes=list(row["lexemes"] or ()),
        dfs=list(row["dfs"] or ()),
        docs=row["docs"] or 0,
        total_length=row["total_length"] or 0,
        pending=[(int(p[0]), int(p[1])) for p in row["pending"]],
        filter_ids=filter_ids,
    )


async def changes_between(conn: asyncpg.Connection, after: int, upto: int) -> list[tuple[int, int]]:
    rows = await conn.fetch(_CHANGES, after, upto)
    return [(row["seq"], row["memory_id"]) for row in rows]


async def docs(conn: asyncpg.Connection, ids: list[int]) -> list[DocText]:
    """The live memories among ``ids`` as the index holds them; an id not returned is gone (or expired)."""
    rows = await conn.fetch(_DOCS, ids)
    return [
        DocText(row["id"], list(row["lexemes"]), list(row["tfs"]), row["expires_at"], row["scope"], row["scope_id"])
        for row in rows
    ]


async def load(conn: asyncpg.Connection) -> AsyncIterator[LoadedChunk]:
    """Every live memory, a range of ids at a time. Run it inside one repeatable-read transaction, so the chunks are
    one snapshot."""
    bounds = await conn.fetchrow(_ID_RANGE)
    if bounds is None or bounds[0] is None:
        return
    low, high = int(bounds[0]), int(bounds[1]) + 1
    for start in range(low, high, LOAD_CHUNK):
        end = min(start + LOAD_CHUNK, high)
        rows = await conn.fetch(_LOAD_DOCS, start, end)
        ids = np.fromiter((r["id"] for r in rows), dtype=np.int64, count=len(rows))
        expiry = np.fromiter(
            (np.inf if r["expires_at"] is None else r["expires_at"] for r in rows), dtype=np.float64, count=len(rows)
        )
        lengths = np.fromiter((r["length"] for r in rows), dtype=np.int32, count=len(rows))
        scope_ids = np.fromiter((r["scope_id"] for r in rows), dtype=np.int64, count=len(rows))
        postings = await conn.fetch(_LOAD_POSTINGS, start, end)
        lexemes = [r["lexeme"] for r in postings]
        id_parts = [_array(r["ids"], ">i8", np.int64) for r in postings]
        tf_parts = [_array(r["tfs"], ">i2", np.uint16) for r in postings]
        counts = np.fromiter((len(p) for p in id_parts), dtype=np.int64, count=len(id_parts))
        chunk = PostingsChunk(
            lexemes=lexemes,
            term=np.repeat(np.arange(len(lexemes), dtype=np.int32), counts),
            ids=np.concatenate(id_parts) if id_parts else np.empty(0, np.int64),
            tfs=np.concatenate(tf_parts) if tf_parts else np.empty(0, np.uint16),
        )
        yield LoadedChunk(ids, expiry, lengths, [r["scope"] for r in rows], scope_ids, chunk)


def rows_statement(memory_filter: MemoryFilter, *, with_embedding: bool) -> tuple[str, list[Any]]:
    params = Params()
    ids = params.add(None)
    where = where_clause(memory_filter, params)
    columns = COLUMNS_WITH_EMBEDDING if with_embedding else COLUMNS
    return f"SELECT {columns} FROM memory.memories m WHERE m.id = ANY({ids}::bigint[]) AND {where}", params.values


async def rows(
    conn: asyncpg.Connection, memory_filter: MemoryFilter, scored: dict[int, float], *, with_embedding: bool
) -> list[Candidate]:
    """The memories among ``scored`` that are live and pass the filter, as text candidates with those scores: what
    PostgreSQL, the source of truth, says of the index's answer."""
    sql, values = rows_statement(memory_filter, with_embedding=with_embedding)
    values[0] = list(scored)
    found = await conn.fetch(sql, *values)
    return [
        Candidate(
            id=row["id"],
            distance=None,
            text_score=scored[row["id"]],
            importance=row["importance"],
            updated_at=row["updated_at"],
            memory=memory_from_row(row),
            from_text=True,
            text_every_term=True,
        )
        for row in found
    ]


def passing_ids_statement(memory_filter: MemoryFilter) -> tuple[str, list[Any]]:
    params = Params()
    ids = params.add(None)
    where = where_clause(memory_filter, params)
    return f"SELECT array_agg(m.id) FROM memory.memories m WHERE m.id = ANY({ids}::bigint[]) AND {where}", (
        params.values
    )


async def passing_ids(conn: asyncpg.Connection, memory_filter: MemoryFilter, ids: list[int]) -> set[int]:
    """Which of ``ids`` are live memories that pass the filter."""
    sql, values = passing_ids_statement(memory_filter)
    values[0] = ids
    found = await conn.fetchval(sql, *values)
    return set(found or ())


async def corpus(conn: asyncpg.Connection) -> tuple[int, int]:
    """The statistics snapshot's corpus size and total length."""
    row = await conn.fetchrow("SELECT docs, total_length FROM memory.text_corpus")
    return (0, 0) if row is None else (row["docs"], row["total_length"])


async def estimated_rows(conn: asyncpg.Connection) -> int:
    """The planner's estimate of memory.memories' rows (-1 before the first ANALYZE counts as unknown, 0)."""
    value = await conn.fetchval("SELECT reltuples::bigint FROM pg_class WHERE oid = 'memory.memories'::regclass")
    return max(int(value or 0), 0)


def hybrid_statement(
    memory_filter: MemoryFilter,
    *,
    vector: Vector,
    limit: int,
    exact: bool,
    generation: int | None = None,
    watermark: int | None = None,
) -> tuple[str, list[Any], int]:
    """The vector candidates (``search_sql``'s own statement) and the distances of the given text candidates, in
    one statement; the index of the text ids' parameter in the values. ``generation``: the embedding epoch the
    query vector was made for (``search_sql.generation_guard``: the vector candidates come first and fail the
    statement when a cut-over replaced it)."""
    vector_sql, values = search_sql.candidates_statement(
        memory_filter,
        vector=vector,
        text=None,
        limit=limit,
        exact=exact,
        full_rows=False,
        generation=generation,
        watermark=watermark,
    )
    vector_param = next(i for i, v in enumerate(values) if v is vector) + 1
    values.append(None)
    ids_param = len(values)
    sql = (
        f"WITH vc AS ({vector_sql}) "
        "SELECT vc.id, vc.importance, vc.updated_at, vc.distance, true AS from_vector FROM vc "
        "UNION ALL "
        f"SELECT m.id, m.importance, m.updated_at, m.embedding <=> ${vector_param} AS distance, false "
        f"FROM memory.memories m WHERE m.id = ANY(${ids_param}::bigint[]) AND m.id NOT IN (SELECT id FROM vc) "
        f"AND {LIVE}"
    )
    return sql, values, ids_param - 1


async def hybrid_candidates(
    conn: asyncpg.Connection,
    memory_filter: MemoryFilter,
    *,
    vector: Vector,
    limit: int,
    exact: bool,
    text_ids: list[int],
    generation: int | None = None,
    watermark: int | None = None,
) -> list[Candidate]:
    """The nearest ``limit`` by vector, and the text candidates ``text_ids`` (still live), each with its distance;
    text scores are the caller's to fill in."""
    sql, values, at = hybrid_statement(
        memory_filter, vector=vector, limit=limit, exact=exact, generation=generation, watermark=watermark
    )
    values[at] = text_ids
    text = set(text_ids)
    return [
        Candidate(
            id=row["id"],
            distance=row["distance"],
            text_score=None,
            importance=row["importance"],
            updated_at=row["updated_at"],
            from_vector=row["from_vector"],
            from_text=row["id"] in text,
            text_every_term=True,
        )
        for row in await conn.fetch(sql, *values)
    ]
