"""The ranking maths, on hand-made candidates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_service.models import Candidate, Fusion, SearchMode, SearchQuery, assemble
from memory_service.search.fusion import _fuse, rank_candidates

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def candidate(
    id: int,
    *,
    distance: float | None = None,
    text: float | None = None,
    importance: float = 0.5,
    age_days: float = 0,
    listed: tuple[bool, bool] | None = None,
) -> Candidate:
    """``listed``: whether it was among the vector and the text candidates; by default, wherever it has a score."""
    from_vector, from_text = listed if listed is not None else (distance is not None, bool(text))
    return Candidate(
        id=id,
        distance=distance,
        text_score=text,
        importance=importance,
        updated_at=NOW - timedelta(days=age_days),
        from_vector=from_vector,
        from_text=from_text,
    )


def ranked_ids(candidates: list[Candidate], **query: object) -> list[int]:
    return [s.candidate.id for s in rank_candidates(candidates, SearchQuery(**query), NOW)]  # type: ignore[arg-type]


def test_rrf_sums_reciprocal_ranks_over_both_lists() -> None:
    candidates = [
        candidate(1, distance=0.1),  # vector rank 1, no text
        candidate(2, distance=0.2, text=0.5),  # vector rank 2, text rank 1
        candidate(3, text=0.4),  # text rank 2
    ]
    scored = rank_candidates(
        candidates, SearchQuery(text="q", mode=SearchMode.HYBRID, fusion=Fusion.RRF, rrf_k=60), NOW
    )
    by_id = {s.candidate.id: s for s in scored}
    assert by_id[2].score == pytest.approx(1 / 62 + 1 / 61)
    assert by_id[1].score == pytest.approx(1 / 61)
    assert by_id[3].score == pytest.approx(1 / 62)
    assert [s.candidate.id for s in scored] == [2, 1, 3]
    assert (by_id[2].vector_rank, by_id[2].text_rank) == (2, 1)
    assert by_id[1].cosine_similarity == pytest.approx(0.9)


def test_rrf_counts_only_the_lists_a_candidate_was_found_in() -> None:
    # Hybrid candidates carry both exact scores, but rank fusion ranks the retrieved lists only.
    candidates = [
        candidate(1, distance=0.1, text=0.0, listed=(True, False)),
        candidate(2, distance=0.9, text=3.0, listed=(False, True)),
    ]
    scored = rank_candidates(candidates, SearchQuery(text="q", mode=SearchMode.HYBRID, fusion=Fusion.RRF), NOW)
    by_id = {s.candidate.id: s for s in scored}
    assert (by_id[1].vector_rank, by_id[1].text_rank) == (1, None)
    assert (by_id[2].vector_rank, by_id[2].text_rank) == (None, 1)
    assert by_id[1].score == pytest.approx(by_id[2].score) == pytest.approx(1 / 61)


def test_weighted_fusion_divides_each_part_by_its_best() -> None:
    candidates = [candidate(1, distance=0.2, text=2.0), candidate(2, distance=0.6, text=4.0)]
    scored = rank_candidates(
        candidates, SearchQuery(text="q", mode=SearchMode.HYBRID, fusion=Fusion.WEIGHTED, alpha=0.25), NOW
    )
    by_id = {s.candidate.id: s.score for s in scored}
    assert by_id[1] == pytest.approx(0.25 * 0.8 / 0.8 + 0.75 * 2.0 / 4.0)
    assert by_id[2] == pytest.approx(0.25 * 0.4 / 0.8 + 0.75 * 1.0)


def test_weighted_is_the_default_and_takes_the_services_alpha_unless_the_query_sets_one() -> None:
    candidates = [candidate(1, distance=0.5, text=1.0), candidate(2, distance=0.0, text=0.0)]
    query = SearchQuery(text="q", mode=SearchMode.HYBRID)
    by_id = {s.candidate.id: s.score for s in rank_candidates(candidates, query, NOW, alpha=0.2)}
    assert by_id[1] == pytest.approx(0.2 * 0.5 + 0.8 * 1.0)
    assert by_id[2] == pytest.approx(0.2 * 1.0 + 0.8 * 0.0)
    own = SearchQuery(text="q", mode=SearchMode.HYBRID, alpha=1.0)
    assert [s.candidate.id for s in rank_candidates(candidates, own, NOW, alpha=0.2)] == [2, 1]


def test_weighted_fusion_ignores_negative_cosine_and_survives_no_text_match() -> None:
    candidates = [candidate(1, distance=1.5, text=0.0), candidate(2, distance=0.4, text=0.0)]
    scored = rank_candidates(candidates, SearchQuery(text="q", mode=SearchMode.HYBRID, alpha=0.5), NOW)
    by_id = {s.candidate.id: s.score for s in scored}
    assert by_id == {1: 0.0, 2: pytest.approx(0.5)}


def test_boosts_multiply_and_min_score_filters_after_them() -> None:
    candidates = [
        candidate(1, distance=0.5, importance=0.0),
        candidate(2, distance=0.5, importance=1.0),
        candidate(3, distance=0.5, importance=0.0, age_days=0),
        candidate(4, distance=0.5, importance=0.0, age_days=30),
    ]
    scored = rank_candidates(
        candidates,
        SearchQuery(
            mode=SearchMode.VECTOR,
            importance_boost=1.0,
            recency_boost=1.0,
            recency_half_life_seconds=30 * 86400,
            min_score=0.8,
            top_k=10,
        ),
        NOW,
    )
    by_id = {s.candidate.id: s.score for s in scored}
    assert by_id[2] == pytest.approx(0.5 * 2.0 * 2.0)
    assert by_id[1] == pytest.approx(0.5 * 1.0 * 2.0)
    assert 4 not in by_id  # 0.5 * 1.5 = 0.75 < min_score


def test_top_k_and_ties_break_by_id() -> None:
    candidates = [candidate(i, distance=0.3) for i in (5, 3, 9, 1)]
    assert ranked_ids(candidates, mode=SearchMode.VECTOR, top_k=3) == [1, 3, 5]


def test_text_mode_scores_by_text_rank_value() -> None:
    candidates = [candidate(1, text=0.1), candidate(2, text=0.3)]
    assert ranked_ids(candidates, text="q", mode=SearchMode.TEXT) == [2, 1]


@settings(max_examples=200, deadline=None)
@given(
    distances=st.lists(st.sampled_from([0.0, 0.1, 0.1 + 1e-17, 0.25, 0.5, 1.0, 1.5, 2.0]), min_size=0, max_size=25),
    top_k=st.integers(1, 12),
    min_score=st.one_of(st.none(), st.sampled_from([-1.0, 0.0, 0.5, 0.9])),
)
def test_vector_ranking_shortcut_agrees_with_the_general_ranking(
    distances: list[float], top_k: int, min_score: float | None
) -> None:
    """VECTOR without boosts takes a shortcut (no fusion, scale or boost); it must rank, score and cut exactly as
    the general path does, ties in distance included."""
    found = [candidate(i, distance=d) for i, d in reversed(list(enumerate(distances, start=1)))]
    query = SearchQuery(mode=SearchMode.VECTOR, embedding=None, top_k=top_k, min_score=min_score)
    shortcut = rank_candidates(found, query, NOW)
    general = _fuse(found, query, NOW, alpha=0.5)
    assert shortcut == general


def test_assemble_equals_the_constructor_and_refuses_missing_or_unknown_fields() -> None:
    fields = {
        "id": 7,
        "distance": 0.25,
        "text_score": None,
        "importance": 0.5,
        "updated_at": NOW,
        "memory": None,
        "from_vector": True,
        "from_text": False,
        "text_every_term": False,
    }
    assert assemble(Candidate, fields) == Candidate(**fields)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Candidate needs exactly its fields"):
        assemble(Candidate, {k: v for k, v in fields.items() if k != "memory"})
    with pytest.raises(TypeError, match="Candidate needs exactly its fields"):
        assemble(Candidate, {**fields, "memroy": None})
