"""Immutable postings of some memories, and exact BM25 top-k over them without scoring every match.

A segment numbers its documents locally (0..n-1) and keeps, per lexeme, the documents holding it in ascending order
with their term frequencies, and, in large segments, per lexeme an upper bound of its term-frequency part of BM25
(the largest among its postings at 1.5x the average length the segment was built with, and the largest frequency
with the smallest length for beyond it). A search runs MaxScore over them: query terms are read whole, most
valuable first, only while a document holding none of them yet could still reach the k-th best partial score; the
documents met then look the remaining terms up and drop out once their bound falls below it. Every document that
can be in the top k is scored exactly, over every query term. Small segments are scored exhaustively: cheaper than
the bookkeeping.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

PRUNE_MIN_DOCS = 20_000
"""Segments with fewer documents are scored exhaustively."""
LEXEME_BYTES = 200
"""Python's cost of one vocabulary entry (the string, twice referenced, and its dict slot), measured roughly."""
_BOUND_SLICE = 1 << 20
"""Postings per slice when the bounds are computed."""
_DENSE_LOOKUP = 8
"""A remaining term is looked up for the documents met by spreading its postings into a dense array when it has at
most this many postings per document looked up; otherwise by binary search in its postings."""
_EPSILON = 1e-9
"""Slack for floating-point sums in the bounds: a bound a rounding error below the threshold still counts."""

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class Scoring:
    """What BM25 needs besides the postings: the query's lexemes with their idf, the average length, k1 and b."""

    lexemes: tuple[str, ...]
    idf: tuple[float, ...]
    avgdl: float
    k1: float
    b: float

    def part(self, tf: npt.NDArray[np.float64], length: npt.NDArray[np.float64]) -> Floats:
        """The term-frequency part of BM25 (0 where ``tf`` is 0)."""
        norm = self.k1 * (1 - self.b + self.b * length / self.avgdl)
        result: Floats = tf * (self.k1 + 1) / (tf + norm)
        return result


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
        self._identity_slots = bool(len(slots) == 0 or (slots[0] == 0 and slots[-1] == len(slots) - 1))
        """Document i is slot i (the loaded segment): no indirection needed."""
        self.last_read = (0, 0, 0)
        """Of the last pruned search: terms read whole, their postings, query terms here (for benchmarks)."""
        self._acc: Floats | None = None
        """Scratch space of one search at a time (searches run on the event loop), cleared after each."""
        self._stamp: npt.NDArray[np.int32] | None = None
        """Scratch space for finding the documents a search met (never needs clearing)."""
        self.pruned = len(slots) >= PRUNE_MIN_DOCS
        if self.pruned:
            self._build_bounds(avgdl)

    def _build_bounds(self, avgdl: float) -> None:
        """Per term: the largest term-frequency part of BM25 among its postings at ``bound_avgdl`` (above the
        average length the segment was built with; the part grows with the average length, so the bound holds for
        any average up to it), and the largest frequency and smallest length (a looser bound beyond it)."""
        self.bound_avgdl = 1.5 * avgdl
        terms = len(self.offsets) - 1
        self.max_part = np.zeros(terms, dtype=np.float64)
        self.max_tf = np.zeros(terms, dtype=np.float64)
        self.min_length = np.full(terms, np.inf, dtype=np.float64)
        # A slice of postings at a time, so the float temporaries stay small whatever the segment's size.
        for low in range(0, len(self.docs), _BOUND_SLICE):
            high = min(low + _BOUND_SLICE, len(self.docs))
            tf = self.tfs[low:high].astype(np.float64)
            lengths = self.lengths[self.docs[low:high]]
            part = tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * lengths / self.bound_avgdl))
            # The pieces of terms within the slice: where a term starts inside it, and the slice's start.
            inside = self.offsets[(self.offsets > low) & (self.offsets < high)]
            starts = np.unique(np.concatenate([np.array([low], dtype=np.int64), inside]))
            owner = np.searchsorted(self.offsets, starts, side="right") - 1
            np.maximum.at(self.max_part, owner, np.maximum.reduceat(part, starts - low))
            np.maximum.at(self.max_tf, owner, np.maximum.reduceat(tf, starts - low))
            np.minimum.at(self.min_length, owner, np.minimum.reduceat(lengths, starts - low))
        self.min_length[np.isinf(self.min_length)] = 1.0

    def locate(self, slots: Ints) -> tuple[npt.NDArray[np.bool_], Ints]:
        """Which of ``slots`` are documents of this segment, and their local numbers (where they are)."""
        if not len(self.slots):
            return np.zeros(len(slots), np.bool_), np.zeros(len(slots), np.int64)
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
            self.slots, self.lengths, self.offsets, self.docs, self.tfs, self._slot_order, self._acc, self._stamp,
        ]  # fmt: skip
        if self.pruned:
            arrays += [self.max_part, self.max_tf, self.min_length]
        return sum(a.nbytes for a in arrays if a is not None) + LEXEME_BYTES * len(self.lexemes)

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
        return self._acc

    def _tf_of(self, start: int, end: int, local: Ints) -> Floats:
        """The frequency of the term whose postings are ``start:end`` in each of ``local`` (0 where absent)."""
        docs = self.docs[start:end]
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
        length = self.lengths[local]
        for lexeme, idf in zip(scoring.lexemes, scoring.idf, strict=True):
            span = self._term_slice(lexeme)
            if span is not None:
                total += idf * scoring.part(self._tf_of(span[0], span[1], local), length)
        return total

    def exhaustive(self, scoring: Scoring) -> tuple[Ints, Floats]:
        """Every local document holding a query term, with its exact score."""
        parts_docs, parts_scores = [], []
        for lexeme, idf in zip(scoring.lexemes, scoring.idf, strict=True):
            span = self._term_slice(lexeme)
            if span is None:
                continue
            docs = self.docs[span[0] : span[1]]
            tf = self.tfs[span[0] : span[1]].astype(np.float64)
            parts_docs.append(docs)
            parts_scores.append(idf * scoring.part(tf, self.lengths[docs]))
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
        return self._max_score(scoring, k, usable)

    def _bound(self, row: int, scoring: Scoring) -> float:
        """The most term ``row``'s part of BM25 can be in any document of this segment."""
        if scoring.avgdl <= self.bound_avgdl and (scoring.k1, scoring.b) == (self.k1, self.b):
            return float(self.max_part[row])
        return float(scoring.part(np.array([self.max_tf[row]]), np.array([self.min_length[row]]))[0])

    def _max_score(self, scoring: Scoring, k: int, usable: npt.NDArray[np.bool_] | None) -> tuple[Ints, Floats]:
        """MaxScore: terms are read whole, most valuable first, only while a document holding none of them yet could
        still reach the threshold (the k-th best partial score so far: partial scores only grow); the documents
        already met then look the remaining terms up, dropping out as soon as their bound falls below it."""
        terms = []  # (start, end, idf, bound)
        for lexeme, idf in zip(scoring.lexemes, scoring.idf, strict=True):
            row = self.terms.get(lexeme)
            if row is not None:
                terms.append((int(self.offsets[row]), int(self.offsets[row + 1]), idf, idf * self._bound(row, scoring)))
        if not terms:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        terms.sort(key=lambda t: -t[3])
        rest = np.append(np.cumsum([t[3] for t in terms][::-1])[::-1], 0.0)  # bound of terms i.. together
        acc = self._scratch()
        stamp = self._stamp
        assert stamp is not None
        usable_here = None if usable is None else usable[: len(self)] if self._identity_slots else usable[self.slots]
        leaders = np.empty(0, np.int64)  # the k best partial scores so far (partial scores only grow)
        threshold = -np.inf
        read = 0
        touched: list[npt.NDArray[np.int32]] = []
        try:
            while read < len(terms) and rest[read] >= threshold:
                start, end, idf, _ = terms[read]
                docs = self.docs[start:end]
                touched.append(docs)
                values = acc[docs] + idf * scoring.part(self.tfs[start:end].astype(np.float64), self.lengths[docs])
                acc[docs] = values
                read += 1
                if read < len(terms):
                    # The new k best are among the old ones and this term's documents above the old threshold
                    # (every old leader is at or above it, and scores only grow).
                    fresh = docs[values >= threshold] if threshold > -np.inf else docs
                    if usable_here is not None:
                        fresh = fresh[usable_here[fresh]]
                    if len(leaders):
                        at = np.minimum(np.searchsorted(docs, leaders), len(docs) - 1)
                        pool = np.concatenate([leaders[docs[at] != leaders], fresh])
                    else:
                        pool = fresh.astype(np.int64)
                    if len(pool) >= k:
                        pooled = acc[pool]
                        best = np.argpartition(pooled, len(pool) - k)[len(pool) - k :]
                        leaders = pool[best]
                        threshold = max(threshold, float(pooled[best].min()) - _EPSILON)
                    else:
                        leaders = pool
            read_postings = sum(len(d) for d in touched)
            # The documents met, each once: every posting writes its position to its document's stamp, and the
            # one position that stays names the document (no sort, no scan of the whole segment).
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
        lengths = self.lengths[local]
        for start, end, idf, _ in terms[read:]:
            keep = partial + rest[read] >= threshold
            local, partial, lengths = local[keep], partial[keep], lengths[keep]
            if not len(local):
                break
            partial = partial + idf * scoring.part(self._tf_of(start, end, local), lengths)
            read += 1
            if len(partial) >= k:
                kth = float(np.partition(partial, len(partial) - k)[len(partial) - k])
                threshold = max(threshold, kth - _EPSILON)
        keep = partial >= threshold
        return local[keep], partial[keep]


def merged(
    segments: list[Segment],
    *,
    lengths: Floats,
    alive: npt.NDArray[np.bool_],
    avgdl: float,
    k1: float = 1.2,
    b: float = 0.75,
) -> Segment:
    """One segment holding the live documents of ``segments``; ``lengths`` and ``alive`` are indexed by slot."""
    vocabulary: dict[str, int] = {}
    slots, terms, docs, tfs = [], [], [], []
    base = 0
    for segment in segments:
        keep = alive[segment.slots]
        renumber = np.cumsum(keep) - 1 + base
        mapping = np.fromiter(
            (vocabulary.setdefault(lexeme, len(vocabulary)) for lexeme in segment.lexemes),
            dtype=np.int32,
            count=len(segment.lexemes),
        )
        per_term = np.diff(segment.offsets)
        term = np.repeat(mapping, per_term)
        live = keep[segment.docs]
        slots.append(segment.slots[keep])
        terms.append(term[live])
        docs.append(renumber[segment.docs[live]].astype(np.int32))
        tfs.append(segment.tfs[live])
        base += int(keep.sum())
    all_slots = np.concatenate(slots) if slots else np.empty(0, np.int64)
    return Segment(
        slots=all_slots,
        lengths=lengths[all_slots],
        lexemes=list(vocabulary),
        term=np.concatenate(terms) if terms else np.empty(0, np.int32),
        docs=np.concatenate(docs) if docs else np.empty(0, np.int32),
        tfs=np.concatenate(tfs) if tfs else np.empty(0, np.uint16),
        avgdl=avgdl,
        k1=k1,
        b=b,
    )
