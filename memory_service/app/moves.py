"""The runtime's share of a move between embedding models (docs/model-migration.md): the start-up steps and the
parts that run beside the search engine (the other generation's index care, the backfill, the figures' refresh).

Kept apart from ``runtime`` so the order of the steps reads in one place: check the configuration against the
database before any model is loaded, load one provider per configured model, then let the generation state decide
which of them embeds searches.
"""

from __future__ import annotations

import asyncio
import os
import socket

from memory_service.config.settings import Settings
from memory_service.embeddings.factory import create_provider, hybrid_alpha
from memory_service.embeddings.service import EmbeddingService
from memory_service.errors import EmbeddingConfigMismatch
from memory_service.generations import admin
from memory_service.generations.backfill import BackfillWorker
from memory_service.generations.state import Generations, check_configuration, spec_of
from memory_service.generations.types import GenerationState, ModelSpec, MoveStatus, Phase
from memory_service.leases.manager import LeaseManager
from memory_service.memories.binding import ModelBinding
from memory_service.metrics import Metrics
from memory_service.search import SearchEngine
from memory_service.search.index_care import IndexCare
from memory_service.storage import generations_sql
from memory_service.storage.database import Database


def models(settings: Settings) -> tuple[ModelSpec, Settings | None, ModelSpec | None]:
    """The configured model, the next model's settings (None when no move is configured) and its spec."""
    configured = ModelSpec(settings.embedding_provider, settings.embedding_model, settings.embedding_dim)
    nxt = settings.next_embedding()
    next_model = None if nxt is None else ModelSpec(nxt.embedding_provider, nxt.embedding_model, nxt.embedding_dim)
    return configured, nxt, next_model


async def start_generations(db: Database, binding: ModelBinding, settings: Settings, metrics: Metrics) -> Generations:
    """The generation state with an embedder per configured model; refuses, in one line saying what to set, a
    configuration that cannot serve the database (before loading a model, which can take seconds)."""
    configured, nxt, next_model = models(settings)
    async with db.connection() as conn:
        stored = await generations_sql.read_state(conn)
    problem = check_configuration(stored, configured, next_model)
    if problem == "" and stored.current is not None:
        raise EmbeddingConfigMismatch(binding.mismatch((stored.current.model, stored.current.dimension)))
    if problem:
        raise EmbeddingConfigMismatch(problem)
    # Loading a local model reads and compiles it (or downloads it once): not on the event loop.
    provider = await asyncio.to_thread(create_provider, settings, metrics)
    providers = {(provider.model, provider.dimension): provider}
    if nxt is not None:
        try:
            next_provider = await asyncio.to_thread(create_provider, nxt, metrics)
        except BaseException:
            await provider.close()
            raise
        providers[(next_provider.model, next_provider.dimension)] = next_provider
    generations = Generations(
        db,
        EmbeddingService(provider, db, metrics),
        providers,
        binding,
        configured=spec_of(provider),
        next_model=next_model,
    )
    try:
        await generations.start()
    except BaseException:
        await generations.close()
        raise
    return generations


class ModelMoves:
    """The generation state, the other generation's index care and the backfill of one instance."""

    def __init__(
        self,
        generations: Generations,
        index: IndexCare,
        leases: LeaseManager,
        settings: Settings,
        stopping: asyncio.Event,
    ) -> None:
        self._db = db = generations.current.db
        self._settings = settings
        self._metrics = metrics = generations.current.metrics
        self.generations = generations
        other_index = index.for_column("embedding_alt")
        self.other_index = other_index
        """The vector index of a move's other generation (column ``embedding_alt``)."""
        self.backfill = BackfillWorker(
            db,
            generations,
            leases,
            metrics,
            batch=settings.model_backfill_batch,
            rate=settings.model_backfill_rate,
            instance=f"{socket.gethostname()}:{os.getpid()}",
            stopping=stopping,
        )

    def follow(self, search: SearchEngine, index: IndexCare) -> None:
        """At a cut-over, rollback or finish the column ``embedding`` holds another model's vectors: the search
        engine drops its sample of query vectors and takes the model's fusion weight, both indexes are re-read."""

        async def changed(state: GenerationState) -> None:
            search.seen_reset()
            search.hybrid_alpha = hybrid_alpha(self._settings, self.generations.current.provider)
            await index.refresh()
            await self.other_index.refresh()

        self.generations.on_change(changed)

    async def status(self) -> MoveStatus:
        return await admin.status(self._db, self.other_index)

    async def refresh(self) -> None:
        """Re-read the embedding generation and publish the move's figures as metrics."""
        await self.generations.refresh()
        admin.publish(self._metrics, await self.status())

    async def maintain_indexes(self, index: IndexCare) -> str:
        """The current generation's index; during a move, the other one's once its backfill is complete."""
        done = await index.maintain()
        other = await maintain_other_index(self._db, self.generations, self.other_index)
        return done if other is None else f"{done}; next generation: {other}"

    async def close(self) -> None:
        await self.generations.close()


async def maintain_other_index(db: Database, generations: Generations, other_index: IndexCare) -> str | None:
    """During a move, build (and calibrate) the other generation's index once its backfill is complete, so that a
    cut-over searches an index ready for it; None when there is nothing to maintain."""
    move = generations.state.move
    if move is None:
        return None
    async with db.connection() as conn:
        _, backfill, _, _ = await generations_sql.read_progress(conn)
    if (backfill is not None and backfill.complete) or move.phase is Phase.CUT_OVER:
        return await other_index.maintain()
    return None
