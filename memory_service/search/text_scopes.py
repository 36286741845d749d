"""Which slots of the text index hold which scope, so a search confined to scopes needs no ids from PostgreSQL.

A filter made of scopes alone (what a tenant's grants narrow every search to, and the commonest filter an agent
sends) used to list its matching ids in the search's first round trip: at a million memories a 1% scope's 10,000
ids leaving PostgreSQL cost more than ranking them. The index knows each memory's scope from its load and from every
change it applies, so it finds the scope's slots itself: the load's slots sorted by (kind, scope id), one binary
search per scope named, and the slots appended since in a dict per scope. Slots of dead versions stay listed; the
caller keeps the usable ones. The rows a search returns are still read from PostgreSQL with the filter and
row-level security applied, which stay the arbiters.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from memory_service.models import Scope, ScopeRef

Ints = npt.NDArray[np.int64]

SCOPE_KINDS = {scope.value: code for code, scope in enumerate(Scope)}
"""A scope kind's number in the index (the order of ``Scope``)."""
ADDED_BYTES = 72
"""Python's cost of one slot listed since the load (the int and its two list entries)."""
SCOPE_BYTES = 200
"""Python's cost of one scope first met since the load (its key, list and dict entry), measured roughly."""


class ScopeSlots:
    def __init__(self) -> None:
        self._base: dict[int, tuple[Ints, npt.NDArray[np.int32]]] = {}
        """Per kind: the load's scope ids of that kind, ascending, and their slots in the same order."""
        self._added: dict[tuple[int, int], list[int]] = {}
        """(kind, scope id) -> slots appended since the load."""
        self._added_by_kind: dict[int, list[int]] = {}
        """Kind -> slots appended since the load (a kind's wildcard reads them without walking every scope)."""
        self._added_count = 0
        self._added_bytes = 0

    @classmethod
    def of_load(cls, kinds: npt.NDArray[np.int8], scope_ids: Ints) -> ScopeSlots:
        """The scopes of the load's slots 0..n-1."""
        found = cls()
        order = np.lexsort((scope_ids, kinds))
        sorted_kinds = kinds[order]
        for kind in np.unique(sorted_kinds).tolist():
            start, end = np.searchsorted(sorted_kinds, [kind, kind + 1])
            part = order[start:end]
            found._base[int(kind)] = (scope_ids[part].astype(np.int64), part.astype(np.int32))
        return found

    def add(self, kinds: Iterable[int], scope_ids: Iterable[int], slots: Iterable[int]) -> None:
        for kind, scope_id, slot in zip(kinds, scope_ids, slots, strict=True):
            listed = self._added.get((kind, scope_id))
            if listed is None:
                listed = self._added[(kind, scope_id)] = []
                self._added_bytes += SCOPE_BYTES
            listed.append(slot)
            self._added_by_kind.setdefault(kind, []).append(slot)
            self._added_count += 1

    def slots(self, refs: Iterable[ScopeRef]) -> Ints:
        """Every slot (live or not) whose scope one of ``refs`` names (a ref without an id: every id of its kind).
        A slot repeats when two refs name its scope (a kind's wildcard beside one of its ids, a scope named twice):
        the caller removes repeats where they matter, after dropping dead slots (sorting a million slots on every
        search to remove them here would cost more than the search)."""
        parts: list[npt.NDArray[np.integer]] = []
        for ref in refs:
            kind = SCOPE_KINDS[ref.scope.value]
            base = self._base.get(kind)
            if base is not None:
                ids, slots = base
                if ref.scope_id is None:
                    parts.append(slots)
                else:
                    start = np.searchsorted(ids, ref.scope_id, side="left")
                    end = np.searchsorted(ids, ref.scope_id, side="right")
                    parts.append(slots[start:end])
            if ref.scope_id is None:
                parts.append(np.array(self._added_by_kind.get(kind, ()), np.int64))
            elif (added := self._added.get((kind, ref.scope_id))) is not None:
                parts.append(np.array(added, np.int64))
        if not parts:
            return np.empty(0, np.int64)
        return np.concatenate(parts).astype(np.int64, copy=False)

    @property
    def nbytes(self) -> int:
        base = sum(ids.nbytes + slots.nbytes for ids, slots in self._base.values())
        return base + ADDED_BYTES * self._added_count + self._added_bytes
