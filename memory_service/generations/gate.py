"""The quality gate of a move: how different the next model's answers are, measured before switching to it.

Two samples, each searched exactly in both generations (top 10): recent real searches (their texts embedded by
each model) and stored memories (each generation's own vector of the memory as the query, the memory itself left
out). For each, the mean overlap@10 of the two answers and the share whose first hit changed. The searches are
this instance's own, kept in memory as the calibration's are (``search.query_sample``): their texts are users'
words and are never written anywhere; only the figures are stored, for ``model status``, Stats and the metrics.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from datetime import UTC, datetime

from memory_service.embeddings.service import EmbeddingService
from memory_service.generations.types import Gate, GateFigures
from memory_service.models import MemoryFilter, Vector
from memory_service.storage import calibration_sql, generations_sql, index_sql
from memory_service.storage.database import Connection, Database

TOP = 10
SEARCHES = 100
"""Recent searches kept (a uniform sample of those made while a move is under way)."""
MEMORIES = 50
"""Stored memories a gate uses as queries."""
Answers = tuple[list[int], list[int]]


@dataclasses.dataclass(frozen=True)
class SeenSearch:
    text: str
    memory_filter: MemoryFilter


class SearchSample:
    """A reservoir of recent search texts with their filters (algorithm R)."""

    def __init__(self, capacity: int = SEARCHES, *, seed: int | None = None) -> None:
        self._capacity = capacity
        self._rng = random.Random(seed)
        self.items: list[SeenSearch] = []
        self.offered = 0
        self.active = False
        """Only searches made while a move is under way are kept."""

    def record(self, text: str, memory_filter: MemoryFilter) -> None:
        if not self.active:
            return
        self.offered += 1
        item = SeenSearch(text, memory_filter)
        if len(self.items) < self._capacity:
            self.items.append(item)
        elif (slot := self._rng.randrange(self.offered)) < self._capacity:
            self.items[slot] = item

    def clear(self) -> None:
        self.items.clear()
        self.offered = 0


def _figures(pairs: Sequence[Answers]) -> GateFigures | None:
    measured = [(a, b) for a, b in pairs if a and b]
    if not measured:
        return None
    overlap = sum(len(set(a[:TOP]) & set(b[:TOP])) / min(TOP, len(a), len(b)) for a, b in measured)
    changed = sum(1 for a, b in measured if a[0] != b[0])
    return GateFigures(
        queries=len(measured),
        overlap_at_10=round(overlap / len(measured), 4),
        top_hit_changed=round(changed / len(measured), 4),
    )


async def measure(
    db: Database,
    *,
    generation: int,
    current: EmbeddingService,
    other: EmbeddingService,
    searches: Sequence[SeenSearch],
    memories: int = MEMORIES,
) -> Gate:
    """Compare the generations on ``searches`` and on about ``memories`` stored memories (those that have both
    vectors), at ``generation``: a change of generation meanwhile fails it (GenerationChanged)."""

    async def compare(a: Vector, b: Vector, memory_filter: MemoryFilter, leave_out: int | None) -> Answers:
        async with db.connection() as conn:
            return (
                await _nearest(conn, "embedding", a, memory_filter, generation=generation, leave_out=leave_out),
                await _nearest(conn, "embedding_alt", b, memory_filter, generation=generation, leave_out=leave_out),
            )

    search_pairs = [
        await compare(
            await current.embed_query(seen.text), await other.embed_query(seen.text), seen.memory_filter, None
        )
        for seen in searches
    ]
    async with db.connection() as conn:
        rows = await index_sql.estimated_rows(conn)
        sample = await generations_sql.sample_pairs(conn, memories, rows=rows) if memories else []
    memory_pairs = [await compare(a, b, MemoryFilter(), memory_id) for memory_id, a, b in sample]
    return Gate(searches=_figures(search_pairs), memories=_figures(memory_pairs), computed_at=datetime.now(UTC))


async def _nearest(
    conn: Connection,
    column: str,
    vector: Vector,
    memory_filter: MemoryFilter,
    *,
    generation: int,
    leave_out: int | None,
) -> list[int]:
    ids = await calibration_sql.nearest(
        conn, memory_filter, vector, limit=TOP + 1, exact=True, column=column, generation=generation
    )
    return [i for i in ids if i != leave_out][:TOP]
