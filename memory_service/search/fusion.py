"""Scoring maths: weighted fusion, rank fusion and boosts. Pure functions over candidates.

Weighted fusion (the default) compares exact scores: every hybrid candidate carries both its cosine and its BM25
score, each divided by the best of its kind among the candidates. Rank fusion (RRF) only sees positions, which
gives a weak list as much say as a strong one; it stays available on request.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from datetime import datetime

from memory_service.models import Candidate, Fusion, SearchMode, SearchQuery, assemble


@dataclasses.dataclass(frozen=True)
class Scored:
    candidate: Candidate
    score: float
    cosine_similarity: float | None
    vector_rank: int | None
    text_rank: int | None


def rank_candidates(
    candidates: Sequence[Candidate], query: SearchQuery, now: datetime, *, alpha: float = 0.5
) -> list[Scored]:
    """Score, boost, filter by min_score, and keep the best ``top_k`` (ties by id) of one search's candidates.

    ``alpha`` is the vector weight of weighted fusion when the query does not set its own.
    """
    if (
        query.mode is SearchMode.VECTOR
        and not query.importance_boost
        and not query.recency_boost
        and all(c.from_vector and c.distance is not None for c in candidates)
    ):
        return _rank_by_cosine(candidates, query)
    return _fuse(candidates, query, now, alpha=alpha)


def _fuse(candidates: Sequence[Candidate], query: SearchQuery, now: datetime, *, alpha: float) -> list[Scored]:
    """``rank_candidates`` in general: every mode, fusion and boost."""
    vector_ranks = _ranks([c for c in candidates if c.from_vector], key=lambda c: c.distance, descending=False)
    text_ranks = _ranks([c for c in candidates if c.from_text], key=lambda c: c.text_score, descending=True)
    scale = _Scale.of(candidates)
    weight = alpha if query.alpha is None else query.alpha
    scored = []
    for candidate in candidates:
        cosine = None if candidate.distance is None else 1.0 - candidate.distance
        v_rank = vector_ranks.get(candidate.id)
        t_rank = text_ranks.get(candidate.id)
        score = _base_score(
            query,
            cosine=cosine,
            text_score=candidate.text_score,
            v_rank=v_rank,
            t_rank=t_rank,
            scale=scale,
            alpha=weight,
        )
        score *= _boost(query, candidate, now)
        if query.min_score is not None and score < query.min_score:
            continue
        scored.append(Scored(candidate, score, cosine, v_rank, t_rank))
    scored.sort(key=lambda s: (-s.score, s.candidate.id))
    return scored[: query.top_k]


def _rank_by_cosine(candidates: Sequence[Candidate], query: SearchQuery) -> list[Scored]:
    """``rank_candidates`` of a VECTOR search without boosts, the common call: the score is the cosine itself, so
    there is nothing to fuse, scale or boost, and each candidate's rank is its place in distance order."""
    by_distance = sorted(candidates, key=_distance_then_id)
    scored = []
    for rank, candidate in enumerate(by_distance, start=1):
        cosine = 1.0 - candidate.distance  # type: ignore[operator]  # every candidate has one (checked above)
        if query.min_score is not None and cosine < query.min_score:
            continue
        scored.append(
            assemble(
                Scored,
                {
                    "candidate": candidate,
                    "score": cosine,
                    "cosine_similarity": cosine,
                    "vector_rank": rank,
                    "text_rank": None,
                },
            )
        )
    scored.sort(key=lambda s: (-s.score, s.candidate.id))
    return scored[: query.top_k]


def _distance_then_id(candidate: Candidate) -> tuple[float, int]:
    return candidate.distance, candidate.id  # type: ignore[return-value]


def _base_score(
    query: SearchQuery,
    *,
    cosine: float | None,
    text_score: float | None,
    v_rank: int | None,
    t_rank: int | None,
    scale: _Scale,
    alpha: float,
) -> float:
    if query.mode is SearchMode.VECTOR:
        return cosine if cosine is not None else 0.0
    if query.mode is SearchMode.TEXT:
        return text_score if text_score is not None else 0.0
    if query.fusion is Fusion.WEIGHTED:
        # Each part is divided by its best value among the candidates, so both run from 0 to 1 whatever the model's
        # cosine range or the corpus's BM25 range. A candidate that shares no word with the query has BM25 0 and
        # must win on meaning alone; a negative cosine counts as no similarity.
        vector_part = max(cosine, 0.0) / scale.best_cosine if cosine is not None and scale.best_cosine > 0 else 0.0
        text_part = text_score / scale.best_text if text_score is not None and scale.best_text > 0 else 0.0
        return alpha * vector_part + (1.0 - alpha) * text_part
    return sum(1.0 / (query.rrf_k + rank) for rank in (v_rank, t_rank) if rank is not None)


@dataclasses.dataclass(frozen=True)
class _Scale:
    """The best score of each kind among one search's candidates: the normalisers of weighted fusion."""

    best_cosine: float
    best_text: float

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> _Scale:
        return cls(
            best_cosine=max((1.0 - c.distance for c in candidates if c.distance is not None), default=0.0),
            best_text=max((c.text_score for c in candidates if c.text_score is not None), default=0.0),
        )


def _boost(query: SearchQuery, candidate: Candidate, now: datetime) -> float:
    factor = 1.0
    if query.importance_boost:
        factor *= 1.0 + query.importance_boost * candidate.importance
    if query.recency_boost and query.recency_half_life_seconds:
        age = max((now - candidate.updated_at).total_seconds(), 0.0)
        factor *= 1.0 + query.recency_boost * math.pow(0.5, age / query.recency_half_life_seconds)
    return factor


def _ranks(
    candidates: Sequence[Candidate], *, key: Callable[[Candidate], float | None], descending: bool
) -> dict[int, int]:
    """1-based rank of each candidate that has a value for ``key``; ties broken by id for stable output."""
    scored = [(value, c.id) for c in candidates if (value := key(c)) is not None]
    scored.sort(key=lambda pair: ((-pair[0] if descending else pair[0]), pair[1]))
    return {memory_id: rank for rank, (_, memory_id) in enumerate(scored, start=1)}
