"""SQL of the change stream: the frontier probe, reading the log, and the LISTEN wake-up connection."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import asyncpg

from memory_service.history.types import Change, ChangeKind
from memory_service.models import MemoryFilter, Scope
from memory_service.storage.database import translate_errors
from memory_service.storage.filters import Params, where_clause
from memory_service.storage.history_sql import VERSION_COLUMNS
from memory_service.storage.memories_sql import memory_from_row

log = logging.getLogger(__name__)

CHANNEL = "memory_changes"


@dataclasses.dataclass(frozen=True)
class Probe:
    high: int
    """The highest change seq handed out when the probe began."""
    xid: int
    """A transaction id drawn after ``high`` was read (full 64-bit xid8)."""
    xmin: int
    """The oldest transaction still running in the cluster, read after ``xid`` was drawn."""
    running: frozenset[int] | None
    """The 32-bit xids of transactions running in this database at that moment; None when some of this database's
    sessions are hidden from this role (no pg_read_all_stats), so only ``xmin`` can be trusted."""


@dataclasses.dataclass(frozen=True)
class Settling:
    """Every seq <= ``high`` is final once the transactions in ``blockers`` have ended (or, when they are unknown,
    once no transaction older than ``xid`` runs): how the Watch feed and the text index read ``frontier_probe``."""

    high: int
    xid: int
    blockers: frozenset[int] | None

    @classmethod
    def of(cls, probe: Probe) -> Settling:
        blockers = None
        if probe.running is not None:
            blockers = frozenset(x for x in probe.running if _precedes(x, probe.xid))
        return cls(high=probe.high, xid=probe.xid, blockers=blockers)

    def final(self, probe: Probe) -> bool:
        if probe.xmin >= self.xid:
            return True
        return self.blockers is not None and probe.running is not None and not (self.blockers & probe.running)


def _precedes(xid32: int, xid8: int) -> bool:
    """Whether a running 32-bit xid was assigned before the 64-bit ``xid8`` (running xids are within 2^31 of it)."""
    return 0 < (xid8 - xid32) % 2**32 < 2**31


async def high_seq(conn: asyncpg.Connection) -> int:
    """The last seq drawn (committed or not): a follower whose frontier is there has nothing to read or settle."""
    high: int = await conn.fetchval(
        "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM memory.change_seq"
    )
    return high


async def frontier_probe(conn: asyncpg.Connection, high: int | None = None) -> Probe:
    """What the change feed needs to tell which seqs are final; three statements, in this order, on purpose.

    Every seq up to ``high`` was drawn by a transaction that already held its xid (migration 0007 orders the
    columns so), and that xid was assigned before ``xid`` was. So those transactions are, at the third statement,
    either finished or among this database's running transactions with an xid below ``xid``; once those have ended
    (or, without the list, once ``xmin >= xid``), no seq up to ``high`` can still become visible. Only this
    database's sessions can write its change log, so a long transaction elsewhere in the cluster does not hold the
    stream back. The snapshot's in-progress list would not do: it omits transactions whose xids are past its xmax,
    which may hold seqs already. Drawing ``xid`` costs an xid and an empty commit per probe. ``high``: the caller's
    own ``high_seq`` read just before on this connection (read earlier, it can only be lower: still before ``xid``).
    """
    if high is None:
        high = await high_seq(conn)
    xid = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
    row = await conn.fetchrow(
        """
        SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xmin,
               array_agg(backend_xid::text) FILTER (WHERE backend_xid IS NOT NULL) AS xids,
               coalesce(bool_or(query = '<insufficient privilege>'), false) AS hidden
        FROM pg_stat_activity
        WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database())
        """
    )
    assert row is not None
    running = None if row["hidden"] else frozenset(int(x) for x in row["xids"] or ())
    return Probe(high=high, xid=xid, xmin=int(row["xmin"]), running=running)


async def fetch_changes(
    conn: asyncpg.Connection,
    memory_filter: MemoryFilter,
    *,
    after: int,
    upto: int,
    limit: int,
    include_memory: bool,
) -> list[Change]:
    """Changes with ``after < seq <= upto`` that match the filter, in seq order.

    The filter is matched against the memory as the change left it; an erasure keeps no content, so it matches on
    scope alone.
    """
    params = Params(after, upto)
    content = where_clause(memory_filter, params, live_only=False)
    scopes = where_clause(MemoryFilter(scopes=memory_filter.scopes), params, live_only=False)
    memory_columns = f", {VERSION_COLUMNS}" if include_memory else ""
    rows = await conn.fetch(
        f"""
        SELECT c.seq, c.memory_id, c.scope::text AS c_scope, c.scope_id AS c_scope_id, c.kind::text AS c_kind,
               c.version AS c_version, c.changed_at AS c_changed_at,
               extract(epoch FROM clock_timestamp() - c.changed_at)::float8 AS lag,
               m.memory_id IS NOT NULL AS has_memory {memory_columns}
        FROM memory.changes c
        LEFT JOIN memory.memory_versions m ON m.memory_id = c.memory_id AND m.version = c.version
        WHERE c.seq > $1 AND c.seq <= $2
          AND (({content})
               OR (c.kind = 'erased' AND EXISTS (SELECT 1 FROM (SELECT c.scope, c.scope_id) m WHERE {scopes})))
        ORDER BY c.seq LIMIT {params.add(limit)}
        """,
        *params.values,
    )
    return [
        Change(
            seq=row["seq"],
            memory_id=row["memory_id"],
            scope=Scope(row["c_scope"]),
            scope_id=row["c_scope_id"],
            kind=ChangeKind(row["c_kind"]),
            version=row["c_version"],
            changed_at=row["c_changed_at"],
            lag_seconds=max(0.0, row["lag"]),
            memory=memory_from_row(row) if include_memory and row["has_memory"] else None,
        )
        for row in rows
    ]


async def announce_listener(conn: asyncpg.Connection, instance: str, *, listening: bool, sleeping: bool) -> None:
    """Tell writers whether this instance wants NOTIFY wake-ups (migration 0007: they notify only while some
    instance has watchers and is ``sleeping``, waiting for one, rather than polling)."""
    if listening:
        await conn.execute(
            """
            INSERT INTO memory.watch_listeners (instance, sleeping) VALUES ($1, $2)
            ON CONFLICT (instance) DO UPDATE SET seen_at = clock_timestamp(), sleeping = EXCLUDED.sleeping
            """,
            instance,
            sleeping,
        )
    else:
        await conn.execute("DELETE FROM memory.watch_listeners WHERE instance = $1", instance)


class Listener:
    """A dedicated connection (never a pooled one: a pool's reset would UNLISTEN) that LISTENs for changes; the
    feed probes on it too, so a pool busy with writes never delays the frontier."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, dsn: str, wake: Callable[[], None]) -> Listener:
        with translate_errors():
            # The probe's empty commits (it draws an xid) need no flush: nothing depends on their durability.
            conn = await asyncpg.connect(dsn, timeout=10, server_settings={"synchronous_commit": "off"})
            try:
                await conn.add_listener(CHANNEL, lambda *_: wake())
            except BaseException:
                conn.terminate()
                raise
        return cls(conn)

    async def probe(self) -> Probe:
        with translate_errors():
            return await frontier_probe(self._conn)

    async def announce(self, instance: str, *, listening: bool, sleeping: bool) -> None:
        with translate_errors():
            await announce_listener(self._conn, instance, listening=listening, sleeping=sleeping)

    @property
    def alive(self) -> bool:
        return not self._conn.is_closed()

    async def close(self) -> None:
        try:
            await self._conn.close(timeout=2)
        except Exception:
            self._conn.terminate()
        except BaseException:  # cancelled while closing: never leave the socket to the garbage collector
            self._conn.terminate()
            raise
