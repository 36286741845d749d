"""Block-max bounds over ranges of documents: per long term and range, the most its part of BM25 can be there.

A segment's local documents are cut into *ranges* of ``2**RANGE_SHIFT`` consecutive documents. Per term and range
the index keeps an upper bound of the term's part of BM25 there (the largest among its postings in the range, rounded
up to 1/255 of its ceiling ``k1 + 1``: a byte). A query adds its terms' bounds per range (times their idf): a range
whose sum is below the k-th best score found so far holds no document of the top k, whatever its documents hold,
and MaxScore reads no postings there; a document's partial score plus the remaining terms' bounds *in its range* is
a much tighter bound than with their bounds over the whole segment, so documents drop out sooner.

Small ranges make the bounds tight (a frequent word is absent from most ranges of 16 documents, while it is in
nearly every range of 128), at a byte per range per long term. Bounds are stored only for terms with at least
``ranges / LONG_TERM_RANGES`` postings, so the table holds at most ``LONG_TERM_RANGES`` bytes per posting (about 0.8
on SciFact sentences); a shorter list is cheaper to bound at query time from its postings, exactly.

``Scoring`` (what BM25 needs besides the postings) lives here because the bounds are computed with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

RANGE_SHIFT = 4
"""Documents per range: 16. Smaller ranges bound more tightly and cost more bounds per query."""
LONG_TERM_RANGES = 4
"""A term gets stored bounds once it has at least ``ranges / LONG_TERM_RANGES`` postings: the table then holds at
most ``LONG_TERM_RANGES`` bytes per posting."""
_LEVELS = 255
_GATHER_BY_MASK = 4
"""A term's postings in the chosen ranges are found by a mask over its postings when it has at most this many
postings per chosen range; otherwise by binary search for each range's bounds."""
EPSILON = 1e-9
"""Slack for floating-point sums in the bounds: a bound a rounding error below the threshold still counts."""

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Postings = tuple[npt.NDArray[np.int32], Floats]
"""A term's documents (ascending) and their exact parts of BM25."""


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
        return self.part_normed(tf, self.norm(length))

    def norm(self, length: npt.NDArray[np.float64]) -> Floats:
        """The length normalisation of BM25's denominator: a segment keeps it per document between searches."""
        result: Floats = self.k1 * (1 - self.b + self.b * length / self.avgdl)
        return result

    def part_normed(self, tf: npt.NDArray[np.float64], norm: Floats) -> Floats:
        """``part`` from the documents' ``norm``: the same operations in the same order, so the same bits."""
        result: Floats = tf * (self.k1 + 1) / (tf + norm)
        return result


class NormCache:
    """A segment's ``Scoring.norm`` per document for the last statistics snapshot (avgdl, k1, b) searched with:
    computed once per snapshot rather than per term of every search (four array operations per term, about a tenth
    of a 16-word search's ranking at 100k documents)."""

    def __init__(self, lengths: Floats) -> None:
        self._lengths = lengths
        self._key: tuple[float, float, float] | None = None
        self._values: Floats = np.empty(0, np.float64)

    @property
    def nbytes(self) -> int:
        return int(self._values.nbytes)

    def of(self, scoring: Scoring) -> Floats:
        key = (scoring.avgdl, scoring.k1, scoring.b)
        if key != self._key:
            self._values, self._key = scoring.norm(self._lengths), key
        return self._values


@dataclasses.dataclass
class Term:
    """One query term's postings in a segment (``docs[start:end]``), its idf, its bound over the segment and its
    bounds per range (idf included): stored levels times ``scale``, or, for a short list, the ranges it occurs in
    (ascending) with their bounds."""

    start: int
    end: int
    idf: float
    bound: float
    levels: npt.NDArray[np.uint8] | None = None
    scale: float = 0.0
    where: Ints | None = None
    values: Floats | None = None

    def add_to(self, total: Floats) -> None:
        """Add the term's bound per range to ``total``."""
        if self.levels is not None:
            np.add(total, self.levels * self.scale, out=total)
        elif self.where is not None and self.values is not None:
            total[self.where] += self.values

    def at(self, ranges: Ints) -> Floats:
        """The term's bound in each of ``ranges``."""
        if self.levels is not None:
            return np.multiply(self.levels[ranges], self.scale, dtype=np.float64)
        assert self.where is not None and self.values is not None
        if not len(self.where):
            return np.zeros(len(ranges), dtype=np.float64)
        at = np.minimum(np.searchsorted(self.where, ranges), len(self.where) - 1)
        return np.where(self.where[at] == ranges, self.values[at], 0.0)


class RangeBounds:
    """Per long term and range: ``ceil(255 * max part / (k1 + 1))``, with the parts at ``avgdl``."""

    def __init__(self, offsets: Ints, documents: int, avgdl: float, k1: float, b: float) -> None:
        self.shift = RANGE_SHIFT
        self.ranges = (documents >> self.shift) + 1
        self.avgdl, self.k1, self.b = avgdl, k1, b
        long = np.diff(offsets) * LONG_TERM_RANGES >= self.ranges
        self.rows = np.full(len(offsets) - 1, -1, dtype=np.int32)
        self.rows[long] = np.arange(int(long.sum()), dtype=np.int32)
        self.table = np.zeros((int(long.sum()), self.ranges), dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes + self.table.nbytes)

    def add(self, term_of: npt.NDArray[Any], docs: npt.NDArray[np.int32], part: Floats) -> None:
        """Take some of the segment's postings: their terms, documents and parts (at ``avgdl``), grouped by term and
        ascending by document within a term (so a range's postings of a term are consecutive)."""
        row = self.rows[term_of]
        kept = row >= 0
        if not kept.any():
            return
        key = row[kept].astype(np.int64) * self.ranges + (docs[kept] >> self.shift)
        # Rounded up, and a hair above, so the stored bound is never below a part computed again at query time.
        level = np.minimum(np.ceil(part[kept] * (_LEVELS * (1 + 1e-12) / (self.k1 + 1))), _LEVELS).astype(np.uint8)
        starts = np.flatnonzero(np.concatenate([np.array([True]), key[1:] != key[:-1]]))
        flat = self.table.reshape(-1)
        flat[key[starts]] = np.maximum(flat[key[starts]], np.maximum.reduceat(level, starts))

    def term(
        self, row: int, *, start: int, end: int, idf: float, bound: float, scoring: Scoring, postings: Postings | None
    ) -> Term:
        """The query term stored at ``row`` (postings ``start:end``, ``bound`` over the segment without idf). Stored
        bounds hold for an average length up to the build's; a larger average raises every part by at most the
        ratio of the two, so they scale by it; other k1 and b take ``bound`` wherever the term occurs. ``postings``
        (the term's documents and exact parts) is given for a term without stored bounds."""
        at = int(self.rows[row])
        if at >= 0:
            levels = self.table[at]
            if (scoring.k1, scoring.b) == (self.k1, self.b):
                scale = idf * max(1.0, scoring.avgdl / self.avgdl) * (self.k1 + 1) / _LEVELS
                return Term(start, end, idf, idf * bound, levels=levels, scale=scale)
            return Term(start, end, idf, idf * bound, levels=(levels > 0).astype(np.uint8), scale=idf * bound)
        assert postings is not None
        docs, parts = postings
        which = (docs >> self.shift).astype(np.int64)
        starts = np.flatnonzero(np.concatenate([np.array([True]), which[1:] != which[:-1]])) if len(docs) else which
        values = idf * np.maximum.reduceat(parts, starts) if len(docs) else np.empty(0, np.float64)
        return Term(start, end, idf, idf * bound, where=which[starts], values=values)

    def is_long(self, row: int) -> bool:
        return bool(self.rows[row] >= 0)


def gather(docs: npt.NDArray[np.int32], chosen: Ints, shift: int, mask: npt.NDArray[np.bool_]) -> Ints:
    """Positions in ``docs`` (ascending) of the postings inside the ranges ``chosen`` (ascending; ``mask`` is
    True exactly there)."""
    if len(docs) <= _GATHER_BY_MASK * len(chosen):
        found: Ints = np.flatnonzero(mask[docs >> shift])
        return found
    low = np.searchsorted(docs, chosen << shift)
    high = np.searchsorted(docs, (chosen + 1) << shift)
    counts = high - low
    total = int(counts.sum())
    if not total:
        return np.empty(0, np.int64)
    first = np.cumsum(counts) - counts
    positions: Ints = np.arange(total, dtype=np.int64) + np.repeat(low - first, counts)
    return positions


def term_bounds(
    offsets: Ints,
    docs: npt.NDArray[np.int32],
    tfs: npt.NDArray[np.uint16],
    lengths: Floats,
    *,
    avgdl: float,
    k1: float,
    b: float,
    slice_size: int,
) -> tuple[Floats, Floats, Floats, RangeBounds]:
    """Per term of a segment's postings: the largest part of BM25 at ``avgdl``, the largest frequency, the smallest
    length; and the range bounds. A slice of postings at a time, so the float temporaries stay small."""
    terms = len(offsets) - 1
    max_part = np.zeros(terms, dtype=np.float64)
    max_tf = np.zeros(terms, dtype=np.float64)
    min_length = np.full(terms, np.inf, dtype=np.float64)
    ranges = RangeBounds(offsets, len(lengths), avgdl, k1, b)
    for low in range(0, len(docs), slice_size):
        high = min(low + slice_size, len(docs))
        tf = tfs[low:high].astype(np.float64)
        length = lengths[docs[low:high]]
        part = tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avgdl))
        # The pieces of terms within the slice: where a term starts inside it, and the slice's start.
        inside = offsets[(offsets > low) & (offsets < high)]
        starts = np.unique(np.concatenate([np.array([low], dtype=np.int64), inside]))
        owner = np.searchsorted(offsets, starts, side="right") - 1
        np.maximum.at(max_part, owner, np.maximum.reduceat(part, starts - low))
        np.maximum.at(max_tf, owner, np.maximum.reduceat(tf, starts - low))
        np.minimum.at(min_length, owner, np.minimum.reduceat(length, starts - low))
        ranges.add(np.repeat(owner, np.diff(np.append(starts, high))), docs[low:high], part)
    min_length[np.isinf(min_length)] = 1.0
    return max_part, max_tf, min_length, ranges
