"""The values of a move from one embedding model to another: the models, the move's phase, its backfill and gate.

They import nothing of the service, so storage (``storage.generations_sql``) returns them and the domain, the CLI
and the converters share them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One generation's model. Two generations are the same when model and dimension are (the provider is kept
    to tell an operator what to configure)."""

    provider: str
    model: str
    dimension: int

    def same(self, other: ModelSpec | None) -> bool:
        return other is not None and (self.model, self.dimension) == (other.model, other.dimension)

    def describe(self) -> str:
        provider = f"{self.provider} " if self.provider else ""
        return f"{provider}{self.model!r} ({self.dimension} dimensions)"

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model, "dimension": self.dimension}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(provider=str(data.get("provider", "")), model=str(data["model"]), dimension=int(data["dimension"]))


class Phase(enum.Enum):
    BACKFILLING = "backfilling"
    """Searches use the source model; the target's vectors are written by every write and backfilled."""
    CUT_OVER = "cut_over"
    """Searches use the target model; the source's vectors are still written, so a rollback loses nothing."""


@dataclasses.dataclass(frozen=True)
class Move:
    source: ModelSpec
    target: ModelSpec
    phase: Phase
    started_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source.to_json(),
            "target": self.target.to_json(),
            "phase": self.phase.value,
            "started_at": self.started_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Move:
        return cls(
            source=ModelSpec.from_json(data["source"]),
            target=ModelSpec.from_json(data["target"]),
            phase=Phase(data["phase"]),
            started_at=datetime.fromisoformat(data["started_at"]),
        )


@dataclasses.dataclass(frozen=True)
class GenerationState:
    """Which model the column ``embedding`` holds (searches use it), and the move under way, if any.

    ``epoch`` counts the changes (begin, cut-over, rollback, finish): every statement that touches vectors names
    the epoch it was planned for and fails when it is no longer the database's."""

    epoch: int = 0
    current: ModelSpec | None = None
    """None until the first stored embedding binds the database."""
    move: Move | None = None
    finished: Move | None = None
    """The last finished move: a server configured with its source is told what to set instead."""

    @property
    def other(self) -> ModelSpec | None:
        """The model of the column ``embedding_alt``: the target while backfilling, the source after cut-over."""
        if self.move is None:
            return None
        return self.move.target if self.move.phase is Phase.BACKFILLING else self.move.source

    @property
    def phase(self) -> str:
        return "steady" if self.move is None else self.move.phase.value


@dataclasses.dataclass(frozen=True)
class Backfill:
    """The re-embedding's checkpoint and progress; written in the same transaction as the rows it covers."""

    after_id: int = 0
    """The last memory id the current pass has written (or skipped): a restart goes on after it."""
    passes: int = 0
    """Finished passes; each pass after the first picks up what writes without the next model left empty."""
    total: int = 0
    """Memories when the current pass began."""
    done: int = 0
    """Of them, those with a vector of the other generation (exact at the start of a pass, counted on since)."""
    rate: float = 0.0
    """Memories written per second, recently."""
    complete: bool = False
    """A whole pass found nothing left to write; ``model cutover`` checks again under a lock."""
    updated_at: datetime | None = None
    holder: str = ""

    @property
    def eta_seconds(self) -> float | None:
        if self.complete:
            return 0.0
        if self.rate <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate

    def to_json(self) -> dict[str, Any]:
        return {
            "after_id": self.after_id,
            "passes": self.passes,
            "total": self.total,
            "done": self.done,
            "rate": self.rate,
            "complete": self.complete,
            "updated_at": None if self.updated_at is None else self.updated_at.isoformat(),
            "holder": self.holder,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Backfill:
        updated = data.get("updated_at")
        return cls(
            after_id=int(data["after_id"]),
            passes=int(data["passes"]),
            total=int(data["total"]),
            done=int(data["done"]),
            rate=float(data["rate"]),
            complete=bool(data["complete"]),
            updated_at=None if updated is None else datetime.fromisoformat(updated),
            holder=str(data.get("holder", "")),
        )


@dataclasses.dataclass(frozen=True)
class GateFigures:
    """How different the two generations' answers are, on one kind of sample."""

    queries: int
    overlap_at_10: float
    """Mean share of the top 10 that both generations return."""
    top_hit_changed: float
    """Share of the queries whose first hit differs."""

    def to_json(self) -> dict[str, Any]:
        return {"queries": self.queries, "overlap_at_10": self.overlap_at_10, "top_hit_changed": self.top_hit_changed}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GateFigures:
        return cls(
            queries=int(data["queries"]),
            overlap_at_10=float(data["overlap_at_10"]),
            top_hit_changed=float(data["top_hit_changed"]),
        )


@dataclasses.dataclass(frozen=True)
class Gate:
    """The quality gate: the generations compared on recent real searches and on stored memories as queries."""

    searches: GateFigures | None
    memories: GateFigures | None
    computed_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "searches": None if self.searches is None else self.searches.to_json(),
            "memories": None if self.memories is None else self.memories.to_json(),
            "computed_at": self.computed_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Gate:
        searches, memories = data.get("searches"), data.get("memories")
        return cls(
            searches=None if searches is None else GateFigures.from_json(searches),
            memories=None if memories is None else GateFigures.from_json(memories),
            computed_at=datetime.fromisoformat(data["computed_at"]),
        )


@dataclasses.dataclass(frozen=True)
class MoveStatus:
    """What ``model status``, Stats and the metrics show."""

    state: GenerationState
    backfill: Backfill | None
    gate: Gate | None
    next_index: str
    """The next generation's vector index: "none", "building", or its kind once built and calibrated."""
