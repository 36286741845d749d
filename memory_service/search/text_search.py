"""TEXT candidates from the in-memory index, kept current from the change log and checked against PostgreSQL.

* **Load**: the index is built from one repeatable-read snapshot of the stored ``search_tsv``, taken once every
  change up to a frontier is final (``changes_sql.frontier_probe``, as the Watch feed does), so it holds every change
  up to that seq; later ones are applied on top (applying a change re-reads the memory's row, so applying one twice
  is harmless).
* **Follow**: every search reads the change log after the frontier in the same round trip as its query terms and
  applies what it has not applied yet before it ranks, so a search sees every write committed before it began
  (read-your-writes, across instances and processes). A background loop applies changes as they come and advances
  the frontier once the seqs below it are final.
* **Answer**: BM25's exact top-k over the statistics snapshot (``memory.text_terms`` / ``memory.text_corpus``, the
  same numbers the SQL path and every instance use). Filters: the index knows expiry only. A filter an index narrows
  (``search_sql.count_is_bounded``) lists its matching ids (up to a cap) and the index scores exactly those; any
  other filter is checked by PostgreSQL on the index's best candidates, read deeper until enough pass. The rows
  returned are read from PostgreSQL with the filter and expiry applied again, so a memory deleted a moment ago is
  never returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import math
import time
from pathlib import Path

from memory_service.models import Candidate, MemoryFilter, ScopeRef
from memory_service.search import load_turns
from memory_service.search.text_blocks import Scoring
from memory_service.search.text_index import TextIndex
from memory_service.search.tuning import TextRanking
from memory_service.storage import changes_sql, search_sql, text_index_sql
from memory_service.storage.database import Connection, Database

log = logging.getLogger(__name__)

FILTER_IDS_CAP = 50_000
"""Most ids a filtered search lists to score exactly; a broader filter is checked on the index's best instead."""
LOAD_AT_START_ROWS = 200_000
"""Up to about this many memories the index loads before the server serves (a few seconds); a larger table loads in
the background while TEXT searches use the SQL statement."""
REBUILD_DEAD_FRACTION = 0.5
"""Dead versions (as a share of live memories) that make the index reload from PostgreSQL."""
_FINAL_WAIT = 0.02
POSTING_BYTES = 9
"""Memory per posting once loaded (its document and frequency, 6 bytes, the vocabulary, and the range bounds of
``text_blocks``, about 0.8 byte: 459 MB for 59.6 million postings of 1M SciFact memories), with some margin."""
DOC_BYTES = 80
"""Memory per memory (id, length, expiry, liveness, slot, scope and scratch arrays)."""
LOAD_TURN_WAIT_AT_START = 30.0
"""Seconds a load before serving waits for another process's load on the machine; then the process serves, and
its index loads in the background once its turn comes."""
REFUSED_RECHECK = 60.0
"""Seconds before a corpus found too large for ``max_bytes`` is estimated again."""
_RERANKS = 3
"""Rankings a TEXT search runs at most when memories it ranked are gone by the time their rows are read."""


def _release_free_memory() -> None:
    """Hand the load's freed temporaries back to the system: glibc keeps them in its arenas otherwise, and a 100k
    load left 340 MB of RSS for a 47 MB index (89 MB after this). Elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def scopes_only(memory_filter: MemoryFilter) -> tuple[ScopeRef, ...] | None:
    """The scopes of a filter that names nothing else (None for any other filter)."""
    if memory_filter.scopes and dataclasses.replace(memory_filter, scopes=()).is_empty:
        return memory_filter.scopes
    return None


def estimated_bytes(docs: int, total_length: int) -> int:
    """What the index of a corpus will hold: ``total_length`` (the sum of the memories' distinct lexemes) is its
    postings."""
    return POSTING_BYTES * total_length + DOC_BYTES * docs


class TextSearch:
    def __init__(
        self, db: Database, ranking: TextRanking, *, max_mb: int = 2048, load_lock: Path = load_turns.LOCK_PATH
    ) -> None:
        self._db = db
        self._load_lock = load_lock
        """Held while loading: one load at a time on the machine (``search.load_turns``)."""
        self._ranking = ranking
        self.max_bytes = max_mb << 20
        """Most memory the index may hold; a corpus estimated larger is ranked by the SQL statement."""
        self._refused_at: float | None = None
        self.index: TextIndex | None = None
        self.frontier = 0
        """Every change with seq <= frontier is in the index."""
        self._applied: set[int] = set()
        """Seqs after the frontier already applied."""
        self._lock = asyncio.Lock()
        self._candidate: changes_sql.Settling | None = None
        self._avgdl = 1.0
        self._building = False

    @property
    def ready(self) -> bool:
        return self.index is not None

    async def _final_frontier(self) -> int:
        """A seq every change up to which is committed or never will be (waits for older transactions)."""
        async with self._db.connection() as conn:
            first = await changes_sql.frontier_probe(conn)
            candidate = changes_sql.Settling.of(first)
            probe = first
            while not candidate.final(probe):
                await asyncio.sleep(_FINAL_WAIT)
                probe = await changes_sql.frontier_probe(conn)
        return candidate.high

    async def load_if_small(self) -> None:
        async with self._db.connection() as conn:
            rows = await text_index_sql.estimated_rows(conn)
        if rows <= LOAD_AT_START_ROWS:
            await self.build(wait=LOAD_TURN_WAIT_AT_START)

    async def build(self, *, wait: float | None = None) -> None:
        """(Re)load the index from PostgreSQL; searches use the previous one (or the SQL path) meanwhile. ``wait``:
        seconds to wait for the machine's turn to load (``search.load_turns``; None: as long as it takes); without
        it the load is left to a later call."""
        if self._building:
            return
        self._building = True
        try:
            started = time.perf_counter()
            async with self._db.connection() as conn:
                docs, total_length = await text_index_sql.corpus(conn)
            if estimated_bytes(docs, total_length) > self.max_bytes:
                if self._refused_at is None or self.index is not None:
                    log.warning(
                        "text index not loaded: %d memories with %d postings would take about %d MB, more than "
                        "TEXT_INDEX_MAX_MB (%d); TEXT searches use the SQL statement",
                        docs,
                        total_length,
                        estimated_bytes(docs, total_length) >> 20,
                        self.max_bytes >> 20,
                    )
                self.index, self._refused_at = None, time.monotonic()
                return
            self._refused_at = None
            # Before the turn: this waits for older transactions, which must not hold up other processes' loads. An
            # earlier frontier is as good (the snapshot holds every change up to it; later ones apply again).
            frontier = await self._final_frontier()
            async with load_turns.load_turn(self._load_lock, wait=wait) as turn:
                if not turn:
                    return
                index = TextIndex(self._ranking.k1, self._ranking.b)
                async with self._db.connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                    # Each chunk is made compact as it arrives (off the event loop), so a load holds little more
                    # than the index it builds.
                    async for part in text_index_sql.load(conn):
                        await load_turns.in_thread(index.add_loaded, part)
                    docs, total_length = await text_index_sql.corpus(conn)
                avgdl = total_length / docs if docs and total_length else 1.0
                await load_turns.in_thread(index.finish_load, avgdl)
                async with self._lock:
                    self.index, self.frontier, self._applied, self._avgdl = index, frontier, set(), avgdl
                _release_free_memory()
            log.info(
                "text index loaded: %d memories, %d postings, %d MB in %.1fs",
                index.live,
                index.postings,
                index.nbytes >> 20,
                time.perf_counter() - started,
            )
        finally:
            self._building = False

    async def _catch_up(self, conn: Connection, pending: list[tuple[int, int]]) -> None:
        """Apply the changes in ``pending`` (and any later pages) not applied yet. Holds the lock."""
        index = self.index
        assert index is not None
        while True:
            fresh = [(seq, memory_id) for seq, memory_id in pending if seq not in self._applied]
            if fresh:
                ids = sorted({memory_id for _, memory_id in fresh})
                docs = await text_index_sql.docs(conn, ids)
                index.apply(ids, docs, self._avgdl)
                self._applied.update(seq for seq, _ in fresh)
            if len(pending) < text_index_sql.PENDING_PAGE:
                return
            pending = await text_index_sql.changes_between(conn, pending[-1][0], 2**63 - 1)

    async def follow(self) -> None:
        """Background step: load the index if it is not yet (or a load failed); apply new changes, advance the
        frontier over final seqs, reload when crowded or mostly dead."""
        index = self.index
        if index is None:
            if self._refused_at is None or time.monotonic() - self._refused_at > REFUSED_RECHECK:
                await self.build(wait=0)  # not the machine's turn: the next step tries again
            return
        async with self._db.connection() as conn:
            high = await changes_sql.high_seq(conn)
            if self._candidate is None and high <= self.frontier:
                # Idle: no seq drawn past the frontier. One read instead of the probe's three statements, its xid
                # and the change log query, several times a second in every server process.
                return
            probe = await changes_sql.frontier_probe(conn, high)
            if self._candidate is None and probe.high > self.frontier:
                self._candidate = changes_sql.Settling.of(probe)
            candidate = self._candidate
            final = candidate is not None and candidate.final(probe)
            pending = await text_index_sql.changes_between(conn, self.frontier, 2**63 - 1)
            async with self._lock:
                if self.index is index:
                    await self._catch_up(conn, pending)
                    if final and candidate is not None:
                        # Every change up to candidate.high is committed and was visible to the read above.
                        self.frontier = max(self.frontier, candidate.high)
                        self._applied = {seq for seq in self._applied if seq > self.frontier}
        if final:
            self._candidate = None
        if (
            index.crowded
            or index.dead > REBUILD_DEAD_FRACTION * max(index.live, 10_000)
            or index.nbytes > self.max_bytes
        ):
            await self.build(wait=0)

    def _scoring(self, terms: text_index_sql.QueryTerms) -> Scoring:
        docs = terms.docs
        idf = tuple(math.log(1 + (max(docs, df) - df + 0.5) / (df + 0.5)) for df in terms.dfs)
        avgdl = terms.total_length / docs if docs and terms.total_length else 1.0
        self._avgdl = avgdl
        return Scoring(tuple(terms.lexemes), idf, avgdl, self._ranking.k1, self._ranking.b)

    async def ranked(
        self, conn: Connection, text: str, memory_filter: MemoryFilter, *, limit: int
    ) -> tuple[list[tuple[int, float]], Scoring | None] | None:
        """The best ``limit`` memories passing the filter by exact BM25 (as the index knows them), best first, and
        the scoring used (None when the query has no lexeme); None when there is no index (the SQL statement's
        turn): not loaded yet, or dropped for its size meanwhile."""
        if self.index is None:
            return None
        # A filter of scopes alone is the index's own to apply (it knows each memory's scope); another filter an
        # index narrows lists its matches in the same round trip, and the index scores exactly those.
        scopes = scopes_only(memory_filter)
        bounded = scopes is None and not memory_filter.is_empty and search_sql.count_is_bounded(memory_filter)
        terms = await text_index_sql.query_terms(
            conn, text, after=self.frontier, memory_filter=memory_filter if bounded else None, cap=FILTER_IDS_CAP
        )
        async with self._lock:
            index = self.index
            if index is None:
                return None
            if terms.pending:
                await self._catch_up(conn, terms.pending)
        if not terms.lexemes:
            return [], None
        scoring = self._scoring(terms)
        now = time.time()
        if memory_filter.is_empty:
            return index.top(scoring, limit, now), scoring
        if scopes is not None:
            slots = index.scope_slots(scopes, now, unique_below=FILTER_IDS_CAP)
            if len(slots) < FILTER_IDS_CAP:
                return index.score_slots(slots, scoring, limit), scoring
            return index.top(scoring, limit, now, within=slots), scoring
        ids = terms.filter_ids
        if ids is not None and len(ids) < FILTER_IDS_CAP:
            return index.score_ids(ids, scoring, now, k=limit), scoring
        depth = 4 * limit
        while True:
            best = index.top(scoring, depth, now)
            passing = await text_index_sql.passing_ids(conn, memory_filter, [i for i, _ in best])
            if len(passing) >= limit or len(best) < depth:
                return [(i, s) for i, s in best if i in passing][:limit], scoring
            depth *= 4

    def scores(self, ids: list[int], scoring: Scoring | None) -> dict[int, float]:
        """Exact BM25 of the given memories (0 for one holding no query lexeme)."""
        if scoring is None or self.index is None:
            return dict.fromkeys(ids, 0.0)
        found = dict(self.index.score_ids(ids, scoring, time.time()))
        return {i: found.get(i, 0.0) for i in ids}

    async def candidates(
        self, conn: Connection, text: str, memory_filter: MemoryFilter, *, limit: int, with_embedding: bool
    ) -> list[Candidate] | None:
        """The best ``limit`` live memories passing the filter by exact BM25, with their rows, best first (None:
        no index)."""
        found: list[Candidate] = []
        for _ in range(_RERANKS):
            ranked = await self.ranked(conn, text, memory_filter, limit=limit)
            if ranked is None:
                return None
            best = ranked[0]
            if not best:
                return []
            found = await text_index_sql.rows(conn, memory_filter, dict(best), with_embedding=with_embedding)
            if len(found) == len(best):
                break
            # A memory changed between the ranking and its row: the next ranking applies that change first.
        return found
