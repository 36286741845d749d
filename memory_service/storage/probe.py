"""Cheap, independent checks of the database for the health monitor: does it answer, and does it accept writes.

The probe keeps one connection of its own instead of borrowing from the pool: a pool busy with slow queries is not
a database that is down, and a probe queued behind them would report it as one.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import asyncpg

from memory_service.errors import MemoryServiceError

log = logging.getLogger(__name__)


class WriteRefusals:
    """Whether the database refuses writes, as episodes: one begins at the first refused call and is logged once;
    it ends when a write probe succeeds (``Database.writes_resumed``), logged once too. Calls refused meanwhile
    answer UNAVAILABLE or RESOURCE_EXHAUSTED without a line each."""

    def __init__(self) -> None:
        self.since: datetime | None = None
        """When the current episode began (None: writes are accepted, as far as this instance knows)."""
        self.reason = ""
        """The first refusal of the episode, as an operator reads it."""
        self.count = 0
        """Calls refused in the current episode."""

    @property
    def active(self) -> bool:
        return self.since is not None

    def refused(self, error: MemoryServiceError) -> None:
        self.count += 1
        if self.since is None:
            self.since, self.reason = datetime.now(UTC), str(error)
            log.warning("the database refuses writes from now on (logged once until it accepts them again): %s", error)

    def ended(self) -> None:
        if self.since is not None:
            log.warning(
                "the database accepts writes again, after %.0fs and %d refused call(s)",
                (datetime.now(UTC) - self.since).total_seconds(),
                self.count,
            )
        self.since, self.reason, self.count = None, "", 0


# Only sent while writes are being refused, on a fresh session, to learn when they are accepted again. A new table
# of a few pages needs new space (rewriting a row could fit in a page's free space while the disk is full) and is
# refused in a read-only transaction; being temporary, it leaves nothing behind and touches no table of the service.
_WRITE_PROBE = "CREATE TEMP TABLE memory_write_probe AS SELECT g FROM generate_series(1, 2000) g"


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

    async def check_writes(self) -> bool:
        """Whether a new session can write (a fresh connection: a session's read-only default is read at its
        start, so the probe's own long-lived connection could not tell)."""
        try:
            async with asyncio.timeout(self._timeout):
                conn = await asyncpg.connect(self._dsn)
                try:
                    await conn.execute(_WRITE_PROBE)
                finally:
                    conn.terminate()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}".strip()
            return False
        return True
