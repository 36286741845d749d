"""Keeping the vector index worth using: reading its state, and building, feeding and calibrating it when due.

An ivfflat index built on an empty or small table has poor recall: its list centroids describe data that is no
longer there. Below a row threshold every search is exact and no index is kept; past it, the index is built (ivfflat
with ``lists`` fitted to the row count, or HNSW, per ``VECTOR_INDEX``), and an ivfflat index is rebuilt each time
the table has doubled since the last build. Builds run concurrently with writes, and only one instance maintains
the index at a time (``storage.index_sql.maintenance_connection``).

An HNSW graph is built over the rows up to a watermark (``HNSW_TAIL_ROWS`` > 0): rows written since, the tail, are
searched exactly beside it instead of being inserted into the graph one by one, which made a bulk load into an
HNSW table twenty times slower than into ivfflat; when the tail is due (``search.hnsw_tail``) the graph is built
again, in memory and with parallel workers, over every row, or, once the graph is large enough that a rebuild costs
more than inserting the tail (``HNSW_GRAPH_INSERT_ROWS``), the tail's rows are inserted into it in the background.
The decisions themselves are in ``search.index_policy``.

After each build, whenever a fifth of the rows have been written since, and once this instance has seen enough real
searches to replace sampled memories as calibration queries, the index is calibrated (``search.calibration``): the
probes or ef_search that reach the target recall on its own data. Every instance reads the stored calibration when
it refreshes its state.

The row count the policy watches is the planner's estimate, read from the catalog: checking every minute on every
instance (and on every Stats call) must not scan the table. A rebuild counts exactly, once.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from datetime import datetime
from typing import Any

from memory_service.config.settings import Settings
from memory_service.metrics import Metrics
from memory_service.models import IndexKind
from memory_service.search.calibration import Calibration, calibrate
from memory_service.search.hnsw_tail import tail_bound, tail_to_insert
from memory_service.search.index_policy import (
    IndexState,
    fitted_lists,
    needs_calibration,
    needs_rebuild,
    search_setting,
)
from memory_service.search.query_sample import QuerySample
from memory_service.storage import calibration_sql, index_sql, settings_sql, stats_sql
from memory_service.storage.database import Connection, Database
from memory_service.storage.index_sql import IndexSpec, setting_key

log = logging.getLogger(__name__)

_ROWS_AT_BUILD = "vector_index_rows_at_build"
_BUILT_AT = "vector_index_built_at"
_LEGACY = {_ROWS_AT_BUILD: "ivfflat_rows_at_build", _BUILT_AT: "ivfflat_built_at"}
_INSERT_BATCH = 200
"""Tail rows inserted into an HNSW graph per transaction: about a third of a second of one core."""
_INSERT_BUDGET = 600.0
"""Seconds one insertion job may run (about 250,000 rows) before it leaves the rest to the next check."""


def _calibration_of(
    stored: dict[str, str], kind: IndexKind | None, built_at: str | None, column: str = "embedding"
) -> Calibration | None:
    raw = stored.get(setting_key(calibration_sql.CALIBRATION_KEY, column))
    if raw is None:
        return None
    try:
        calibration = Calibration.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable index calibration; the next maintenance recalibrates")
        return None
    return calibration if calibration.kind == kind and calibration.index_built_at == built_at else None


class IndexCare:
    def __init__(
        self,
        db: Database,
        dsn: str,
        *,
        exact_max_rows: int,
        kind: IndexKind = Settings.vector_index,
        target_recall: float = Settings.search_target_recall,
        calibration_queries: int = Settings.search_calibration_queries,
        filtered_min_rows: int = Settings.search_narrow_filter_rows,
        iterative_scan: bool = True,
        hnsw_m: int = Settings.hnsw_m,
        hnsw_ef_construction: int = Settings.hnsw_ef_construction,
        hnsw_tail_rows: int = Settings.hnsw_tail_rows,
        hnsw_graph_insert_rows: int = Settings.hnsw_graph_insert_rows,
        seen: QuerySample | None = None,
        metrics: Metrics | None = None,
        configured_setting: int | None = None,
        column: str = "embedding",
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._configured = configured_setting
        self.column = column
        """The vector column this cares for: ``embedding``, or a move's other generation (``embedding_alt``)."""
        self._dsn = dsn
        self.exact_max_rows = exact_max_rows
        self.kind: IndexKind = kind
        self.target_recall = target_recall
        self._calibration_queries = calibration_queries
        self._filtered_min_rows = filtered_min_rows
        self._iterative_scan = iterative_scan
        self._hnsw = (hnsw_m, hnsw_ef_construction)
        self.tail_rows = hnsw_tail_rows
        self.graph_insert_rows = hnsw_graph_insert_rows
        self._tail_seen: int | None = None
        """The tail at this instance's previous check: whether a load is still going on."""
        self._seen = seen
        self.state = IndexState()

    @classmethod
    def from_settings(cls, db: Database, dsn: str, settings: Settings, **extra: Any) -> IndexCare:
        """The care the service's settings describe (the server, ``doctor`` and ``model`` agree on when an index is
        due); ``extra``: the server's own parts (the search sample, the metrics) and overrides."""
        return cls(
            db,
            dsn,
            exact_max_rows=settings.exact_search_max_rows,
            kind=settings.vector_index,
            target_recall=settings.search_target_recall,
            calibration_queries=settings.search_calibration_queries,
            filtered_min_rows=settings.search_narrow_filter_rows,
            hnsw_m=settings.hnsw_m,
            hnsw_ef_construction=settings.hnsw_ef_construction,
            hnsw_tail_rows=settings.hnsw_tail_rows,
            hnsw_graph_insert_rows=settings.hnsw_graph_insert_rows,
            **extra,
        )

    def for_column(self, column: str) -> IndexCare:
        """The care of another vector column's index with this one's settings (a move's ``embedding_alt``), without
        the search sample and the metrics: they belong to the column searched."""
        other = copy.copy(self)
        other.column, other._seen, other._metrics, other.state = column, None, None, IndexState()
        return other

    async def refresh(self) -> IndexState:
        async with self._db.connection() as conn:
            self.state = await self._read(conn)
        if self._metrics is not None:
            publish(
                self._metrics,
                self.state,
                target=self.target_recall,
                exact_max_rows=self.exact_max_rows,
                configured=self._configured,
            )
            partial = self.state.watermark is not None
            bound = tail_bound(self.state.rows_at_build, self.tail_rows) if partial and self.tail_rows else 0
            self._metrics.index_tail_bound.set(bound)
        return self.state

    async def _read(self, conn: Connection) -> IndexState:
        info = await index_sql.index_info(conn, self.kind, self.column)
        rows = await index_sql.estimated_rows(conn, self.column)
        stored = await settings_sql.read_settings(conn)
        legacy = self.column == "embedding"
        built = stored.get(self._key(_BUILT_AT)) or (stored.get(_LEGACY[_BUILT_AT]) if legacy else None)
        rows_at_build = (
            stored.get(self._key(_ROWS_AT_BUILD)) or (stored.get(_LEGACY[_ROWS_AT_BUILD]) if legacy else None) or "0"
        )
        tail = 0
        if info.watermark is not None:
            # Counted, not estimated: the tail is what searches scan exactly. Past twice the bound the number only
            # says "rebuild", so the count stops there.
            cap = 2 * max(self.tail_rows, 1) + 1
            tail = await index_sql.tail_rows(conn, info.watermark, self.column, cap=cap)
        return IndexState(
            exists=info.exists,
            valid=info.valid,
            kind=info.kind,
            lists=info.lists,
            m=info.m,
            rows=rows,
            rows_at_build=int(rows_at_build),
            built_at=datetime.fromisoformat(built) if built else None,
            calibration=_calibration_of(stored, info.kind, built, self.column),
            watermark=info.watermark,
            tail=tail,
            fed=int(stored.get(stats_sql.FED_ROWS_KEY, "0")),
        )

    def _key(self, base: str) -> str:
        return setting_key(base, self.column)

    def needs_rebuild(self, state: IndexState, tail_before: int | None = None) -> bool:
        return needs_rebuild(
            state,
            exact_max_rows=self.exact_max_rows,
            kind=self.kind,
            tail_rows=self.tail_rows,
            tail_before=tail_before,
            insert_rows=self.graph_insert_rows,
        )

    def tail_to_insert(self, state: IndexState, tail_before: int | None = None) -> bool:
        """Whether the graph takes its tail by insertion and it is time to (``search.hnsw_tail.tail_to_insert``)."""
        if state.watermark is None or not state.usable or state.kind != "hnsw" or self.kind != "hnsw":
            return False
        return tail_to_insert(
            state.tail,
            rows_at_build=state.rows_at_build,
            tail_rows=self.tail_rows,
            tail_before=tail_before,
            rows=state.rows,
            insert_rows=self.graph_insert_rows,
        )

    def spec_for(self, rows: int, watermark: int | None = None) -> IndexSpec:
        """What to build for ``rows`` rows; an HNSW graph covers ids up to ``watermark`` when tails are kept."""
        if self.kind == "hnsw":
            m, ef_construction = self._hnsw
            partial = watermark if self.tail_rows > 0 else None
            return IndexSpec("hnsw", m=m, ef_construction=ef_construction, column=self.column, watermark=partial)
        return IndexSpec("ivfflat", lists=fitted_lists(rows), column=self.column)

    async def maintain(self, *, force: bool = False) -> str:
        """Rebuild when due (or when forced) and calibrate when due; return what was done, for logs and the CLI."""
        state = await self.refresh()
        before, self._tail_seen = self._tail_seen, state.tail
        async with self._db.connection() as conn:
            writes = await stats_sql.writes_so_far(conn)
        due = force or self.needs_rebuild(state, before) or self.tail_to_insert(state, before)
        if not due and not self._needs_calibration(state, writes):
            return "up to date" if state.usable else f"exact search ({state.rows} rows < {self.exact_max_rows})"
        async with index_sql.maintenance_connection(self._dsn) as conn:
            if conn is None:
                return "another instance is rebuilding the index"
            done: list[str] = []
            # Another instance may have done the work while this one waited for the lock: decide again.
            state = await self._read(conn)
            if force or self.needs_rebuild(state, before):
                # The watermark first: rows written while the rows are counted and the graph is built are the tail.
                watermark = await index_sql.next_watermark(conn)
                rows = await index_sql.row_count(conn, self.column)
                spec = self.spec_for(rows, watermark)
                log.info("building %s index: %d rows (%s)", spec.kind, rows, spec.using())
                built_at = await index_sql.rebuild(conn, spec)
                await settings_sql.write_settings(
                    conn, {self._key(_ROWS_AT_BUILD): str(rows), self._key(_BUILT_AT): built_at.isoformat()}
                )
                state = await self._read(conn)
                self._tail_seen = state.tail
                described = f"lists={spec.lists}" if spec.kind == "ivfflat" else f"m={spec.m}"
                if spec.watermark is not None:
                    described += f", graph_seq <= {spec.watermark}"
                done.append(f"rebuilt {spec.kind} with {described} for {rows} rows")
            elif self.tail_to_insert(state, before):
                assert state.watermark is not None
                moved = await self._insert_tail(conn, state.watermark)
                state = await self._read(conn)
                self._tail_seen = state.tail
                done.append(f"inserted {moved} tail rows into the hnsw graph (graph_seq <= {state.watermark})")
            writes = await stats_sql.writes_so_far(conn)
            if self._needs_calibration(state, writes):
                done.append(await self._calibrate(conn, state, writes))
        await self.refresh()
        return "; ".join(done) or "up to date"

    async def _insert_tail(self, conn: Connection, watermark: int) -> int:
        """Insert the tail into the graph a batch at a time (each its own short transaction, so a write waits on
        no lock for long): every row written before the job began, however many (the tail's count stops at twice
        its bound), within ``_INSERT_BUDGET`` seconds; rows written meanwhile, and any left, are the next check's."""
        # No rebuild runs while the graph takes its tail by insertion: one that was interrupted is cleaned up here.
        await index_sql.drop_leftovers(conn, "hnsw", self.column)
        upto = await index_sql.next_watermark(conn)
        deadline = time.monotonic() + _INSERT_BUDGET
        moved = 0
        while time.monotonic() < deadline:
            done = await index_sql.feed_tail(conn, watermark, self.column, rows=_INSERT_BATCH, upto=upto)
            moved += done
            if done < _INSERT_BATCH:
                break
        return moved

    def _needs_calibration(self, state: IndexState, writes: int) -> bool:
        seen = self._seen
        return needs_calibration(
            state,
            writes=writes,
            target=self.target_recall,
            seen_unfiltered=len(seen.queries(filtered=False)) if seen is not None else 0,
            # Without iterative scans filtered searches are not calibrated at all (see calibration.calibrate).
            seen_filtered=len(seen.queries(filtered=True)) if seen is not None and self._iterative_scan else 0,
            sample_capacity=seen.capacity if seen is not None else None,
        )

    async def _calibrate(self, conn: Connection, state: IndexState, writes: int) -> str:
        assert state.kind is not None and state.built_at is not None, "calibrating an index that was never built"
        try:
            calibration = await calibrate(
                conn,
                kind=state.kind,
                lists=state.lists,
                target=self.target_recall,
                queries=self._calibration_queries,
                filtered_min_rows=self._filtered_min_rows,
                iterative=self._iterative_scan,
                rows=max(state.rows, 1),
                writes=writes,
                index_built_at=state.built_at.isoformat(),
                fed=state.fed,
                seen=self._seen,
                column=self.column,
                watermark=state.watermark,
            )
        except ValueError as exc:
            return f"not calibrated: {exc}"
        await calibration_sql.write(conn, calibration.to_json(), self._key(calibration_sql.CALIBRATION_KEY))
        return "calibrated " + describe(calibration)


def publish(metrics: Metrics, state: IndexState, *, target: float, exact_max_rows: int, configured: int | None) -> None:
    """The index's state as gauges: what it is, how it was calibrated, and what searches use."""
    for kind in ("ivfflat", "hnsw", "none"):
        metrics.index_info.labels(kind).set(
            1 if (state.kind or "none") == kind and (state.exists or kind == "none") else 0
        )
    metrics.index_usable.set(1 if state.usable else 0)
    metrics.index_lists.set(state.lists if state.kind == "ivfflat" else 0)
    metrics.index_m.set(state.m if state.kind == "hnsw" else 0)
    metrics.index_rows.set(state.rows)
    metrics.index_rows_at_build.set(state.rows_at_build)
    metrics.index_tail_rows.set(state.tail)
    metrics.index_exact_rows.set(exact_max_rows)
    metrics.index_built.set(state.built_at.timestamp() if state.built_at else 0)
    metrics.index_target_recall.set(target)
    calibration = state.calibration
    metrics.index_calibrated.set(calibration.calibrated_at.timestamp() if calibration else 0)
    for filtered in (False, True):
        label = "true" if filtered else "false"
        setting = search_setting(state, filtered=filtered, configured=configured) if state.usable else 0
        metrics.index_setting.labels(label).set(setting)
        # Filtered searches fall back to the unfiltered curve when none was measured for them, as the engine does.
        curve = calibration.curve(filtered=filtered) if calibration is not None else None
        recall = curve.recall_at(setting) if curve is not None else None
        metrics.index_estimated_recall.labels(label).set(recall or 0)
        for source in ("searches", "memories"):
            queries = curve.queries if curve is not None and curve.source == source else 0
            metrics.index_calibration_queries.labels(label, source).set(queries)


def describe(calibration: Calibration) -> str:
    """``probes=4 (recall 0.962 on 100 memories), filtered probes=6 (recall 0.951 on 200 searches)``, or
    ef_search for HNSW."""
    name = "ef_search" if calibration.kind == "hnsw" else "probes"
    parts = []
    for label, curve in (("", calibration.unfiltered), ("filtered ", calibration.filtered)):
        if curve is not None:
            setting = curve.chosen(calibration.target)
            measured = f"recall {curve.recall_at(setting):.3f} on {curve.queries} {curve.source}"
            parts.append(f"{label}{name}={setting} ({measured})")
    return ", ".join(parts) + f" in {calibration.seconds:.1f}s"
