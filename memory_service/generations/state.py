"""This instance's view of the database's embedding generations, and the embedders it has for them.

An instance is configured with a model (``EMBEDDING_*``) and, to move the database, a next one
(``EMBEDDING_NEXT_*``); the database says which of them is current (``storage.generations_sql``). Roles follow the
database, not the configuration: after a cut-over the next model embeds searches and the configured one is the
"other" generation, still written so a rollback loses nothing. ``current`` is one EmbeddingService whose provider
is switched when the database's current model changes, so the servicers, the search engine and the write paths that
hold it follow; ``other`` embeds the other generation's vectors (None when this instance lacks that model).

The state is re-read every ``REFRESH_SECONDS`` and at once when a statement fails its generation check
(GenerationChanged): no statement ever runs against a generation other than the one it was planned for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime

from memory_service.embeddings.base import EmbeddingProvider
from memory_service.embeddings.service import EmbeddingService
from memory_service.errors import DatabaseConflict, EmbeddingConfigMismatch, FailedPrecondition
from memory_service.generations.gate import SearchSample
from memory_service.generations.types import GenerationState, ModelSpec
from memory_service.memories.binding import ModelBinding
from memory_service.models import Vector
from memory_service.storage import generations_sql
from memory_service.storage.database import Database

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0
"""How often an idle instance re-reads the generation state (a statement notices a change at once)."""
WRITE_ATTEMPTS = 3
"""Runs of one write when the embedding generation changes under it (a cut-over and a rollback in quick
succession): each run embeds for the generation it then names."""


@dataclasses.dataclass(frozen=True)
class Writing:
    """What a write stores, fixed before it embeds: the generation and the embedders of its two columns."""

    epoch: int
    current: EmbeddingService
    other: EmbeddingService | None
    """Embeds the other generation's vector during a move; None when there is none or this instance lacks it
    (the backfill then fills the memory)."""

    async def others(self, values: Sequence[str], hashes: Sequence[bytes]) -> list[Vector | None]:
        """The other generation's vectors of these contents (the embedding cache spares repeated ones)."""
        if self.other is None:
            return [None] * len(values)
        return list(await self.other.embed(values, hashes))


def spec_of(provider: EmbeddingProvider) -> ModelSpec:
    return ModelSpec(provider=provider.name, model=provider.model, dimension=provider.dimension)


def what_to_set(model: ModelSpec) -> str:
    """The settings that name ``model``, as an operator types them."""
    provider = model.provider or "<its provider>"
    path = " (and EMBEDDING_MODEL_PATH for a local model kept in a directory)" if model.provider == "local" else ""
    return f"EMBEDDING_PROVIDER={provider} EMBEDDING_MODEL={model.model} EMBEDDING_DIM={model.dimension}{path}"


def check_configuration(state: GenerationState, configured: ModelSpec, next_model: ModelSpec | None) -> str | None:
    """Why this configuration cannot serve the database in ``state``; None when it can."""
    current = state.current
    if current is None:
        return None
    move = state.move
    if move is None:
        if configured.same(current):
            return None
        if configured.same(state.finished.source if state.finished else None) or (
            next_model is not None and next_model.same(current)
        ):
            return (
                f"this database has moved to {current.describe()} (model finish): set {what_to_set(current)} "
                "and unset EMBEDDING_NEXT_PROVIDER, EMBEDDING_NEXT_MODEL, EMBEDDING_NEXT_DIM, EMBEDDING_NEXT_MODEL_PATH"
            )
        return ""  # the plain binding mismatch
    models = [m for m in (configured, next_model) if m is not None]
    strangers = [m for m in models if not (m.same(move.source) or m.same(move.target))]
    if strangers:
        return (
            f"this database is moving from {move.source.describe()} to {move.target.describe()}, and "
            f"{strangers[0].describe()} is neither: configure EMBEDDING_* as the first and EMBEDDING_NEXT_* as the "
            "second (memory-service model status shows the move; model rollback and model finish end it)"
        )
    if not any(m.same(current) for m in models):
        return (
            f"this database searches with {current.describe()} since its cut-over: configure it as EMBEDDING_NEXT_* "
            f"({what_to_set(current).replace('EMBEDDING_', 'EMBEDDING_NEXT_')}), keeping EMBEDDING_* as it was"
        )
    return None


class Generations:
    def __init__(
        self,
        db: Database,
        current: EmbeddingService,
        providers: Mapping[tuple[str, int], EmbeddingProvider],
        binding: ModelBinding,
        *,
        configured: ModelSpec,
        next_model: ModelSpec | None,
    ) -> None:
        self._db = db
        self.current = current
        """Embeds the current generation's vectors and every search query."""
        self.other: EmbeddingService | None = None
        """Embeds the other generation's vectors during a move; None when this instance lacks that model."""
        self._providers = dict(providers)
        self._binding = binding
        self.configured = configured
        self.next_model = next_model
        self.state = GenerationState()
        self._listeners: list[Callable[[GenerationState], Awaitable[None]]] = []
        self._refreshing: asyncio.Lock = asyncio.Lock()
        self.searches = SearchSample()
        """Recent searches of this instance, for the quality gate; kept only while a move is under way."""

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def on_change(self, listener: Callable[[GenerationState], Awaitable[None]]) -> None:
        """Call ``listener`` after each change of the state this instance sees (index state, query samples)."""
        self._listeners.append(listener)

    def _provider(self, model: ModelSpec | None) -> EmbeddingProvider | None:
        return None if model is None else self._providers.get((model.model, model.dimension))

    async def start(self) -> bool:
        """At start-up: refuse a configuration that cannot serve the database (one line saying what to set), begin
        a move when a next model is configured, and return whether the database is bound to a model yet."""
        async with self._db.connection() as conn:
            state = await generations_sql.read_state(conn)
        problem = check_configuration(state, self.configured, self.next_model)
        if problem == "":
            assert state.current is not None
            raise EmbeddingConfigMismatch(self._binding.mismatch((state.current.model, state.current.dimension)))
        if problem is not None:
            raise EmbeddingConfigMismatch(problem)
        if state.current is not None and not state.current.provider:
            async with self._db.transaction() as conn:
                await generations_sql.record_provider(conn, self.configured.provider)
        if self.next_model is not None and state.current is None:
            log.warning(
                "EMBEDDING_NEXT_PROVIDER is set but nothing is stored yet: the first stored memory binds the "
                "database to %s, and the move to the next model begins after it",
                self.configured.describe(),
            )
        state = await self._begin_when_due(state)
        await self._apply(state)
        return state.current is not None

    async def _begin_when_due(self, state: GenerationState) -> GenerationState:
        """Begin the move to the next model when one is configured, the database holds the configured model and
        no move is under way; a begin that could not get its lock is tried again at the next refresh."""
        nxt = self.next_model
        if nxt is None or state.move is not None or not self.configured.same(state.current) or nxt.same(state.current):
            return state
        try:
            async with self._db.transaction() as conn:
                state = await generations_sql.begin(conn, self.configured, nxt, datetime.now(UTC))
        except DatabaseConflict as exc:
            log.warning("the move to %s begins at the next refresh: %s", nxt.describe(), exc)
            return state
        if state.move is not None and state.move.target.same(nxt):
            log.info(
                "moving this database's embeddings from %s to %s: every write stores both, and the backfill "
                "re-embeds the rest (memory-service model status)",
                state.move.source.describe(),
                state.move.target.describe(),
            )
        return state

    async def refresh(self) -> GenerationState:
        """Re-read the state; apply it (and tell the listeners) when it changed."""
        async with self._refreshing:
            async with self._db.connection() as conn:
                state = await generations_sql.read_state(conn)
            state = await self._begin_when_due(state)
            if state != self.state:
                await self._apply(state)
        return self.state

    async def _apply(self, state: GenerationState) -> None:
        current = self._provider(state.current) if state.current is not None else self._provider(self.configured)
        if current is None:
            # Configured without the current model while running (another instance cut over): searches and
            # writes refuse until it is configured; the state is kept so that they can say why.
            log.warning("this instance has no provider for the current embedding model %s", state.current)
        else:
            self.current.use(current)
        other = self._provider(state.other)
        if other is None:
            self.other = None
        elif self.other is None or self.other.provider is not other:
            self.other = EmbeddingService(other, self.current.db, self.current.metrics)
        changed = state.epoch != self.state.epoch
        self.state = state
        self.searches.active = state.move is not None and self.other is not None
        if state.move is None:
            self.searches.clear()
        if state.current is not None:
            self._binding.mark_bound()
        if changed:
            log.info("embedding generation %d: %s", state.epoch, state.phase)
            for listener in self._listeners:
                await listener(state)

    def writing(self) -> Writing:
        """The generation a write starts in; refused when this instance cannot embed its current model."""
        self.check_current()
        return Writing(epoch=self.epoch, current=self.current, other=self.other)

    def check_current(self) -> None:
        """Refuse work when this instance cannot embed with the database's current model."""
        current = self.state.current
        if current is not None and not spec_of(self.current.provider).same(current):
            raise FailedPrecondition(
                f"this database searches with {current.describe()}, which this server is not configured with: "
                f"set {what_to_set(current)} (or as EMBEDDING_NEXT_* during a move) and restart it"
            )

    async def close(self) -> None:
        for provider in self._providers.values():
            await provider.close()
