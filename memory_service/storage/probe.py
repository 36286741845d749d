"""A cheap, independent check that PostgreSQL answers, for the health status.

It keeps one connection of its own instead of borrowing from the pool: a pool busy with slow queries is not a
database that is down, and a probe queued behind them would report it as one.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger(__name__)


class DatabaseProbe:
    """``SELECT 1`` on a dedicated connection, reconnecting after any failure."""

    def __init__(self, dsn: str, *, timeout: float) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._conn: asyncpg.Connection | None = None
        self.last_error = ""

    async def check(self) -> bool:
        """Whether the database answered within the timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(self._dsn)
                await self._conn.fetchval("SELECT 1")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}".strip()
            await self.close()
            return False
        return True

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # never waits on a peer that may be gone
