"""The in-memory text index: every live memory's lexemes, held in segments, answering BM25's exact top-k.

It is derived data. PostgreSQL stays the only source of truth: the index is loaded from the stored ``search_tsv``
(the same parser, stopwords and stemming), follows the change log, and every answer is checked against the rows
(``search/text_search.py``). Each version of a memory gets a *slot* (its place in the per-document arrays: id,
length, expiry, alive); a change appends a slot and marks the old one dead, so segments never change once built.
New versions go into a small segment per batch of changes; small segments merge pairwise, smallest first, so a
document is rewritten O(log n) times, and the search reads a handful of segments.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from memory_service.models import ScopeRef
from memory_service.search.text_blocks import Scoring
from memory_service.search.text_scopes import SCOPE_KINDS, ScopeSlots
from memory_service.search.text_segment import Floats, Ints, Segment
from memory_service.storage.text_index_sql import DocText, LoadedChunk

MAX_SMALL_SEGMENTS = 6
"""Segments beside the largest before the two smallest merge."""
MOVED_BYTES = 100
"""Python's cost of one entry of the moved-ids dict, roughly."""
BASE_TABLE_SPAN = 4
"""The load's ids get a direct id -> slot table (4 bytes per id in their span) when the span is at most this many
times their count: a filtered search maps thousands of ids to slots at once."""
MERGE_MAX_DOCS = 50_000
"""Largest merge done in place (on the event loop, some 100 ms); beyond it the index is reloaded in the background."""


class TextIndex:
    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.ids: Ints = np.empty(0, np.int64)
        self.lengths: Floats = np.empty(0, np.float64)
        self.expiry: Floats = np.empty(0, np.float64)
        self.alive: npt.NDArray[np.bool_] = np.empty(0, np.bool_)
        self.count = 0
        """Slots in use."""
        self.segments: list[Segment] = []
        self._base_ids: Ints = np.empty(0, np.int64)
        """Ids of the first ``len(_base_ids)`` slots, ascending (the load's)."""
        self._base_table: npt.NDArray[np.int32] | None = None
        """Id minus the first load id -> load slot (-1 for none), when the load's ids are dense enough."""
        self._moved: dict[int, int] = {}
        """Id -> slot for every id whose slot is not its load slot (-1 once gone)."""
        self.live = 0
        self.crowded = False
        """Too many segments to merge in place: reload."""
        self.k1, self.b = k1, b
        self._version = 0
        """Bumped by every change, so the cached usable mask is recomputed."""
        self._moved_arrays: tuple[int, Ints, Ints] | None = None
        self._usable: npt.NDArray[np.bool_] | None = None
        self._usable_version = -1
        self._usable_until = np.inf
        self._all_usable = False
        self._load_vocabulary: dict[str, int] = {}
        self._load_parts: list[tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.uint16]]] = []
        """A load's chunks, compact, until ``finish_load``."""
        self._load_scopes: list[tuple[npt.NDArray[np.int8], Ints]] = []
        self.scopes = ScopeSlots()

    # -- building ------------------------------------------------------------------------------------------------

    def _reserve(self, extra: int) -> None:
        need = self.count + extra
        if need <= len(self.ids):
            return
        size = max(need, 2 * len(self.ids), 1024)
        for name, fill in (("ids", 0), ("lengths", 1.0), ("expiry", np.inf), ("alive", False)):
            old = getattr(self, name)
            new = np.full(size, fill, dtype=old.dtype)
            new[: self.count] = old[: self.count]
            setattr(self, name, new)

    def _append(self, ids: Ints, lengths: Floats, expiry: Floats) -> Ints:
        self._reserve(len(ids))
        slots = np.arange(self.count, self.count + len(ids), dtype=np.int64)
        self.ids[slots] = ids
        self.lengths[slots] = lengths
        self.expiry[slots] = expiry
        self.alive[slots] = True
        self.count += len(ids)
        self.live += len(ids)
        return slots

    @classmethod
    def loaded(
        cls,
        parts: list[LoadedChunk],
        avgdl: float,
        k1: float = 1.2,
        b: float = 0.75,
    ) -> TextIndex:
        """An index of what ``text_index_sql.load`` read, in ascending id ranges."""
        index = cls(k1, b)
        for part in parts:
            index.add_loaded(part)
        index.finish_load(avgdl)
        return index

    def add_loaded(self, part: LoadedChunk) -> None:
        """Take one chunk of a load (ascending ids, after the previous chunk's), kept compact (4 bytes per posting
        for its term, 4 for its document, 2 for its frequency) until ``finish_load``."""
        ids, chunk = part.ids, part.postings
        first = self.count
        self._append(ids, part.lengths.astype(np.float64), part.expiry)
        kinds = np.fromiter((SCOPE_KINDS[s] for s in part.scopes), dtype=np.int8, count=len(part.scopes))
        self._load_scopes.append((kinds, part.scope_ids))
        vocabulary = self._load_vocabulary
        mapping = np.fromiter(
            (vocabulary.setdefault(lexeme, len(vocabulary)) for lexeme in chunk.lexemes),
            dtype=np.int32,
            count=len(chunk.lexemes),
        )
        position = np.minimum(np.searchsorted(ids, chunk.ids), max(len(ids) - 1, 0))
        # Postings of a memory the chunk's memories do not list (none within one snapshot) are dropped.
        known = ids[position] == chunk.ids if len(ids) else np.zeros(len(chunk.ids), np.bool_)
        self._load_parts.append(
            (mapping[chunk.term[known]], (first + position[known]).astype(np.int32), chunk.tfs[known])
        )

    def finish_load(self, avgdl: float) -> None:
        """Build the loaded segment from the chunks taken: a counting sort by term, one chunk at a time, so the
        only large arrays are the segment's own."""
        parts, self._load_parts = self._load_parts, []
        scopes, self._load_scopes = self._load_scopes, []
        self.scopes = ScopeSlots.of_load(
            np.concatenate([k for k, _ in scopes]) if scopes else np.empty(0, np.int8),
            np.concatenate([i for _, i in scopes]) if scopes else np.empty(0, np.int64),
        )
        self._base_ids = self.ids[: self.count].copy()
        self._base_table = None
        if self.count and self._base_ids[-1] - self._base_ids[0] < BASE_TABLE_SPAN * self.count:
            self._base_table = np.full(int(self._base_ids[-1] - self._base_ids[0]) + 1, -1, dtype=np.int32)
            self._base_table[self._base_ids - self._base_ids[0]] = np.arange(self.count, dtype=np.int32)
        terms = len(self._load_vocabulary)
        if self.count:
            counts = np.zeros(terms, dtype=np.int64)
            for term, _, _ in parts:
                counts += np.bincount(term, minlength=terms)
            offsets = np.zeros(terms + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            docs = np.empty(int(offsets[-1]), dtype=np.int32)
            tfs = np.empty(int(offsets[-1]), dtype=np.uint16)
            cursor = offsets[:-1].copy()
            parts.reverse()
            while parts:  # in load order: each term's postings stay in document order across chunks
                term, part_docs, part_tfs = parts.pop()
                order = np.argsort(term, kind="stable")
                by_term = term[order]
                part_counts = np.bincount(term, minlength=terms)
                part_starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(part_counts)[:-1]])
                target = cursor[by_term] + (np.arange(len(order), dtype=np.int64) - part_starts[by_term])
                docs[target] = part_docs[order]
                tfs[target] = part_tfs[order]
                cursor += part_counts
                del term, part_docs, part_tfs, order, by_term, target
            self.segments.append(
                Segment(
                    slots=np.arange(self.count, dtype=np.int64),
                    lengths=self.lengths[: self.count].copy(),
                    lexemes=list(self._load_vocabulary),
                    docs=docs,
                    tfs=tfs,
                    offsets=offsets,
                    avgdl=avgdl,
                    k1=self.k1,
                    b=self.b,
                )
            )
        self._load_vocabulary = {}

    # -- following changes ---------------------------------------------------------------------------------------

    def slot_of(self, memory_id: int) -> int:
        """The live slot of a memory, or -1."""
        slot = self._moved.get(memory_id)
        if slot is not None:
            return slot
        base = self._base_ids
        at = int(np.searchsorted(base, memory_id))
        if at < len(base) and base[at] == memory_id and self.alive[at]:
            return at
        return -1

    def slots_of(self, ids: Ints) -> Ints:
        """The live slots of many memories at once (-1 where gone or unknown)."""
        base = self._base_ids
        slots = np.full(len(ids), -1, dtype=np.int64)
        if self._base_table is not None:  # dense ids: one lookup each, no binary search
            offset = ids - base[0]
            inside = (offset >= 0) & (offset < len(self._base_table))
            at = np.where(inside, self._base_table[np.where(inside, offset, 0)], -1).astype(np.int64)
            hit = at >= 0
            hit[hit] = self.alive[at[hit]]
            slots[hit] = at[hit]
        elif len(base):
            at = np.minimum(np.searchsorted(base, ids), len(base) - 1)
            hit = (base[at] == ids) & self.alive[at]
            slots[hit] = at[hit]
        if self._moved:
            if self._moved_arrays is None or self._moved_arrays[0] != self._version:
                keys = np.fromiter(self._moved.keys(), dtype=np.int64, count=len(self._moved))
                values = np.fromiter(self._moved.values(), dtype=np.int64, count=len(self._moved))
                order = np.argsort(keys)
                self._moved_arrays = (self._version, keys[order], values[order])
            _, keys, values = self._moved_arrays
            at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
            moved = keys[at] == ids
            slots[moved] = values[at[moved]]
        return slots

    def apply(self, changed: list[int], present: list[DocText], avgdl: float) -> None:
        """``changed`` memories now read as ``present`` (those missing from it are gone)."""
        self._version += 1
        for memory_id in changed:
            slot = self.slot_of(memory_id)
            if slot >= 0:
                self.alive[slot] = False
                self.live -= 1
            self._moved[memory_id] = -1
        if not present:
            return
        ids = np.fromiter((d.id for d in present), dtype=np.int64, count=len(present))
        lengths = np.fromiter((len(d.lexemes) for d in present), dtype=np.float64, count=len(present))
        expiry = np.fromiter(
            (np.inf if d.expires_at is None else d.expires_at for d in present), dtype=np.float64, count=len(present)
        )
        for memory_id in ids.tolist():
            slot = self.slot_of(memory_id)
            if slot >= 0:  # listed twice in one batch
                self.alive[slot] = False
                self.live -= 1
        slots = self._append(ids, lengths, expiry)
        for memory_id, slot in zip(ids.tolist(), slots.tolist(), strict=True):
            self._moved[memory_id] = slot
        self.scopes.add((SCOPE_KINDS[d.scope] for d in present), (d.scope_id for d in present), slots.tolist())
        vocabulary: dict[str, int] = {}
        terms: list[int] = []
        docs: list[int] = []
        tfs: list[int] = []
        for local, doc in enumerate(present):
            for lexeme, tf in zip(doc.lexemes, doc.tfs, strict=True):
                terms.append(vocabulary.setdefault(lexeme, len(vocabulary)))
                docs.append(local)
                tfs.append(tf)
        self.segments.append(
            Segment(
                slots=slots,
                lengths=lengths,
                lexemes=list(vocabulary),
                term=np.array(terms, dtype=np.int32),
                docs=np.array(docs, dtype=np.int32),
                tfs=np.array(tfs, dtype=np.uint16),
                avgdl=avgdl,
                k1=self.k1,
                b=self.b,
            )
        )
        self.compact(avgdl)

    def compact(self, avgdl: float) -> None:
        """Merge the two smallest segments while there are too many beside the largest."""
        while len(self.segments) > MAX_SMALL_SEGMENTS + 1:
            self.segments.sort(key=len, reverse=True)
            if len(self.segments[-1]) + len(self.segments[-2]) > MERGE_MAX_DOCS:
                self.crowded = True
                return
            a, b = self.segments.pop(), self.segments.pop()
            self.segments.append(
                merged([b, a], lengths=self.lengths, alive=self.alive, avgdl=avgdl, k1=self.k1, b=self.b)
            )

    @property
    def dead(self) -> int:
        return self.count - self.live

    @property
    def postings(self) -> int:
        return sum(s.postings for s in self.segments)

    @property
    def nbytes(self) -> int:
        """Memory the index holds (its arrays and vocabularies; Python's per-object overhead approximated)."""
        arrays = (self.ids, self.lengths, self.expiry, self.alive, self._base_ids, self._base_table, self._usable)
        return (
            sum(a.nbytes for a in arrays if a is not None)
            + MOVED_BYTES * len(self._moved)
            + self.scopes.nbytes
            + sum(s.nbytes for s in self.segments)
        )

    # -- searching -----------------------------------------------------------------------------------------------

    def usable(self, now: float) -> npt.NDArray[np.bool_]:
        """Per slot: alive and not expired at ``now``; recomputed only after a change or once a memory expires."""
        if self._usable is None or self._usable_version != self._version or now >= self._usable_until:
            count = self.count
            usable = self.alive[:count] & (self.expiry[:count] > now)
            later = self.expiry[:count][usable]
            self._usable_until = float(later.min()) if len(later) else np.inf
            self._usable, self._usable_version = usable, self._version
            self._all_usable = bool(usable.all())
        return self._usable

    def scope_slots(self, refs: Iterable[ScopeRef], now: float, *, unique_below: int = 1 << 62) -> Ints:
        """The slots of the live memories (unexpired at ``now``) in the scopes ``refs`` name, each once when they are
        fewer than ``unique_below`` (more may repeat, which a mask of them does not mind: ``ScopeSlots.slots``)."""
        refs = tuple(refs)
        slots = self.scopes.slots(refs)
        slots = slots[self.usable(now)[slots]]
        return np.unique(slots) if len(refs) > 1 and len(slots) < unique_below else slots

    def top(self, scoring: Scoring, k: int, now: float, *, within: Ints | None = None) -> list[tuple[int, float]]:
        """The best ``k`` live memories by exact BM25, best first (ties by id), as (id, score); with ``within``, the
        best among those usable slots."""
        usable: npt.NDArray[np.bool_] | None
        if within is not None:
            usable = np.zeros(self.count, np.bool_)
            usable[within] = True
        else:
            usable = self.usable(now)
            if self._all_usable:
                usable = None  # nothing to check per document
        slots, scores = [], []
        for segment in self.segments:
            local, score = segment.top(scoring, k, usable)
            slots.append(segment.slots[local])
            scores.append(score)
        return self._best(slots, scores, k)

    def score_ids(
        self, ids: list[int] | Ints, scoring: Scoring, now: float, k: int | None = None
    ) -> list[tuple[int, float]]:
        """Exact BM25 of the given memories that are live and hold a query term, best first (the best ``k``)."""
        wanted = self.slots_of(np.asarray(ids, dtype=np.int64))
        wanted = wanted[wanted >= 0]
        return self.score_slots(wanted[self.expiry[wanted] > now], scoring, k if k is not None else len(ids))

    def score_slots(self, wanted: Ints, scoring: Scoring, k: int) -> list[tuple[int, float]]:
        """Exact BM25 of the memories in the given usable slots that hold a query term, best first (the best
        ``k``)."""
        slots, scores = [], []
        for segment in self.segments:
            found, local = segment.locate(wanted)
            if not found.any():
                continue
            score = segment.score_local(local[found], scoring)
            hit = score > 0
            slots.append(wanted[found][hit])
            scores.append(score[hit])
        return self._best(slots, scores, k)

    def _best(self, slots: list[Ints], scores: list[Floats], k: int) -> list[tuple[int, float]]:
        if not slots:
            return []
        all_slots, all_scores = np.concatenate(slots), np.concatenate(scores)
        ids = self.ids[all_slots]
        order = np.lexsort((ids, -all_scores))[:k]
        return list(zip(ids[order].tolist(), all_scores[order].tolist(), strict=True))


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
