"""Everything behind the transport: database, embedder, domain services and background work.

The gRPC servicers and the CLI both drive a Runtime; it knows nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import logging

from memory_service.config import Settings
from memory_service.metrics import Metrics
from memory_service.storage.database import Database
from memory_service.storage.embedded import EmbeddedPostgres
from memory_service.storage.migrations import apply_migrations

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.embedded: EmbeddedPostgres | None = None
        self._db: Database | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("the runtime is not started")
        return self._db

    async def start(self) -> None:
        try:
            dsn = await self._database_dsn()
            if self.settings.migrate_on_start:
                applied = await apply_migrations(dsn)
                log.info("migrations: %s", ", ".join(applied) if applied else "up to date")
            self._db = await Database.connect(
                dsn, min_size=self.settings.database_pool_min, max_size=self.settings.database_pool_max
            )
            self.metrics.watch_pool(self._db.pool_size, self._db.pool_idle)
        except BaseException:
            await self.close()
            raise

    async def _database_dsn(self) -> str:
        if self.settings.database_url is not None:
            return self.settings.database_url
        self.embedded = EmbeddedPostgres(self.settings.data_dir)
        log.info("DATABASE_URL is unset: using the embedded PostgreSQL in %s", self.embedded.pgdata)
        return await asyncio.to_thread(self.embedded.start)

    async def close(self) -> None:
        """Stop background work, then close the pool, then the embedded database. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._db is not None:
            await self._db.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
