"""Immutable postings of some memories, and exact BM25 top-k over them without scoring every match.

A segment numbers its documents locally (0..n-1) and keeps, per lexeme, the documents holding it in ascending order
with their term frequencies; a large segment also keeps bounds of each lexeme's part of BM25, over the segment and
per range of 16 documents (``text_blocks``), and runs block-max MaxScore over them: a first threshold from the rarest
terms' documents, terms read (largest bound first) only while a document holding none of them yet could reach the
threshold and only in the ranges whose bound reaches it, and the documents met looking the other terms up until
their bound in their range falls below it (docs/search.md). Every document that can be in the top k is scored
exactly. Small segments are scored exhaustively: cheaper than the bookkeeping.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from memory_service.search.text_blocks import EPSILON, NormCache, Scoring, Term, gather, term_bounds

PRUNE_MIN_DOCS = 20_000
"""Segments with fewer documents are scored exhaustively."""
LEXEME_BYTES = 200
"""Python's cost of one vocabulary entry (the string, twice referenced, and its dict slot), measured roughly."""
_BOUND_SLICE = 1 << 20
"""Postings per slice when the bounds are computed."""
_DENSE_LOOKUP = 8
"""At most this many postings per document looked up: spread into a dense array; more: binary search."""
MASK_MIN_DOCS = 256
"""From this many documents on, ``score_local`` checks postings against a mask of them (``_score_by_mask``)."""
_MASK_SCAN = 32
"""... unless a term has more than this many postings per document scored: then it is searched."""
_GATHER_SHARE = 0.5
"""Below this share of all ranges still able to win, a term is read only there; above it, whole (cheaper)."""
SEED_MIN_DOCS = 250_000
"""Smaller segments take their first threshold from the first term read (a seed would cost more than it saves)."""
SEED_SHARE = 512
"""A large segment's seed: the k-th best exact score among its rarest terms' documents, up to 1/SEED_SHARE of them."""

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]


class Segment:
    """Postings of ``len(slots)`` documents; ``slots[i]`` is document i's place in the index's per-document arrays."""

    def __init__(
        self,
        *,
        slots: Ints,
        lengths: Floats,
        lexemes: list[str],
        term: npt.NDArray[np.int32] | None = None,
        docs: npt.NDArray[np.int32],
        tfs: npt.NDArray[np.uint16],
        avgdl: float,
        k1: float = 1.2,
        b: float = 0.75,
        offsets: Ints | None = None,
    ) -> None:
        """Postings as ``docs[i]`` (local number) holds ``lexemes[term[i]]`` ``tfs[i]`` times, in any order; or,
        without ``term``, already grouped by term: term t's postings at ``offsets[t]:offsets[t + 1]``."""
        self.slots = slots
        self.lengths = lengths
        self.k1, self.b = k1, b
        self._slot_order: Ints | None = (
            None if len(slots) < 2 or bool(np.all(slots[1:] > slots[:-1])) else np.argsort(slots)
        )
        self.terms = {lexeme: i for i, lexeme in enumerate(lexemes)}
        self.lexemes = lexemes
        if term is not None:
            counts = np.bincount(term, minlength=len(lexemes))
            offsets = np.zeros(len(lexemes) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            # Postings usually arrive in document order within each term (the documents of a batch or a merge
            # ascend): a stable sort by term keeps it, and needs no 8-byte key per posting.
            order = np.argsort(term, kind="stable")
            docs, tfs = docs[order], tfs[order]
            del order
        assert offsets is not None
        self.offsets = offsets
        if len(docs) > 1:
            step = np.diff(docs)
            step[offsets[1:-1][(offsets[1:-1] > 0) & (offsets[1:-1] < len(docs))] - 1] = 1  # a new term may restart
            unordered = bool((step <= 0).any())
            del step
            if unordered:
                term_of = np.repeat(np.arange(len(lexemes), dtype=np.int32), np.diff(offsets))
                order = np.lexsort((docs, term_of))
                docs, tfs = docs[order], tfs[order]
                del order, term_of
        self.docs = docs
        self.tfs = tfs
        self._identity_slots = bool(
            len(slots) == 0 or (self._slot_order is None and slots[0] == 0 and slots[-1] == len(slots) - 1)
        )
        """Document i is slot i (the loaded segment): no indirection needed."""
        self.last_read = (0, 0, 0)
        """Of the last pruned search: terms read whole, their postings, query terms here (for benchmarks)."""
        # Scratch space of one search at a time (searches run on the event loop): the accumulator and the mask of
        # the documents a search scores by mask (both cleared after each), and stamps for finding the documents a
        # search met (never cleared).
        self._acc: Floats | None = None
        self._wanted: npt.NDArray[np.bool_] | None = None
        self._stamp: npt.NDArray[np.int32] | None = None
        self._norms = NormCache(lengths)
        self.pruned = len(slots) >= PRUNE_MIN_DOCS
        if self.pruned:
            self._build_bounds(avgdl)

    def _build_bounds(self, avgdl: float) -> None:
        """Per term: the largest term-frequency part of BM25 among its postings at the average length the segment
        was built with (``_bound`` scales it to another average), and the largest frequency and smallest length (a
        looser bound for other k1 and b); per long term and range of documents, the largest part in the range."""
        self.avgdl = avgdl
        self.max_part, self.max_tf, self.min_length, self.ranges = term_bounds(
            self.offsets, self.docs, self.tfs, self.lengths, avgdl=avgdl, k1=self.k1, b=self.b, slice_size=_BOUND_SLICE
        )
        self._range_mask = np.zeros(self.ranges.ranges, dtype=np.bool_)

    def locate(self, slots: Ints) -> tuple[npt.NDArray[np.bool_], Ints]:
        """Which of ``slots`` are documents of this segment, and their local numbers (where they are)."""
        if not len(self.slots):
            return np.zeros(len(slots), np.bool_), np.zeros(len(slots), np.int64)
        if self._identity_slots:  # slot i is document i
            found = (slots >= 0) & (slots < len(self.slots))
            return found, np.where(found, slots, 0)
        at = np.minimum(np.searchsorted(self.slots, slots, sorter=self._slot_order), len(self.slots) - 1)
        local: Ints = at if self._slot_order is None else self._slot_order[at]
        return self.slots[local] == slots, local

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def postings(self) -> int:
        return len(self.docs)

    @property
    def nbytes(self) -> int:
        """Memory held: the arrays, and about ``LEXEME_BYTES`` per lexeme for the vocabulary."""
        arrays: list[npt.NDArray[Any] | None] = [
            self.slots, self.lengths, self.offsets, self.docs, self.tfs, self._slot_order,
            self._acc, self._stamp, self._wanted,
        ]  # fmt: skip
        extra = 0
        if self.pruned:
            arrays += [self.max_part, self.max_tf, self.min_length, self._range_mask]
            extra = self.ranges.nbytes
        extra += self._norms.nbytes
        return sum(a.nbytes for a in arrays if a is not None) + extra + LEXEME_BYTES * len(self.lexemes)

    def _term_slice(self, lexeme: str) -> tuple[int, int] | None:
        row = self.terms.get(lexeme)
        if row is None:
            return None
        return int(self.offsets[row]), int(self.offsets[row + 1])

    def _scratch(self) -> Floats:
        """The accumulator: zeros, one per document, kept between searches (which run one at a time)."""
        if self._acc is None or self._stamp is None or len(self._acc) != len(self):
            self._acc = np.zeros(len(self), dtype=np.float64)
            self._stamp = np.zeros(len(self), dtype=np.int32)
            self._wanted = np.zeros(len(self), dtype=np.bool_)
        return self._acc

    def _tf_of(self, start: int, end: int, local: Ints) -> Floats:
        """The frequency of the term whose postings are ``start:end`` in each of ``local`` (0 where absent)."""
        if not len(local) or start == end:
            return np.zeros(len(local), dtype=np.float64)
        # Only the postings between the first and the last document asked for can match: a scope of neighbouring
        # memories (loaded together) reads a slice of each list, not the whole.
        docs = self.docs[start:end]
        low, high = np.searchsorted(docs, [local.min(), local.max() + 1])
        start, end = start + int(low), start + int(high)
        docs = docs[low:high]
        if not len(docs):
            return np.zeros(len(local), dtype=np.float64)
        if len(docs) <= _DENSE_LOOKUP * len(local):
            # Spread the term's frequencies over the (clean) accumulator and read them back: linear.
            acc = self._scratch()
            try:
                acc[docs] = self.tfs[start:end]
                tf: Floats = acc[local]
            finally:
                acc[docs] = 0.0
            return tf
        at = np.minimum(np.searchsorted(docs, local), len(docs) - 1)
        return np.where(docs[at] == local, self.tfs[start + at], 0).astype(np.float64)

    def score_local(self, local: npt.NDArray[np.int64], scoring: Scoring) -> Floats:
        """Exact BM25 of the given local documents (ascending or not), over every query term."""
        total = np.zeros(len(local), dtype=np.float64)
        if not len(local):
            return total
        if len(local) >= MASK_MIN_DOCS:
            return self._score_by_mask(local, scoring)
        norm = self._norms.of(scoring)[local]
        for lexeme, idf in zip(scoring.lexemes, scoring.idf, strict=True):
            span = self._term_slice(lexeme)
            if span is not None:
                total += idf * scoring.part_normed(self._tf_of(span[0], span[1], local), norm)
        return total

    def _score_by_mask(self, local: Ints, scoring: Scoring) -> Floats:
        """``score_local`` for many documents (a scope's): each term's postings between the first and the last of
        them are checked against a byte per document (a mask that stays in cache, where spreading a list over the
        accumulator misses it at every posting), and only the hits are scored. A list much longer than the
        documents is searched instead."""
        acc = self._scratch()
        wanted = self._wanted
        assert wanted is not None
        wanted[local] = True
        bounds = np.array([local.min(), local.max() + 1])
        norms = self._norms.of(scoring)
        try:
            for lexeme, idf in zip(scoring.lexemes, scoring.idf, strict=True):
                span = self._term_slice(lexeme)
                if span is None:
                    continue
                low, high = np.searchsorted(self.docs[span[0] : span[1]], bounds) + span[0]
                if high - low > _MASK_SCAN * len(local):
                    tf = self._tf_of(span[0], span[1], local)
                    acc[local] += idf * scoring.part_normed(tf, norms[local])
                    continue
                docs = self.docs[low:high]
                hit = np.flatnonzero(wanted[docs])
                met = docs[hit]
                acc[met] += idf * scoring.part_normed(self.tfs[low + hit].astype(np.float64), norms[met])
            total: Floats = acc[local]
        finally:
            wanted[local] = False
            acc[local] = 0.0
        return total

    def exhaustive(self, scoring: Scoring) -> tuple[Ints, Floats]:
        """Every local document holding a query term, with its exact score."""
        parts_docs, parts_scores = [], []
        norms = self._norms.of(scoring)
        for lexeme, idf in zip(scoring.lexemes, scoring.idf, strict=True):
            span = self._term_slice(lexeme)
            if span is None:
                continue
            docs = self.docs[span[0] : span[1]]
            tf = self.tfs[span[0] : span[1]].astype(np.float64)
            parts_docs.append(docs)
            parts_scores.append(idf * scoring.part_normed(tf, norms[docs]))
        if not parts_docs:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        sums = np.asarray(
            np.bincount(np.concatenate(parts_docs), weights=np.concatenate(parts_scores), minlength=len(self)),
            dtype=np.float64,
        )
        local: Ints = np.flatnonzero(sums > 0)
        return local, sums[local]

    def top(self, scoring: Scoring, k: int, usable: npt.NDArray[np.bool_] | None) -> tuple[Ints, Floats]:
        """Local documents and exact scores of a set that holds this segment's best ``k`` usable documents (and
        maybe more); ``usable`` is indexed by slot (alive and not expired), None when every slot is."""
        if not self.pruned:
            local, scores = self.exhaustive(scoring)
            if usable is None:
                return local, scores
            keep = usable[self.slots[local]]
            return local[keep], scores[keep]
        return self._block_max(scoring, k, usable)

    def _bound(self, row: int, scoring: Scoring) -> float:
        """The most term ``row``'s part of BM25 can be in any document of this segment: a larger average length
        than the build's raises a part by at most their ratio; other k1 and b take the largest frequency at the
        smallest length."""
        if (scoring.k1, scoring.b) == (self.k1, self.b):
            return float(self.max_part[row]) * max(1.0, scoring.avgdl / self.avgdl)
        return float(scoring.part(np.array([self.max_tf[row]]), np.array([self.min_length[row]]))[0])

    def _terms(self, scoring: Scoring) -> list[Term]:
        """The query's terms found here with their range bounds, the largest bound first."""
        terms = []
        norms = self._norms.of(scoring)
        for lexeme, idf in zip(scoring.lexemes, scoring.idf, strict=True):
            row = self.terms.get(lexeme)
            if row is None:
                continue
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
            bound = self._bound(row, scoring)
            postings = None
            if not self.ranges.is_long(row):  # a short list: its exact parts, per range
                docs = self.docs[start:end]
                postings = (docs, scoring.part_normed(self.tfs[start:end].astype(np.float64), norms[docs]))
            term = self.ranges.term(row, start=start, end=end, idf=idf, bound=bound, scoring=scoring, postings=postings)
            terms.append(term)
        terms.sort(key=lambda t: -t.bound)
        return terms

    def _block_max(self, scoring: Scoring, k: int, usable: npt.NDArray[np.bool_] | None) -> tuple[Ints, Floats]:
        """Block-max MaxScore. On a large segment the documents of the rarest terms are scored exactly first, so
        the threshold (the k-th best score known) starts high. Then MaxScore: terms are read, the largest bound first,
        only while a document holding none of them yet could still reach the threshold, and only in the ranges
        whose bound reaches it; the documents met look the remaining terms up and drop out as soon as their partial
        score plus the remaining terms' bounds in their range falls below it."""
        terms = self._terms(scoring)
        if not terms:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        usable_here = None if usable is None else usable[: len(self)] if self._identity_slots else usable[self.slots]
        total = np.zeros(self.ranges.ranges, dtype=np.float64)  # per range: the most a document there can score
        for term in terms:
            term.add_to(total)
        threshold = self._seed(terms, scoring, k, usable_here)
        rest = np.append(np.cumsum([t.bound for t in terms][::-1])[::-1], 0.0)  # bound of terms i.. together
        live_at, chosen = np.nan, np.empty(0, np.int64)
        acc = self._scratch()
        norms = self._norms.of(scoring)
        stamp = self._stamp
        assert stamp is not None
        leaders = np.empty(0, np.int64)  # the k best partial scores so far (partial scores only grow)
        read = 0
        touched: list[npt.NDArray[np.int32]] = []
        try:
            while read < len(terms) and rest[read] >= threshold:
                term = terms[read]
                if threshold != live_at:  # the ranges that can still hold a document of the top k
                    chosen, live_at = np.flatnonzero(total >= threshold), threshold
                if len(chosen) < _GATHER_SHARE * len(total):
                    self._range_mask[chosen] = True
                    try:
                        at = gather(self.docs[term.start : term.end], chosen, self.ranges.shift, self._range_mask)
                    finally:
                        self._range_mask[chosen] = False
                    docs, tfs = self.docs[term.start + at], self.tfs[term.start + at]
                else:
                    docs, tfs = self.docs[term.start : term.end], self.tfs[term.start : term.end]
                touched.append(docs)
                values = acc[docs] + term.idf * scoring.part_normed(tfs.astype(np.float64), norms[docs])
                acc[docs] = values
                read += 1
                if read < len(terms):
                    # The new k best are among the old ones and this term's documents above the old threshold
                    # (every old leader is at or above it, and scores only grow).
                    fresh = docs[values >= threshold] if threshold > -np.inf else docs
                    if usable_here is not None:
                        fresh = fresh[usable_here[fresh]]
                    if len(leaders) and len(docs):
                        at = np.minimum(np.searchsorted(docs, leaders), len(docs) - 1)
                        pool = np.concatenate([leaders[docs[at] != leaders], fresh])
                    else:
                        pool = np.concatenate([leaders, fresh.astype(np.int64)])
                    if len(pool) >= k:
                        pooled = acc[pool]
                        best = np.argpartition(pooled, len(pool) - k)[len(pool) - k :]
                        leaders = pool[best]
                        threshold = max(threshold, float(pooled[best].min()) - EPSILON)
                    else:
                        leaders = pool
            read_postings = sum(len(d) for d in touched)
            met = np.concatenate(touched) if len(touched) > 1 else touched[0]
            positions = np.arange(len(met), dtype=np.int32)
            stamp[met] = positions
            local: Ints = met[stamp[met] == positions].astype(np.int64)
            partial = acc[local]
            acc[local] = 0.0
            touched.clear()
        finally:
            for docs in touched:  # interrupted: leave the scratch space clean for the next search
                acc[docs] = 0.0
        if usable_here is not None:
            keep = usable_here[local]
            local, partial = local[keep], partial[keep]
        self.last_read = (read, read_postings, len(terms))
        return self._finish(local, partial, terms[read:], scoring, k=k, threshold=threshold)

    def _finish(
        self, local: Ints, partial: Floats, remaining_terms: list[Term], scoring: Scoring, *, k: int, threshold: float
    ) -> tuple[Ints, Floats]:
        """MaxScore's last step: ``local`` documents, with ``partial`` scores so far, look ``remaining_terms`` up;
        a document drops out once its partial score plus the remaining terms' bounds in its range is below the
        threshold, which rises with the k-th best partial score."""
        which = local >> self.ranges.shift
        remaining = np.zeros(len(local), dtype=np.float64)
        for term in remaining_terms:
            remaining += term.at(which)
        norms = self._norms.of(scoring)[local]
        for step in [*remaining_terms, None]:
            scored = partial[partial > max(threshold, 0.0)]  # (numpy's partition is slow on many equal values)
            if len(scored) >= k:
                kth = float(np.partition(scored, len(scored) - k)[len(scored) - k])
                threshold = max(threshold, kth - EPSILON)
            if step is None:
                break
            keep = partial + remaining >= threshold
            if not keep.all():
                local, which, norms = local[keep], which[keep], norms[keep]
                partial, remaining = partial[keep], remaining[keep]
            if not len(local):
                break
            remaining -= step.at(which)
            partial = partial + step.idf * scoring.part_normed(self._tf_of(step.start, step.end, local), norms)
        keep = (partial > 0) & (partial >= threshold)
        return local[keep], partial[keep]

    def _seed(self, terms: list[Term], scoring: Scoring, k: int, usable_here: npt.NDArray[np.bool_] | None) -> float:
        """A first threshold: the k-th best exact score among the documents of the terms with the largest bounds
        (the rare terms the best documents usually hold, read until ``_SEED_POSTINGS``); -inf when they hold fewer
        than k documents."""
        if len(self) < SEED_MIN_DOCS:
            return -np.inf
        seeds, postings = [], 0
        for term in terms:
            if postings + term.end - term.start > len(self) // SEED_SHARE:
                break
            seeds.append(self.docs[term.start : term.end])
            postings += term.end - term.start
        if not seeds:
            return -np.inf
        local = np.unique(np.concatenate(seeds)).astype(np.int64)
        if usable_here is not None:
            local = local[usable_here[local]]
        if len(local) < k:
            return -np.inf
        score = self.score_local(local, scoring)
        return float(np.partition(score, len(score) - k)[len(score) - k]) - EPSILON
