"""The operator's commands of a move: status, cut-over, rollback, finish. They act through PostgreSQL only, so
every instance sees their effect (at its next statement, which checks the generation it was planned for).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from memory_service.errors import FailedPrecondition
from memory_service.generations.types import Backfill, Gate, GenerationState, ModelSpec, MoveStatus, Phase
from memory_service.metrics import Metrics
from memory_service.search.index_care import IndexCare
from memory_service.search.index_policy import IndexState
from memory_service.storage import generations_sql
from memory_service.storage.database import Database


async def status(db: Database, next_index: IndexCare) -> MoveStatus:
    async with db.connection() as conn:
        state, backfill, gate, _ = await generations_sql.read_progress(conn)
    index = await next_index.refresh() if state.move is not None else IndexState()
    return MoveStatus(state=state, backfill=backfill, gate=gate, next_index=_describe(index, next_index))


def _describe(index: IndexState, care: IndexCare) -> str:
    if index.usable and index.calibration is not None:
        return f"{index.kind}, calibrated"
    if index.usable:
        return f"{index.kind}, not calibrated yet"
    if index.rows < care.exact_max_rows:
        return f"none needed: {index.rows} rows are searched exactly (EXACT_SEARCH_MAX_ROWS {care.exact_max_rows})"
    return "not built yet"


def blocking_cutover(move_status: MoveStatus, next_index: IndexCare, index: IndexState) -> str | None:
    """Why ``model cutover`` would be refused now; None when it may go ahead."""
    state = move_status.state
    if state.move is None:
        return "no move is under way: set EMBEDDING_NEXT_* on every instance to begin one"
    if state.move.phase is Phase.CUT_OVER:
        return f"already cut over to {state.move.target.describe()}"
    backfill = move_status.backfill
    if backfill is None or not backfill.complete:
        done = "" if backfill is None else f" ({backfill.done} of {backfill.total} memories)"
        return f"the backfill is not complete{done}: model status shows its progress"
    if index.rows >= next_index.exact_max_rows and not (index.usable and index.calibration is not None):
        return "the next generation's vector index is not built and calibrated yet (index maintenance does it)"
    return None


async def cutover(db: Database, next_index: IndexCare) -> GenerationState:
    """Switch searches and new embeddings of every instance to the next model."""
    current = await status(db, next_index)
    index = await next_index.refresh()
    problem = blocking_cutover(current, next_index, index)
    if problem is not None:
        raise FailedPrecondition(f"cannot cut over: {problem}")
    async with db.transaction() as conn:
        return await generations_sql.swap(conn, epoch=current.state.epoch, to=Phase.CUT_OVER)


async def rollback(db: Database) -> GenerationState:
    """Switch every instance back to the previous model, which the move kept up to date; before a cut-over, give
    the move up (drop the next generation's vectors)."""
    async with db.connection() as conn:
        state = await generations_sql.read_state(conn)
    if state.move is None:
        raise FailedPrecondition("cannot roll back: no move is under way (model status shows the state)")
    async with db.transaction() as conn:
        if state.move.phase is Phase.BACKFILLING:
            return await generations_sql.finish(conn, epoch=state.epoch, now=datetime.now(UTC), abandon=True)
        return await generations_sql.swap(conn, epoch=state.epoch, to=Phase.BACKFILLING)


async def finish(db: Database) -> GenerationState:
    """Drop the previous generation and its index; the next model is then simply the current one."""
    async with db.connection() as conn:
        state = await generations_sql.read_state(conn)
    if state.move is None or state.move.phase is not Phase.CUT_OVER:
        raise FailedPrecondition("cannot finish: cut over first (model cutover), then finish")
    async with db.transaction() as conn:
        return await generations_sql.finish(conn, epoch=state.epoch, now=datetime.now(UTC))


def _model(model: ModelSpec | None) -> dict[str, Any] | None:
    return None if model is None else model.to_json()


def _backfill(backfill: Backfill | None) -> dict[str, Any] | None:
    if backfill is None:
        return None
    eta = backfill.eta_seconds
    return {
        "done": backfill.done,
        "total": backfill.total,
        "percent": round(100.0 * backfill.done / backfill.total, 1) if backfill.total else 100.0,
        "rows_per_second": round(backfill.rate, 1),
        "eta_seconds": None if eta is None else round(eta, 1),
        "passes": backfill.passes,
        "complete": backfill.complete,
        "updated_at": None if backfill.updated_at is None else backfill.updated_at.isoformat(),
        "holder": backfill.holder,
    }


def _gate(gate: Gate | None) -> dict[str, Any] | None:
    return None if gate is None else gate.to_json()


def report(move_status: MoveStatus, *, blocking: str | None = None) -> dict[str, Any]:
    """``model status`` as JSON."""
    state = move_status.state
    move = state.move
    return {
        "phase": state.phase,
        "generation": state.epoch,
        "current": _model(state.current),
        "next": _model(move.target) if move is not None else None,
        "previous": _model(move.source) if move is not None and move.phase is Phase.CUT_OVER else None,
        "started_at": move.started_at.isoformat() if move is not None else None,
        "backfill": _backfill(move_status.backfill),
        "next_index": move_status.next_index if move is not None else None,
        "gate": _gate(move_status.gate),
        "cutover_blocked_by": blocking,
    }


def publish(metrics: Metrics, move_status: MoveStatus) -> None:
    """The status as gauges."""
    state = move_status.state
    metrics.model_move_phase.set({"steady": 0, "backfilling": 1, "cut_over": 2}[state.phase])
    backfill = move_status.backfill or Backfill()
    metrics.model_backfill_done.set(backfill.done)
    metrics.model_backfill_total.set(backfill.total)
    metrics.model_backfill_rate.set(backfill.rate)
    eta = backfill.eta_seconds
    metrics.model_backfill_eta.set(-1 if eta is None else eta)
    gate = move_status.gate
    for sample in ("searches", "memories"):
        figures = None if gate is None else getattr(gate, sample)
        metrics.model_gate_overlap.labels(sample).set(-1 if figures is None else figures.overlap_at_10)
        metrics.model_gate_top_changed.labels(sample).set(-1 if figures is None else figures.top_hit_changed)
