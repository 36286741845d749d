"""Calibrating the vector index on its own data: the least probes (ef_search for HNSW) that reach a target recall.

The right number of ivfflat lists to probe, or of HNSW candidates to keep, depends on how the stored vectors
cluster: on well-separated data one list finds every neighbour, on real embeddings a rule such as ``sqrt(lists)``
can lose 5% of them. So after each build, and again as the data changes, the service measures: queries made
between sampled memories (``search.calibration_queries``: stored vectors themselves over-promise), or, once an
instance has seen enough, its own recent searches (``search.query_sample``); their exact neighbours are the truth,
and the same search statement runs through the index at rising settings until recall@10 reaches the target on
half the queries with 95% confidence (its lower confidence bound, so a small or lucky sample does not buy too few
probes) and the other half, held out from the choice, confirms it. Filtered searches (a scope large enough to be
searched through the index) are measured on their own, because their true neighbours lie farther out than an
unfiltered search's.

What the search uses: the setting of the first point that passed both (or the last tried), and as its estimated
recall the lower of the two halves' recalls there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from memory_service.models import IndexKind, MemoryFilter, ScopeRef, Vector
from memory_service.search.calibration_queries import COLD_EXTRA, COLD_MARGIN, moved
from memory_service.search.exact_truth import exact_top
from memory_service.search.query_sample import QuerySample
from memory_service.search.tuning import scan_settings
from memory_service.storage import calibration_sql
from memory_service.storage.calibration_sql import SampleRow
from memory_service.storage.database import Connection

log = logging.getLogger(__name__)

RECALL_AT = 10
"""Recall is measured on the top 10, the default top_k."""
MIN_SEEN = 50
"""Recent searches (of a kind: unfiltered, filtered) needed before they replace sampled memories as queries."""
Z95 = 1.645
"""One-sided 95% normal quantile, for the lower confidence bound the choice is made on."""
# pgvector accepts ef_search up to 1000; ef_search below the LIMIT cannot return LIMIT rows without an iterative scan.
HNSW_LADDER = (10, 16, 20, 24, 32, 40, 48, 64, 80, 100, 128, 160, 200, 256, 320, 400, 500, 640, 800, 1000)
_IVFFLAT_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192)


def ladder(kind: IndexKind, lists: int) -> list[int]:
    """The settings tried, cheapest first: for ivfflat up to every list (which is exact), for HNSW up to 1000."""
    if kind == "hnsw":
        return list(HNSW_LADDER)
    steps = [s for s in _IVFFLAT_STEPS if s < lists]
    while steps and steps[-1] * 1.25 < lists:
        steps.append(int(steps[-1] * 1.25))
    return [*steps, max(lists, 1)]


@dataclasses.dataclass(frozen=True)
class Curve:
    """Mean recall@10 at each setting tried, cheapest first; the last one reached the target or was the most."""

    points: tuple[tuple[int, float], ...]
    queries: int
    source: str = "memories"
    """What served as queries: "searches" (vectors of recent searches) or "memories" (sampled stored vectors)."""
    lower: tuple[float, ...] = ()
    """At each point, a one-sided 95% lower confidence bound of the recall (mean less 1.645 standard errors of
    the per-query recalls): what the choice is made on, so a sample of 50 queries that happened to be easy does not
    buy too few probes. Empty in calibrations stored before it was kept: the mean serves."""
    checked: tuple[tuple[int, float], ...] = ()
    """Held-out recall: at each setting whose bound reached the target, the mean recall of a second set of queries
    that took no part in the choice. Walking up a ladder and stopping at the first setting that passes favours a
    setting where the sample happened to do well; the held-out set has no such luck, so a setting is chosen only
    when it reaches the target too, and its recall is what the calibration reports. Empty in calibrations stored
    before it was kept."""

    margin: float = 1.0
    """What the setting that reached the target is multiplied by: more than 1 for queries made from stored
    memories, which cannot tell how far real questions lie (``search.calibration_queries.COLD_MARGIN``)."""

    extra: int = 0
    """Added to the setting after ``margin``: HNSW's cold margin (``search.calibration_queries.COLD_EXTRA``)."""

    most: int = 0
    """The largest setting there is (every list; ef_search 1000), which the margin never goes past; 0: no bound."""

    def chosen(self, target: float) -> int:
        bounds = self.lower or tuple(recall for _, recall in self.points)
        held_out = dict(self.checked)
        passed = self.points[-1][0]
        for (setting, _), bound in zip(self.points, bounds, strict=True):
            if bound >= target and (not self.checked or held_out.get(setting, 0.0) >= target):
                passed = setting
                break
        with_margin = math.ceil(passed * self.margin) + self.extra
        return min(with_margin, self.most) if self.most else with_margin

    def recall_at(self, setting: int) -> float | None:
        """Recall measured at the largest tried setting not above ``setting`` (more probes never find less), the
        lower of the two measurements where the held-out set was measured too; None below the cheapest tried."""
        held_out = dict(self.checked)
        measured = [min(recall, held_out.get(tried, recall)) for tried, recall in self.points if tried <= setting]
        return max(measured) if measured else None

    def to_json(self) -> dict[str, Any]:
        return {
            "points": [list(p) for p in self.points],
            "queries": self.queries,
            "source": self.source,
            "lower": list(self.lower),
            "checked": [list(p) for p in self.checked],
            "margin": self.margin,
            "extra": self.extra,
            "most": self.most,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Curve:
        return cls(
            points=tuple((int(s), float(r)) for s, r in data["points"]),
            queries=int(data["queries"]),
            source=str(data.get("source", "memories")),
            lower=tuple(float(x) for x in data.get("lower", ())),
            checked=tuple((int(s), float(r)) for s, r in data.get("checked", ())),
            margin=float(data.get("margin", 1.0)),
            extra=int(data.get("extra", 0)),
            most=int(data.get("most", 0)),
        )


@dataclasses.dataclass(frozen=True)
class Calibration:
    kind: IndexKind
    target: float
    unfiltered: Curve
    filtered: Curve | None
    """None when no sampled memory's scope was large enough to be searched through the index."""
    rows: int
    writes: int
    """``stats_sql.writes_so_far`` when calibrated: what "the data changed enough" is measured from."""
    index_built_at: str
    calibrated_at: datetime
    seconds: float
    fed: int = 0
    """Rows fed into a graph by then (``index_sql.FED_ROWS_KEY``): writes of no data, left out of ``writes``'
    growth."""

    def curve(self, *, filtered: bool) -> Curve:
        return self.filtered if filtered and self.filtered is not None else self.unfiltered

    def setting(self, *, filtered: bool) -> int:
        return self.curve(filtered=filtered).chosen(self.target)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "unfiltered": self.unfiltered.to_json(),
            "filtered": None if self.filtered is None else self.filtered.to_json(),
            "rows": self.rows,
            "writes": self.writes,
            "index_built_at": self.index_built_at,
            "calibrated_at": self.calibrated_at.isoformat(),
            "seconds": self.seconds,
            "fed": self.fed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        filtered = data.get("filtered")
        return cls(
            kind=data["kind"],
            target=float(data["target"]),
            unfiltered=Curve.from_json(data["unfiltered"]),
            filtered=None if filtered is None else Curve.from_json(filtered),
            rows=int(data["rows"]),
            writes=int(data["writes"]),
            index_built_at=str(data["index_built_at"]),
            calibrated_at=datetime.fromisoformat(data["calibrated_at"]),
            seconds=float(data["seconds"]),
            fed=int(data.get("fed", 0)),
        )


@dataclasses.dataclass(frozen=True)
class _Probe:
    """One sampled memory as a query: its vector, the filter it runs under, and its true neighbours."""

    id: int | None
    vector: Any
    memory_filter: MemoryFilter
    truth: frozenset[int]


def _without(query_id: int | None, ids: Sequence[int]) -> list[int]:
    """The neighbours other than the query itself (a stored vector is its own nearest)."""
    return [i for i in ids if i != query_id][:RECALL_AT]


async def _probe(
    conn: Connection, query_id: int | None, vector: Any, memory_filter: MemoryFilter, column: str = "embedding"
) -> _Probe:
    """A query and its exact neighbours; a stored memory used as a query (``query_id``) is left out of them."""
    ids = await calibration_sql.nearest(conn, memory_filter, vector, limit=RECALL_AT + 1, exact=True, column=column)
    return _Probe(query_id, vector, memory_filter, frozenset(_without(query_id, ids)))


async def _scope_probes(
    conn: Connection, rows: Sequence[SampleRow], vectors: Sequence[Vector], min_rows: int, column: str = "embedding"
) -> list[_Probe]:
    """Queries made from sampled memories (``vectors[i]`` from ``rows[i]``) filtered to the memory's scope, for
    the scopes large enough (``min_rows``) that a search of them would use the index."""
    large: dict[ScopeRef, bool] = {}
    probes = []
    for row, vector in zip(rows, vectors, strict=False):
        scope_filter = MemoryFilter(scopes=(row.scope,))
        if row.scope not in large:
            large[row.scope] = await calibration_sql.matching_at_least(conn, scope_filter, max(min_rows, 1))
        if large[row.scope]:
            probes.append(await _probe(conn, None, vector, scope_filter, column))
    return probes


async def _recalls(
    conn: Connection, probes: Sequence[_Probe], column: str = "embedding", watermark: int | None = None
) -> list[float]:
    """recall@10 of each query through the index, at the connection's current scan settings (with a partial HNSW
    index's exact tail, as searches run: ``watermark``)."""
    recalls = []
    for probe in probes:
        ids = await calibration_sql.nearest(
            conn,
            probe.memory_filter,
            probe.vector,
            limit=RECALL_AT + 1,
            exact=False,
            column=column,
            watermark=watermark,
        )
        recalls.append(len(probe.truth.intersection(_without(probe.id, ids))) / len(probe.truth))
    return recalls


async def _curve(
    conn: Connection,
    probes: Sequence[_Probe],
    settings: Sequence[int],
    *,
    kind: IndexKind,
    iterative: bool,
    target: float,
    source: str,
    margin: float,
    extra: int,
    column: str = "embedding",
    watermark: int | None = None,
) -> Curve:
    """Walk up ``settings`` on half the queries (alternate ones) until the lower bound of their mean recall
    reaches the target and the other half, held out, confirms it (``Curve.checked``)."""
    fit, held_out = (list(probes[0::2]), list(probes[1::2])) if len(probes) > 1 else (list(probes), [])
    points: list[tuple[int, float]] = []
    lower: list[float] = []
    checked: list[tuple[int, float]] = []
    filtered = any(not probe.memory_filter.is_empty for probe in probes)
    for setting in settings:
        scan = scan_settings(kind, setting, iterative=iterative, limit=RECALL_AT + 1, filtered=filtered)
        await calibration_sql.use_settings(conn, scan)
        per_query = await _recalls(conn, fit, column, watermark)
        recall = round(statistics.fmean(per_query), 4)
        spread = statistics.stdev(per_query) if len(per_query) > 1 else 0.0
        bound = round(recall - Z95 * spread / math.sqrt(len(per_query)), 4)
        points.append((setting, recall))
        lower.append(bound)
        if bound < target:
            continue
        if not held_out:
            break
        confirmed = round(statistics.fmean(await _recalls(conn, held_out, column, watermark)), 4)
        checked.append((setting, confirmed))
        if confirmed >= target:
            break
    return Curve(
        points=tuple(points),
        queries=len(probes),
        source=source,
        lower=tuple(lower),
        checked=tuple(checked),
        margin=margin,
        extra=extra,
        most=settings[-1] if settings else 0,
    )


async def calibrate(
    conn: Connection,
    *,
    kind: IndexKind,
    lists: int,
    target: float,
    queries: int,
    filtered_min_rows: int,
    iterative: bool,
    rows: int,
    writes: int,
    index_built_at: str,
    fed: int = 0,
    seen: QuerySample | None = None,
    column: str = "embedding",
    watermark: int | None = None,
) -> Calibration:
    """Measure recall@10 unfiltered and filtered: on the recent searches in ``seen`` when there are at least
    ``MIN_SEEN`` of the kind, otherwise on ``queries`` points between sampled memories
    (``search.calibration_queries``; filtered by their memory's scope when it holds at least ``filtered_min_rows``
    memories, so a search would use the index). Either way half the queries choose, the other half check.

    A partial HNSW index (``watermark``) is measured as searches use it, with its tail scanned exactly: right after
    a build the tail is nearly empty, so the setting is the graph's own; later the tail only adds exact rows."""
    started = time.perf_counter()
    seen_unfiltered = seen.queries(filtered=False) if seen is not None else []
    seen_filtered = seen.queries(filtered=True) if seen is not None else []
    unfiltered_on_searches = len(seen_unfiltered) >= MIN_SEEN
    # Without iterative scans a filtered index scan that comes back short falls back to an exact scan, so its
    # recall is not the index's to measure: no filtered queries at all.
    filtered_on_searches = iterative and len(seen_filtered) >= MIN_SEEN
    sample: list[SampleRow] = []
    if not unfiltered_on_searches or (iterative and not filtered_on_searches):
        # Stored vectors are read (a Bernoulli sample reads every page) only for a kind that has too few searches.
        sample = await calibration_sql.sample(conn, queries, rows=rows, column=column)
        if not sample:
            raise ValueError("no stored vectors to calibrate on")
    nearest = [
        await calibration_sql.nearest_other(conn, row.id, row.vector, column=column, watermark=watermark)
        for row in sample
    ]
    queries_made = moved([row.vector for row in sample], nearest)
    unfiltered_vectors = [q.vector for q in seen_unfiltered] if unfiltered_on_searches else queries_made
    # Their true neighbours in one pass over the table, not an exact scan each (unfiltered searches are those
    # whose filter is empty: query_sample keeps them apart).
    truths = await exact_top(unfiltered_vectors, calibration_sql.live_vectors(conn, column=column), RECALL_AT)
    unfiltered = [
        _Probe(None, vector, MemoryFilter(), frozenset(truth))
        for vector, truth in zip(unfiltered_vectors, truths, strict=True)
    ]
    filtered: list[_Probe] = []
    if filtered_on_searches:
        filtered = [await _probe(conn, None, q.vector, q.memory_filter, column) for q in seen_filtered]
    elif iterative:
        filtered = await _scope_probes(conn, sample, queries_made, filtered_min_rows, column)
    # A query with no neighbour measures nothing (and has no recall to divide by): a table emptied since the
    # searches were seen, or a lone stored vector.
    unfiltered = [p for p in unfiltered if p.truth]
    filtered = [p for p in filtered if p.truth]
    if not unfiltered:
        raise ValueError("no stored vectors to calibrate on")
    settings = ladder(kind, lists)

    async def curve(probes: Sequence[_Probe], on_searches: bool) -> Curve:
        source = "searches" if on_searches else "memories"
        margin, extra = (1.0, 0) if on_searches else (COLD_MARGIN[kind], COLD_EXTRA[kind])
        return await _curve(
            conn,
            probes,
            settings,
            kind=kind,
            iterative=iterative,
            target=target,
            source=source,
            margin=margin,
            extra=extra,
            column=column,
            watermark=watermark,
        )

    unfiltered_curve = await curve(unfiltered, unfiltered_on_searches)
    filtered_curve = await curve(filtered, filtered_on_searches) if filtered else None
    calibration = Calibration(
        kind=kind,
        target=target,
        unfiltered=unfiltered_curve,
        filtered=filtered_curve,
        rows=rows,
        writes=writes,
        index_built_at=index_built_at,
        calibrated_at=datetime.now(UTC),
        seconds=round(time.perf_counter() - started, 3),
        fed=fed,
    )
    log.info(
        "calibrated %s on %d queries (%d filtered) in %.1fs: %s",
        kind,
        len(unfiltered),
        len(filtered),
        calibration.seconds,
        {"unfiltered": unfiltered_curve.points[-1], "filtered": filtered_curve.points[-1] if filtered_curve else None},
    )
    return calibration
