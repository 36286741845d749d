"""When an HNSW graph built up to a watermark is built again: the policy on its tail.

Rows written after the graph's build, the tail, are searched exactly beside it (``storage.search_sql``), so every
index search pays for each of them (about 1 us of CPU at 384 dimensions), and a rebuild pays for the whole graph
(about 0.26 ms a row with two parallel workers). The bound on the tail is absolute (``HNSW_TAIL_ROWS``: what a search
may scan exactly) and relative (half the graph's rows, so on a small table a load's rows reach the graph after a
build of about three times their number, not one of the whole table for a few rows).

Past the bound the graph waits for a load to end: while the tail grew by a tenth of the bound or more since the
previous check, a rebuild would compete with the load for the machine and be outgrown before it finished. At
``LOAD_TAIL_FACTOR`` times the bound it is built all the same, so what searches scan exactly stays bounded.
"""

from __future__ import annotations

import math

TAIL_SHARE = 0.5
"""A graph is due once its tail reaches this share of its rows (or ``HNSW_TAIL_ROWS``, if fewer)."""
LOAD_TAIL_FACTOR = 2
"""While a load goes on, a graph is due only once its tail reaches this many times its bound."""
QUIET_SHARE = 0.1
"""A tail that grew by less than this share of the bound since the previous check is taken as a load that ended."""


def tail_bound(rows_at_build: int, tail_rows: int) -> int:
    """The tail a graph may have before it is due: ``tail_rows`` (HNSW_TAIL_ROWS), or half its rows if fewer."""
    return max(1, min(tail_rows, math.ceil(TAIL_SHARE * rows_at_build)))


def tail_due(tail: int, *, rows_at_build: int, tail_rows: int, tail_before: int | None) -> bool:
    """Whether a graph of ``rows_at_build`` rows with ``tail`` rows above its watermark is to be built again;
    ``tail_before``: the tail at the previous check (None: no previous check, so no load known to go on)."""
    bound = tail_bound(rows_at_build, tail_rows)
    if tail >= LOAD_TAIL_FACTOR * bound:
        return True
    loading = tail_before is not None and tail - tail_before >= QUIET_SHARE * bound
    return tail >= bound and not loading
