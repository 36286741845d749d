"""Where the data lives: the server DATABASE_URL names, or the embedded PostgreSQL in MEMORY_SERVICE_DATA_DIR.

Start-up errors and the model binding's refusal tell an operator which database they mean and how to start over;
the two kinds of place need different words for both, and only the embedded one is started and stopped here.
"""

from __future__ import annotations

import asyncio
import logging

from memory_service.config.env import redact_url
from memory_service.config.settings import Settings
from memory_service.storage.embedded import EmbeddedPostgres

log = logging.getLogger(__name__)


class DatabasePlace:
    """The database a runtime uses: ``open`` gives its DSN (starting the embedded server when there is no URL)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.embedded: EmbeddedPostgres | None = None
        self.dsn = ""

    async def open(self) -> str:
        if self._settings.database_url is not None:
            self.dsn = self._settings.database_url
            return self.dsn
        self.embedded = EmbeddedPostgres(self._settings.data_dir)
        log.info("DATABASE_URL is unset: using the embedded PostgreSQL in %s", self.embedded.pgdata)
        self.dsn = await asyncio.to_thread(self.embedded.start)
        return self.dsn

    @property
    def named_by(self) -> str:
        """How an unreachable database is named in the one line start-up prints."""
        if self.embedded is not None:
            return f"embedded in {self.embedded.data_dir} (MEMORY_SERVICE_DATA_DIR)"
        return "named by DATABASE_URL"

    def where(self) -> tuple[str, str]:
        """Where the data lives, and how to start over with an empty database, as an operator reads them."""
        if self.embedded is not None:
            data_dir = self.embedded.data_dir
            return (
                f"the embedded database in {data_dir} (MEMORY_SERVICE_DATA_DIR)",
                "start over with an empty database: set MEMORY_SERVICE_DATA_DIR to a new directory, or stop the "
                f"server and move {data_dir} away (deleting it deletes every memory)",
            )
        return (
            f"the database {redact_url(self.dsn)} (DATABASE_URL)",
            "start over with an empty database: point DATABASE_URL at a new database, or drop the schema memory "
            "of this one (DROP SCHEMA memory CASCADE deletes every memory)",
        )

    async def close(self) -> None:
        """Stop the embedded server, if this place started one; a server named by URL is not ours to stop."""
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
