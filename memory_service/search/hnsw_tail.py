"""When an HNSW graph built up to a watermark is built again: the policy on its tail.

Rows written after the graph's build, the tail, are searched exactly beside it (``storage.search_sql``), so every
index search pays for each of them (about 1 us of CPU at 384 dimensions), and a rebuild pays for the whole graph
(about 0.26 ms a row with two parallel workers). The bound on the tail is absolute (``HNSW_TAIL_ROWS``: what a search
may scan exactly) and relative (half the graph's rows, so on a small table a load's rows reach the graph after a
build of about three times their number, not one of the whole table for a few rows).

Past the bound the graph waits for a load to end: while the tail grew by a tenth of the bound or more since the
previous check, a rebuild would compete with the load for the machine and be outgrown before it finished. At
``LOAD_TAIL_FACTOR`` times the bound it is built all the same, so what searches scan exactly stays bounded.

A rebuild's cost grows with the graph, a tail row's insertion does not: one row into the graph costs about 1.7 ms
of database CPU (pgvector's per-row insert, plus rewriting the row's version), while a rebuild every
``HNSW_TAIL_ROWS`` rows costs its whole graph's build, 0.26 ms a row on two cores, for each of them (5 ms per row
written at 100k rows, 50 ms at a million). So a graph of ``HNSW_GRAPH_INSERT_ROWS`` rows or more takes its tail by
insertion (``storage.index_sql.feed_tail``), at once unless a load is going on, and is rebuilt only when the table
has grown by half since its build (a load that large is cheaper to build over).
"""

from __future__ import annotations

import math

TAIL_SHARE = 0.5
"""A graph is due once its tail reaches this share of its rows (or ``HNSW_TAIL_ROWS``, if fewer)."""
LOAD_TAIL_FACTOR = 2
"""While a load goes on, a graph is due only once its tail reaches this many times its bound."""
QUIET_SHARE = 0.1
"""A tail that grew by less than this share of the bound since the previous check is taken as a load that ended."""
INSERT_QUIET_SHARE = 1.0
"""For a graph that takes its tail by insertion: a tail that grew by less than this share of the bound since the
previous check is inserted at once. Waiting spares an insertion nothing (a row costs the same now or later); only a
load, which the insertion would slow, is waited for. Below the bound per check (5,000 rows a minute by default) the
insertion takes at most about a sixth of a core."""


def tail_bound(rows_at_build: int, tail_rows: int) -> int:
    """The tail a graph may have before it is due: ``tail_rows`` (HNSW_TAIL_ROWS), or half its rows if fewer."""
    return max(1, min(tail_rows, math.ceil(TAIL_SHARE * rows_at_build)))


def inserts_tail(*, rows: int, rows_at_build: int, insert_rows: int) -> bool:
    """Whether a graph of ``rows_at_build`` rows, in a table of ``rows`` now, takes its tail by insertion
    (``insert_rows``: HNSW_GRAPH_INSERT_ROWS, 0 for never) rather than by a rebuild."""
    return 0 < insert_rows <= rows_at_build and rows < (1 + TAIL_SHARE) * rows_at_build


def tail_due(
    tail: int, *, rows_at_build: int, tail_rows: int, tail_before: int | None, rows: int = 0, insert_rows: int = 0
) -> bool:
    """Whether a graph of ``rows_at_build`` rows with ``tail`` rows above its watermark is to be built again;
    ``tail_before``: the tail at the previous check (None: no previous check, so no load known to go on); ``rows``
    and ``insert_rows``: see ``inserts_tail``, under which a graph is never due for its tail."""
    if inserts_tail(rows=rows, rows_at_build=rows_at_build, insert_rows=insert_rows):
        return False
    bound = tail_bound(rows_at_build, tail_rows)
    return _settled(tail, bound, tail_before, minimum=bound, quiet=QUIET_SHARE)


def tail_to_insert(
    tail: int, *, rows_at_build: int, tail_rows: int, tail_before: int | None, rows: int, insert_rows: int
) -> bool:
    """Whether the tail of a graph that takes its tail by insertion is to be inserted now: any tail, unless a load
    is going on (``INSERT_QUIET_SHARE``); every search scans the tail meanwhile."""
    if not inserts_tail(rows=rows, rows_at_build=rows_at_build, insert_rows=insert_rows):
        return False
    return _settled(tail, tail_bound(rows_at_build, tail_rows), tail_before, minimum=1, quiet=INSERT_QUIET_SHARE)


def _settled(tail: int, bound: int, tail_before: int | None, *, minimum: int, quiet: float) -> bool:
    """A tail of at least ``minimum`` rows with no load going on (it grew by less than ``quiet`` times the bound
    since the previous check), or one past ``LOAD_TAIL_FACTOR`` times its bound."""
    if tail >= LOAD_TAIL_FACTOR * bound:
        return True
    loading = tail_before is not None and tail - tail_before >= quiet * bound
    return tail >= minimum and not loading
