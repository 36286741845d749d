"""When the vector index is due for a build or a calibration: decisions on its state, which read and write nothing.

``search.index_care`` reads the state and does the work; the server, ``doctor`` and ``model`` decide through these
functions, so they agree on when an index is due.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime

from memory_service.models import IndexKind
from memory_service.search.calibration import MIN_SEEN, Calibration, Curve
from memory_service.search.hnsw_tail import tail_due

GROWTH_FACTOR = 2.0
"""An ivfflat index is rebuilt once its table has grown by this factor since its build."""
RECALIBRATE_AFTER = 0.2
"""Recalibrate once rows inserted, updated or deleted since the last calibration reach this share of the rows."""
HNSW_DEFAULT_EF_SEARCH = 40
"""pgvector's own default, used only until the index's first calibration."""


def fitted_lists(rows: int) -> int:
    """pgvector's guidance: rows / 1000 up to a million rows, sqrt(rows) beyond."""
    if rows <= 1_000_000:
        return max(10, rows // 1000)
    return int(math.sqrt(rows))


def fitted_probes(lists: int) -> int:
    """Probes before the index is calibrated (or when a calibration is unreadable): about sqrt(lists)."""
    return max(1, min(lists, math.ceil(math.sqrt(lists))))


@dataclasses.dataclass(frozen=True)
class IndexState:
    exists: bool = False
    valid: bool = False
    kind: IndexKind | None = None
    lists: int = 0
    m: int = 0
    rows: int = 0
    """Rows with an embedding, as the planner estimates them."""
    rows_at_build: int = 0
    built_at: datetime | None = None
    calibration: Calibration | None = None
    """The calibration of this very index (one of an index since replaced is dropped)."""
    watermark: int | None = None
    """A partial HNSW index covers ``graph_seq <= watermark``; None: every row (ivfflat, or HNSW_TAIL_ROWS=0)."""
    tail: int = 0
    """Rows with an embedding above the watermark, searched exactly (counted up to a cap: see ``_read``)."""
    fed: int = 0
    """Rows ever fed into a graph (``storage.index_sql.FED_ROWS_KEY``)."""

    @property
    def usable(self) -> bool:
        return self.exists and self.valid and (self.kind == "hnsw" or self.lists > 0)


def search_setting(state: IndexState, *, filtered: bool, configured: int | None) -> int:
    """Probes (ef_search for HNSW) an index search uses unless the request names its own: the operator's
    setting, then the index's calibration for this kind of search, then a rule of thumb until the first one."""
    setting = configured
    if not setting:
        if state.calibration is not None:
            setting = state.calibration.setting(filtered=filtered)
        else:
            setting = HNSW_DEFAULT_EF_SEARCH if state.kind == "hnsw" else fitted_probes(state.lists)
    return setting if state.kind == "hnsw" else min(setting, state.lists)


def needs_rebuild(
    state: IndexState,
    *,
    exact_max_rows: int,
    kind: IndexKind = "ivfflat",
    tail_rows: int | None = None,
    tail_before: int | None = None,
    insert_rows: int = 0,
) -> bool:
    """Past the exact-search threshold, build when there is no usable index of the wanted kind, when an ivfflat
    index's table has doubled since its build, or when an HNSW index's tail has reached its bound. ``tail_rows``:
    HNSW_TAIL_ROWS (0: a graph of every row, so a partial one is replaced); None leaves the HNSW graph as it is;
    ``tail_before``: the tail at the previous check, ``insert_rows`` HNSW_GRAPH_INSERT_ROWS
    (``search.hnsw_tail.tail_due``)."""
    if state.rows < exact_max_rows:
        return False
    if not state.usable or state.kind != kind:
        return True
    if kind == "ivfflat":
        return state.rows >= GROWTH_FACTOR * max(state.rows_at_build, 1)
    if tail_rows is None:
        return False
    if (state.watermark is not None) != (tail_rows > 0):
        return True
    if state.watermark is None:
        return False
    return tail_due(
        state.tail,
        rows_at_build=state.rows_at_build,
        tail_rows=tail_rows,
        tail_before=tail_before,
        rows=state.rows,
        insert_rows=insert_rows,
    )


def needs_calibration(
    state: IndexState,
    *,
    writes: int,
    target: float,
    seen_unfiltered: int = 0,
    seen_filtered: int = 0,
    sample_capacity: int | None = None,
) -> bool:
    """A usable index without a calibration of its own, with another target, measured on stored vectors when
    enough real searches have been seen since, or whose data has changed enough. ``sample_capacity``: the most
    searches of a kind an instance keeps (``search.query_sample``; None: no bound)."""
    if not state.usable:
        return False
    calibration = state.calibration
    if calibration is None or calibration.target != target:
        return True
    if _worth_measuring(seen_unfiltered, calibration.unfiltered, sample_capacity):
        return True
    if _worth_measuring(seen_filtered, calibration.filtered, sample_capacity):
        return True
    changed = writes - calibration.writes
    # A counter that went backwards was reset (statistics reset, or a restored database): nothing to measure from.
    if changed < 0:
        return True
    # Rows fed into the graph were counted as updates but changed no data. The statistics take in a transaction's
    # writes up to a second or so after it commits, the feed's counter at once: around a feed the difference is
    # off by the rows fed in that second, against a fifth of the table.
    changed -= max(state.fed - calibration.fed, 0)
    return changed >= RECALIBRATE_AFTER * max(calibration.rows, 1)


def _worth_measuring(seen: int, curve: Curve | None, capacity: int | None) -> bool:
    """Whether ``seen`` recent searches of a kind make a new calibration worth it. Real searches replace stored
    vectors once there are ``MIN_SEEN``; then a sample that has doubled since measures again, more precisely (50,
    100, 200, 400), and so does a full one (``capacity``) where the last was measured on fewer: the sample grows
    between two checks, so a calibration on 300 of 400 would otherwise wait for 600, which never come. At least
    ``MIN_SEEN`` more than the last, so that a full sample a query or two short of it (a query whose neighbours
    all went) does not measure again at every check."""
    if seen < MIN_SEEN:
        return False
    if curve is None or curve.source != "searches":
        return True
    wanted = 2 * curve.queries if capacity is None else min(2 * curve.queries, capacity)
    return seen >= wanted and seen >= curve.queries + MIN_SEEN
