"""What each search tells the metrics, the slow-call log and its trace: plan, latency, shortfalls, recall samples.

Kept out of the engine so that planning reads as planning; the per-search cost is a few counter increments on
label children resolved once, here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from memory_service.metrics import SEARCH_MODES, SEARCH_PLANS, Metrics
from memory_service.models import Candidate, SearchQuery, SearchResult, Vector
from memory_service.observability.calls import current_call
from memory_service.search.recall_check import RecallCheck

_PLAN_LABELS = {"exact": "exact", "text": "text", "ivfflat": "index", "hnsw": "index"}


def plan_label(plan: str) -> str:
    """The bounded ``plan`` label of a result's plan (``ivfflat-iterative`` is ``iterative_index``)."""
    return "iterative_index" if plan.endswith("-iterative") else _PLAN_LABELS.get(plan, "exact")


@dataclasses.dataclass(slots=True)
class PlanNotes:
    """What the engine did beyond the plan in the result; filled in as it runs."""

    found: Sequence[Candidate] = ()
    """The candidates ranked (the last statement's)."""
    fallback: bool = False
    """The index came back short and an exact scan answered."""
    widened: bool = False
    """The rarest terms found too few and every term brought candidates in."""
    bounded: bool = False
    """The candidates were sought with the rarest terms only: TEXT_MAX_SCORED left the commoner ones out."""


class SearchObserver:
    def __init__(self, metrics: Metrics, recall: RecallCheck | None = None) -> None:
        self.recall = recall
        self._timed = {
            (mode, plan): (metrics.search_latency.labels(mode, plan).observe, metrics.searches.labels(mode, plan).inc)
            for mode in SEARCH_MODES
            for plan in SEARCH_PLANS
        }
        self._short = {mode: metrics.search_short.labels(mode).inc for mode in SEARCH_MODES}
        self._fallback = {mode: metrics.search_index_fallbacks.labels(mode).inc for mode in SEARCH_MODES}
        self._widened = {mode: metrics.search_text_widened.labels(mode).inc for mode in SEARCH_MODES}
        self._bounded = {mode: metrics.search_text_bounded.labels(mode).inc for mode in SEARCH_MODES}

    def observe(
        self, query: SearchQuery, vector: Vector | None, result: SearchResult, notes: PlanNotes, seconds: float
    ) -> None:
        mode = query.mode.value
        plan = plan_label(result.plan)
        observe, count = self._timed[(mode, plan)]
        observe(seconds)
        count()
        # Fewer hits than asked although the candidates held enough: rows lost between statements (or a bug).
        # An index that came back short never counts: the exact scan behind it answered with the true matches.
        if len(result.hits) < query.top_k and query.min_score is None and len(notes.found) >= query.top_k:
            self._short[mode]()
        if notes.fallback:
            self._fallback[mode]()
        if notes.widened:
            self._widened[mode]()
        if notes.bounded:
            self._bounded[mode]()
        if self.recall is not None and vector is not None and not result.exact and self.recall.wanted():
            nearest = sorted((c for c in notes.found if c.from_vector), key=_distance)
            self.recall.offer(vector, query.filter, [c.id for c in nearest])
        note = current_call.get()
        if note is not None:
            note.plan = {
                "mode": mode,
                "plan": result.plan,
                "exact": result.exact,
                "probes": result.probes,
                "candidates": len(notes.found),
                "top_k": query.top_k,
                "hits": len(result.hits),
                "filtered": not query.filter.is_empty,
            }


def _distance(candidate: Candidate) -> tuple[float, int]:
    return (candidate.distance if candidate.distance is not None else 2.0, candidate.id)
