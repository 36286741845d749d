"""The database's embedding model and dimension: checked at start-up, recorded at the first stored embedding.

A database holds vectors of one model and one dimension, or searches would compare incomparable vectors. The pair
is recorded in memory.settings, and the embedding column typed ``vector(D)``, by the first write that stores an
embedding, not by the first start: a server that started once and stored nothing can be restarted with any model.
Once bound, a server configured otherwise refuses to start, and says where the data lives and how to start over.
"""

from __future__ import annotations

import logging

from memory_service.errors import EmbeddingConfigMismatch, FailedPrecondition
from memory_service.storage import settings_sql
from memory_service.storage.database import Connection, Database
from memory_service.tenants import guard

log = logging.getLogger(__name__)


class ModelBinding:
    def __init__(self, db: Database, *, model: str, dimension: int, location: str, start_over: str) -> None:
        """``location`` says where the data lives, ``start_over`` how to get an empty database instead."""
        self._db = db
        self.model = model
        self.dimension = dimension
        self._location = location
        self._start_over = start_over
        self._bound = False
        """Set once a committed binding to this pair has been seen; bindings are never undone."""

    def mismatch(self, stored: tuple[str, int]) -> str:
        return (
            f"{self._location} stores embeddings of model {stored[0]!r} with dimension {stored[1]}, but the server "
            f"is configured with model {self.model!r} and dimension {self.dimension} (EMBEDDING_PROVIDER, "
            f"EMBEDDING_MODEL, EMBEDDING_DIM): configure the stored pair again, or {self._start_over}"
        )

    async def check(self) -> bool:
        """At start-up: raise EmbeddingConfigMismatch when bound to another pair; return whether bound at all."""
        async with self._db.connection() as conn:
            stored = await settings_sql.read_binding(conn)
        if stored is None:
            log.info(
                "no embedding stored yet: the first stored memory binds this database to %s (%d dimensions)",
                self.model,
                self.dimension,
            )
            return False
        if stored != (self.model, self.dimension):
            raise EmbeddingConfigMismatch(self.mismatch(stored))
        self._bound = True
        return True

    def mark_bound(self) -> None:
        """The database is bound (seen by the generation state): writes need not check again."""
        self._bound = True

    async def ensure(self, conn: Connection) -> bool:
        """First statement of a write transaction that stores embeddings: bind when unbound, refuse another pair.

        Returns True when this transaction did the binding; pass that to ``committed`` after the commit.
        """
        if self._bound:
            return False
        if guard.scoped():
            # Binding alters the table, which only its owner may: done in a transaction of its own, before this one
            # writes anything.
            with guard.maintenance():
                await self.bind_now()
            return False
        stored, bound_now = await settings_sql.bind_if_unbound(conn, self.model, self.dimension)
        if stored != (self.model, self.dimension):
            # Another instance, configured otherwise, stored first while this one was running.
            raise FailedPrecondition(self.mismatch(stored))
        self._bound = not bound_now  # a binding of this transaction counts once it has committed
        return bound_now

    async def committed(self, bound_now: bool) -> None:
        """After the commit of a transaction whose ``ensure`` bound the database."""
        if not bound_now or self._bound:
            return
        self._bound = True
        log.info("bound this database to %s (%d dimensions)", self.model, self.dimension)
        # The column's type changed: statements that pooled connections prepared before it would fail once each.
        await self._db.expire_connections()

    async def bind_now(self) -> None:
        """Bind at once, for loaders that copy rows in behind the service's back (benchmarks, tests)."""
        async with self._db.transaction() as conn:
            bound_now = await self.ensure(conn)
        await self.committed(bound_now)
