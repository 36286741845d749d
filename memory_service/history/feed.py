"""The change stream: which part of the change log is final, and Watch streams that deliver it.

Change-log rows get their ``seq`` before their transaction commits, so a reader that follows "the highest seq
seen" would skip a transaction that commits late with a lower seq. The feed delivers only up to a *frontier*
below which nothing can still appear: it reads the highest seq handed out, then draws a transaction id; once the
transactions of this database that were running with older ids have ended, that seq is final
(``changes_sql.frontier_probe``). Watchers deliver
rows with ``cursor < seq <= frontier`` in seq order, so a client that resumes with the seq of the last change it
received gets every later change exactly once, on any instance, after any restart. Writes to one memory are
serialised by its row lock and each draws its seq after taking it, so seq order is commit order per memory.

LISTEN/NOTIFY only wakes an idle feed early (writers notify only while some instance's feed waits for it); a busy
feed polls.
One feed per instance probes the frontier for all of its watchers, on its own connection, and each watcher holds at
most one page of changes, writing each through gRPC flow control: a slow watcher is slowed, never buffered without
bound.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from memory_service import pagination
from memory_service.errors import WRITES_REFUSED, FailedPrecondition, MemoryServiceError, Unavailable
from memory_service.history.types import Change
from memory_service.metrics import Metrics
from memory_service.models import MemoryFilter
from memory_service.storage import changes_sql, history_sql
from memory_service.storage.database import Database
from memory_service.tenants import guard

log = logging.getLogger(__name__)

PENDING_RECHECK = 0.02
"""Seconds between frontier probes while transactions hold it back; they usually commit within milliseconds."""

MIN_PROBE_GAP = 0.02
"""Seconds between probes however often NOTIFY wakes the feed. With no watcher on an instance, its feed does not
probe at all."""

ACTIVE_FOR = 1.0
"""Seconds a feed keeps polling every MIN_PROBE_GAP after it last saw a new change. While every feed with watchers
polls so, writers skip NOTIFY (it serialises their commits: a sixth to a third of Store throughput, measured); a
feed that has seen nothing new for this long goes back to waiting for NOTIFY, with WATCH_POLL_INTERVAL as the
fallback."""

ANNOUNCE_EVERY = 20.0
"""Seconds between refreshes of this instance's row in memory.watch_listeners while it has watchers (writers stop
counting a row after a minute)."""

MAX_PENDING = 64
"""Frontier candidates kept while a long transaction holds them all back; beyond it the newest is replaced, which
only delays delivery."""

_LEGACY_PREFIX = "w1:"
"""Cursors of earlier versions were base64 of ``w1:<seq>``; clients keep cursors across restarts, so those still
resume (range-checked like any other)."""


def encode_cursor(seq: int) -> str:
    return pagination.WATCH.encode(seq)


def decode_cursor(token: str) -> int:
    """The log position after which to start; "" starts at the oldest change the log still holds."""
    legacy = _legacy_cursor(token)
    if legacy is not None:
        return legacy
    position = pagination.WATCH.decode(token)
    return 0 if position is None else int(position[0])


def _legacy_cursor(token: str) -> int | None:
    try:
        raw = base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    digits = raw.removeprefix(_LEGACY_PREFIX)
    if raw == digits or not digits.isdigit() or not digits.isascii() or len(digits) > 19:
        return None
    seq = int(digits)
    return seq if seq <= pagination.INT64_MAX else None


class ChangeFeed:
    def __init__(self, db: Database, dsn: str, metrics: Metrics, *, poll_interval: float, page_rows: int) -> None:
        self._db = db
        self._dsn = dsn
        self._metrics = metrics
        self._poll_interval = poll_interval
        self._page_rows = page_rows
        self.frontier = 0
        """Every change with seq <= frontier is committed or will never be."""
        self._pending: collections.deque[changes_sql.Settling] = collections.deque()
        self._advanced = asyncio.Condition()
        self._wake = asyncio.Event()
        self._stopping = False
        self._watchers = 0
        self._joined = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: changes_sql.Listener | None = None
        self._instance = uuid.uuid4().hex
        self._announced = 0.0
        """When this instance last announced itself as listening (monotonic); 0 when it is not."""
        self._sleeping = True
        """Announced as waiting for NOTIFY (True) or polling every MIN_PROBE_GAP while changes keep coming."""
        self._high = 0
        self._active_at = 0.0
        """When a probe last saw a new change (monotonic)."""

    @property
    def newest_seen(self) -> int:
        """The highest log position a probe has seen handed out (committed or not); ``frontier`` is how far of it
        is safe to deliver."""
        return self._high

    async def start(self) -> None:
        await self._advance()
        self._task = asyncio.create_task(self._run(), name="change feed")

    async def _run(self) -> None:
        while True:
            if not self._watchers:
                await self._withdraw()
                await self._joined.wait()
            self._joined.clear()
            if self._listener is None or not self._listener.alive:
                if self._listener is not None:
                    await self._listener.close()
                    self._listener = None
                try:
                    self._listener = await changes_sql.Listener.open(self._dsn, self._wake.set)
                    self._announced = 0.0
                except MemoryServiceError as exc:
                    log.warning("change feed: cannot open its LISTEN connection, polling through the pool: %s", exc)
            try:
                await self._advance()
                sleeping = time.monotonic() - self._active_at > ACTIVE_FOR
                due = sleeping != self._sleeping or time.monotonic() - self._announced > ANNOUNCE_EVERY
                if self._listener is not None and self._listener.alive and due:
                    await self._listener.announce(self._instance, listening=True, sleeping=sleeping)
                    self._announced = time.monotonic()
                    if sleeping and not self._sleeping:
                        await self._advance()  # a change committed just before writers saw the switch: no NOTIFY
                    self._sleeping = sleeping
            except WRITES_REFUSED as exc:
                log.debug("change feed: %s", exc)  # a refusal episode is logged once, where it began
            except MemoryServiceError as exc:
                log.warning("change feed: %s", exc)
            except Exception:
                log.exception("change feed failed unexpectedly")
            await asyncio.sleep(MIN_PROBE_GAP)
            if self._sleeping:
                timeout = PENDING_RECHECK if self._pending else self._poll_interval
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                await self._notify()

    async def _notify(self) -> None:
        async with self._advanced:
            self._advanced.notify_all()

    async def _withdraw(self) -> None:
        """Writers need not notify for this instance any more."""
        if self._announced and self._listener is not None and self._listener.alive:
            with contextlib.suppress(MemoryServiceError):
                await self._listener.announce(self._instance, listening=False, sleeping=True)
        self._announced = 0.0
        self._sleeping = True

    async def _advance(self) -> None:
        if self._listener is not None and self._listener.alive:
            probe = await self._listener.probe()
        else:
            async with self._db.connection() as conn:
                probe = await changes_sql.frontier_probe(conn)
        if probe.high > self._high:
            self._high, self._active_at = probe.high, time.monotonic()
        if probe.high > max(self.frontier, self._pending[-1].high if self._pending else 0):
            if len(self._pending) >= MAX_PENDING:
                self._pending.pop()  # the new candidate covers it, later
            self._pending.append(changes_sql.Settling.of(probe))
        safe = self.frontier
        # A transaction that holds back one candidate holds back every later one too, so they resolve in order.
        while self._pending and self._pending[0].final(probe):
            safe = max(safe, self._pending.popleft().high)
        if safe > self.frontier:
            self.frontier = safe
            await self._notify()

    async def watch(self, memory_filter: MemoryFilter, *, after: int, include_memory: bool) -> AsyncIterator[Change]:
        """Every change after ``after`` that matches, in log order, as it becomes final; ends only on shutdown."""
        memory_filter = guard.narrow(memory_filter)
        if after:
            async with self._db.connection() as conn:
                purged = await history_sql.purged_through(conn)
            if after < purged:
                raise FailedPrecondition(
                    "after: the changes following this cursor are older than HISTORY_RETENTION and have been purged; "
                    "re-read what you cache and watch again without a cursor"
                )
        self._metrics.watch_streams.inc()
        self._watchers += 1
        self._joined.set()
        try:
            cursor = after
            while True:
                await self._wait_beyond(cursor)
                self._check_stopping()
                upto = self.frontier
                while cursor < upto:
                    # Checked before every page and every change, so a stream replaying a backlog ends at once
                    # on shutdown too, rather than holding the drain open until the backlog is sent.
                    self._check_stopping()
                    async with self._db.connection() as conn:
                        page = await changes_sql.fetch_changes(
                            conn,
                            memory_filter,
                            after=cursor,
                            upto=upto,
                            limit=self._page_rows,
                            include_memory=include_memory,
                        )
                    for change in page:
                        self._check_stopping()
                        self._metrics.watch_changes.inc()
                        self._metrics.watch_lag.observe(change.lag_seconds)
                        yield change
                        cursor = change.seq
                    if len(page) < self._page_rows:
                        cursor = upto  # nothing else up to the frontier matches, and nothing new can appear there
        finally:
            self._watchers -= 1
            self._metrics.watch_streams.dec()

    def _check_stopping(self) -> None:
        if self._stopping:
            raise Unavailable("the server is shutting down; watch again with the last cursor you received")

    async def _wait_beyond(self, cursor: int) -> None:
        async with self._advanced:
            await self._advanced.wait_for(lambda: self.frontier > cursor or self._stopping)

    def begin_shutdown(self) -> None:
        """End every Watch stream (Unavailable, with the cursor to resume from being the client's last)."""
        self._stopping = True
        self._joined.set()
        self._wake.set()

    async def close(self) -> None:
        self.begin_shutdown()
        await self._notify()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._withdraw()
        if self._listener is not None:
            await self._listener.close()
