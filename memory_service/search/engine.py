"""Plans and runs a search so that it is complete: ``top_k`` hits whenever ``top_k`` memories match.

The vector index (ivfflat or HNSW) applies filters after its scan, so a filtered approximate query can come back
short. The plan:

* exact scan when the table is small (no index worth using), when the caller asks, or when the filter is narrow
  (a bounded count through the btree indexes finds fewer matches than the index scan would visit: scanning them
  all is as cheap, and exact);
* otherwise the index, at the probes (ef_search) its calibration found to reach the target recall, with iterative
  scans where pgvector has them (0.8+), which keep scanning until enough rows pass the filter;
* and whenever the approximate plan returns fewer than ``top_k`` vector candidates, the exact scan, so a short
  answer is only ever the true number of matches.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime

from memory_service.config.settings import Settings
from memory_service.embeddings.service import EmbeddingService
from memory_service.errors import GenerationChanged
from memory_service.generations.state import Generations
from memory_service.metrics import Metrics
from memory_service.models import (
    Candidate,
    IndexKind,
    SearchHit,
    SearchMode,
    SearchQuery,
    SearchResult,
    Vector,
    assemble,
)
from memory_service.observability import tracing
from memory_service.search.fusion import rank_candidates
from memory_service.search.index_care import IndexCare
from memory_service.search.index_policy import IndexState, search_setting
from memory_service.search.observe import PlanNotes, SearchObserver
from memory_service.search.query_sample import QuerySample
from memory_service.search.text_search import TextSearch
from memory_service.search.tuning import DEFAULT_TEXT_RANKING, TextRanking, scan_settings
from memory_service.storage import search_sql, text_index_sql
from memory_service.storage.database import Connection, Database
from memory_service.tenants import guard

# Hybrid and text searches fetch this many candidates per list (at least) so fusion has something to reorder.
_MIN_CANDIDATES = 40
_CANDIDATE_FACTOR = 3
# Most matching rows a filtered search scans exactly instead of using the index (the count deciding it reads up to
# this many index entries).
_EXACT_FILTER_MAX_ROWS = 20_000
# Runs of one search when the embedding generation changes under it: a cut-over and a rollback in quick succession.
_GENERATION_ATTEMPTS = 3


class SearchEngine:
    def __init__(
        self,
        db: Database,
        embedder: EmbeddingService,
        index: IndexCare,
        metrics: Metrics,
        *,
        iterative_scan: bool,
        default_probes: int | None,
        narrow_filter_rows: int = Settings.search_narrow_filter_rows,
        text_ranking: TextRanking = DEFAULT_TEXT_RANKING,
        hybrid_alpha: float = 0.5,
        seen: QuerySample | None = None,
        observer: SearchObserver | None = None,
        text_search: TextSearch | None = None,
        generations: Generations | None = None,
    ) -> None:
        self._db = db
        self._observer = observer or SearchObserver(metrics)
        self._generations = generations
        """The embedding generation searches run in; a search planned for one that has just been replaced runs
        again in the new one, so its hits never mix two models."""
        self._embedder = embedder
        self._index = index
        self._metrics = metrics
        self.iterative_scan = iterative_scan
        self._default_probes = default_probes
        self._narrow_filter_rows = narrow_filter_rows
        self._text_ranking = text_ranking
        self.hybrid_alpha = hybrid_alpha
        """Weight of the vector score in weighted fusion when the request does not set ``alpha``."""
        self.seen = seen
        """Vectors of recent searches that went to the index, for its calibration (this instance's own)."""
        self.text_search = text_search
        """The in-memory text index; TEXT and HYBRID use the SQL statement until it has loaded."""

    def seen_reset(self) -> None:
        if self.seen is not None:
            self.seen.clear()

    async def search(self, query: SearchQuery) -> SearchResult:
        started = time.perf_counter()
        narrowed = guard.narrow(query.filter)
        if narrowed is not query.filter:
            query = dataclasses.replace(query, filter=narrowed)
        text = query.text if query.mode in (SearchMode.TEXT, SearchMode.HYBRID) else None
        limit = query.top_k
        if query.mode is not SearchMode.VECTOR:
            limit = max(query.top_k * _CANDIDATE_FACTOR, _MIN_CANDIDATES)
        notes = PlanNotes()
        generations = self._generations
        for attempt in range(_GENERATION_ATTEMPTS):
            # The generation is taken before the query is embedded: the statement then checks that the model that
            # embedded it is still the database's current one.
            generation = 0 if generations is None else generations.epoch
            if generations is not None and query.mode is not SearchMode.TEXT:
                generations.check_current()
            try:
                vector = await self._query_vector(query)
                by_index = None
                if vector is None and text is not None and self.text_search is not None and self.text_search.ready:
                    # Without boosts a TEXT hit's score is its BM25 score: the exact top_k is the answer, nothing
                    # to rerank. None: the index was dropped meanwhile.
                    boosted = query.importance_boost != 0 or query.recency_boost != 0
                    by_index = await self._run_text(query, text, limit if boosted else query.top_k)
                if by_index is not None:
                    result = by_index
                else:
                    result = await self._run(query, vector, text, limit, notes=notes, generation=generation)
                break
            except GenerationChanged:
                if generations is None or attempt == _GENERATION_ATTEMPTS - 1:
                    raise
                await generations.refresh()
        if generations is not None and query.text and query.mode is not SearchMode.TEXT:
            generations.searches.record(query.text, query.filter)
        self._observer.observe(query, vector, result, notes, time.perf_counter() - started)
        return result

    async def _query_vector(self, query: SearchQuery) -> Vector | None:
        if query.mode is SearchMode.TEXT:
            return None
        if query.embedding is not None:
            return query.embedding
        return await self._embedder.embed_query(query.text)

    def _setting(self, query: SearchQuery, state: IndexState) -> tuple[int, float | None]:
        """Probes (ef_search for HNSW) for an index scan, and the recall the calibration measured at it.

        The request's own setting wins, then the operator's, then the index's calibration for this kind of
        search (filtered or not), then a rule of thumb until the first calibration."""
        filtered = not query.filter.is_empty
        setting = query.probes or search_setting(state, filtered=filtered, configured=self._default_probes)
        if state.kind != "hnsw":
            setting = min(setting, state.lists)
        calibration = state.calibration
        recall = None if calibration is None else calibration.curve(filtered=filtered).recall_at(setting)
        return setting, recall

    def _exact_filter_rows(self, state: IndexState, probes: int) -> int:
        """A filter matching fewer memories than this is searched exactly: scanning them costs no more than the
        index scan would.

        A filtered ivfflat scan reads every row of the lists it probes (``probes * rows / lists``) and checks the
        filter on each one's heap tuple; an exact scan reads the matching rows once. So a scope of 10,000 memories
        is scanned exactly in a table of a million (the index would visit about as many rows, most of them from
        other scopes), and its search costs the same whatever else the table holds. HNSW visits few rows per
        query, so only ``SEARCH_NARROW_FILTER_ROWS`` applies to it. The bound is capped so the count that decides
        stays cheap.
        """
        if state.kind == "ivfflat" and state.lists > 0:
            visited = probes * state.rows // state.lists
            return max(self._narrow_filter_rows, min(visited, _EXACT_FILTER_MAX_ROWS))
        return self._narrow_filter_rows

    async def _run_text(self, query: SearchQuery, text: str, limit: int) -> SearchResult | None:
        """TEXT through the in-memory index: exact BM25 top-k, rows read (and checked) from PostgreSQL; None when
        the index is gone."""
        assert self.text_search is not None
        async with self._db.connection() as conn:
            found = await self.text_search.candidates(
                conn, text, query.filter, limit=limit, with_embedding=query.include_embedding
            )
        if found is None:
            return None
        ranked = rank_candidates(found, query, datetime.now(UTC), alpha=self.hybrid_alpha)
        hits = [
            SearchHit(
                memory=s.candidate.memory, score=s.score, text_score=s.candidate.text_score, text_rank=s.text_rank
            )
            for s in ranked
            if s.candidate.memory is not None
        ]
        return SearchResult(hits=hits, mode=query.mode, exact=True, plan="text")

    async def _run(
        self,
        query: SearchQuery,
        vector: Vector | None,
        text: str | None,
        limit: int,
        *,
        notes: PlanNotes,
        generation: int,
    ) -> SearchResult:
        """One search in embedding generation ``generation``: every statement that compares or returns vectors
        fails (GenerationChanged) when it is no longer the database's."""
        plan = self._plan(query, vector)
        # No transaction: every statement below reads on its own (READ COMMITTED gave each its own snapshot
        # anyway), so a search is one round trip per statement. A memory deleted between the candidates and
        # memories_by_id is dropped from the hits, as before. Only an index scan depends on scan settings; the
        # exact and text scans run with whatever the connection has.
        session = (
            self._db.settings_connection(
                scan_settings(
                    plan.kind,
                    plan.probes,
                    iterative=self.iterative_scan,
                    limit=limit,
                    filtered=not query.filter.is_empty,
                )
            )
            if plan.approximate_possible
            else self._db.connection()
        )
        async with session as conn:
            use_index = plan.approximate_possible and not await self._exact_is_cheaper(conn, query, plan)
            found, use_index = await self._candidates(
                conn,
                query,
                vector,
                text,
                limit,
                use_index=use_index,
                notes=notes,
                generation=generation,
                watermark=plan.state.watermark,
            )
            hits = await self._hits(conn, query, found, generation)
        if vector is None:
            return SearchResult(hits=hits, mode=query.mode, exact=True, plan="text")
        if use_index:
            return SearchResult(
                hits=hits,
                mode=query.mode,
                exact=False,
                plan=f"{plan.kind}-iterative" if self.iterative_scan else plan.kind,
                probes=plan.probes,
                estimated_recall=plan.recall,
            )
        return SearchResult(hits=hits, mode=query.mode, exact=True, plan="exact", estimated_recall=1.0)

    def _plan(self, query: SearchQuery, vector: Vector | None) -> _Plan:
        """Whether the vector index may serve this search at all, and at which setting."""
        state = self._index.state
        possible = vector is not None and not query.exact and state.usable and state.rows >= self._index.exact_max_rows
        probes, recall = self._setting(query, state) if possible else (0, None)
        return _Plan(
            state=state, kind=state.kind or "ivfflat", approximate_possible=possible, probes=probes, recall=recall
        )

    async def _exact_is_cheaper(self, conn: Connection, query: SearchQuery, plan: _Plan) -> bool:
        """Whether the filter is narrow enough that scanning its matches exactly costs no more than the index.

        A filter no index narrows goes to the vector index (iterative scans keep it complete): counting its matches
        would read the table. Text needs no count: its candidates come from the GIN index either way."""
        if not search_sql.count_is_bounded(query.filter):
            return False
        exact_below = self._exact_filter_rows(plan.state, plan.probes)
        return await search_sql.count_matching(conn, query.filter, cap=exact_below) < exact_below

    async def _candidates(
        self,
        conn: Connection,
        query: SearchQuery,
        vector: Vector | None,
        text: str | None,
        limit: int,
        *,
        use_index: bool,
        notes: PlanNotes,
        generation: int,
        watermark: int | None = None,
    ) -> tuple[list[Candidate], bool]:
        """The candidates, widened until complete, and whether the index served them in the end. ``watermark``: a
        partial HNSW index's (``storage.search_sql``), whose tail an index search scans exactly."""

        # HYBRID with the text index: its exact BM25 top `limit`, then one statement for the vector candidates and
        # the text candidates' distances; BM25 of the vector-only candidates from the index too.
        text_search = self.text_search if vector is not None and text is not None else None
        text_best: list[tuple[int, float]] = []
        scoring = None
        ranked = None
        if text_search is not None and text is not None:
            ranked = await text_search.ranked(conn, text, query.filter, limit=limit)
        if ranked is None:
            text_search = None
        else:
            text_best, scoring = ranked

        async def fetch(*, exact: bool, pruned: bool) -> list[Candidate]:
            if text_search is not None and vector is not None:
                found = await text_index_sql.hybrid_candidates(
                    conn,
                    query.filter,
                    vector=vector,
                    limit=limit,
                    exact=exact,
                    text_ids=[i for i, _ in text_best],
                    generation=generation,
                    watermark=watermark,
                )
                scores = dict(text_best)
                scores.update(text_search.scores([c.id for c in found if c.id not in scores], scoring))
                return [dataclasses.replace(c, text_score=scores[c.id]) for c in found]
            return await search_sql.candidates(
                conn,
                query.filter,
                vector=vector,
                text=text,
                limit=limit,
                exact=exact,
                # VECTOR asks for exactly top_k candidates, so they come with their memories in the same query;
                # the other modes rank more candidates than they return and fetch the winners' memories afterwards.
                full_rows=query.mode is SearchMode.VECTOR,
                text_ranking=self._text_ranking.values,
                pruned=pruned,
                with_embedding=query.include_embedding,
                generation=generation,
                rls=guard.scoped(),
                watermark=watermark,
            )

        if use_index and vector is not None and self.seen is not None:
            self.seen.record(vector, query.filter)  # what the index's next calibration measures on
        # Text candidates come first from the query's rarest terms, filtered or not (in a narrow filter as the
        # floor does: one statement); when they are fewer than top_k, every term brings some in (below).
        found = await fetch(exact=not use_index, pruned=True)
        vector_short = use_index and sum(c.from_vector for c in found) < limit
        # Fewer text candidates than fusion would like is fine; fewer than the caller asked for is not...
        # unless every query term already brought its candidates in: widening would find the same ones.
        text_short = (
            text is not None
            and sum(c.from_text for c in found) < query.top_k
            and not (found and found[0].text_every_term)
        )
        if vector_short or text_short:
            # The index came back short: only an exact scan can tell "few matches" from "missed matches".
            # Too few memories held the query's rarest terms: let its common terms bring in candidates too.
            use_index = use_index and not vector_short
            found = await fetch(exact=not use_index, pruned=not text_short)
        notes.found, notes.fallback, notes.widened = found, vector_short, text_short
        notes.bounded = text is not None and bool(found) and not found[0].text_every_term
        return found, use_index

    async def _hits(
        self, conn: Connection, query: SearchQuery, found: list[Candidate], generation: int
    ) -> list[SearchHit]:
        """Rank the candidates and attach the winners' memories (fetched unless they came along)."""
        with tracing.span("fusion", candidates=len(found)):
            ranked = rank_candidates(found, query, datetime.now(UTC), alpha=self.hybrid_alpha)
        memories = (
            {}
            if query.mode is SearchMode.VECTOR
            else await search_sql.memories_by_id(
                conn, [s.candidate.id for s in ranked], with_embedding=query.include_embedding, generation=generation
            )
        )
        return [
            assemble(
                SearchHit,
                {
                    "memory": s.candidate.memory or memories[s.candidate.id],
                    "score": s.score,
                    "cosine_similarity": s.cosine_similarity,
                    "text_score": s.candidate.text_score,
                    "vector_rank": s.vector_rank,
                    "text_rank": s.text_rank,
                },
            )
            for s in ranked
            if s.candidate.memory is not None or s.candidate.id in memories
        ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan:
    state: IndexState
    kind: IndexKind
    approximate_possible: bool
    probes: int
    """ivfflat probes or HNSW ef_search for an index scan; 0 when no index scan is possible."""
    recall: float | None
    """What the calibration measured at ``probes``."""
