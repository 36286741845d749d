"""All lease SQL: each acquire, renew and release is one short transaction under a transaction-level advisory lock.

The lock is ``pg_advisory_xact_lock(lock_key)`` where ``lock_key`` is a stable 64-bit hash of (namespace, name)
computed by the caller. It is released by COMMIT or ROLLBACK, never held across calls, so a pool reset
(``pg_advisory_unlock_all()``), a killed backend or a transaction-mode pooler cannot leave it behind or drop it
early. The row is the truth: every statement re-checks liveness against ``clock_timestamp()``, so two names whose
hashes collide only wait for each other.

Functions here take a connection that is not in a transaction and open their own; callers choose the pool.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from datetime import datetime, timedelta

import asyncpg

from memory_service.errors import InvalidArgument


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeaseRow:
    """One grant as the lease table holds it."""

    namespace: str
    name: str
    lease_id: uuid.UUID
    holder: str
    owner: str
    fencing_token: int
    ttl: timedelta
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime


@dataclasses.dataclass(frozen=True, kw_only=True)
class HolderRow:
    """What a contender may see of the live holder; ``remaining`` is seconds to expiry by the database clock."""

    holder: str
    fencing_token: int
    expires_at: datetime
    remaining: float


class Outcome(enum.Enum):
    GRANTED = "granted"
    """A new grant, made by this transaction."""
    REPLAYED = "replayed"
    """The request id was granted before and that grant is still live: the same grant again."""
    REPLAY_ENDED = "replay_ended"
    """The request id was granted before, but that grant has since ended."""
    HELD = "held"
    """Someone else holds the name."""
    OVER_QUOTA = "over_quota"
    """The name is free but the owner already holds its quota of leases."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AcquireResult:
    outcome: Outcome
    lease: LeaseRow | None = None
    holder: HolderRow | None = None
    live_count: int = 0


_LEASE_COLUMNS = "namespace, name, lease_id, holder, owner, fencing_token, ttl, acquired_at, renewed_at, expires_at"

# The name lock, then the owner lock that makes the quota count exact. Acquires never wait for a name lock while
# holding an owner lock, and renew/release take one lock only, so the order cannot deadlock.
_LOCK_NAME_AND_OWNER = "SELECT pg_advisory_xact_lock($1::bigint), pg_advisory_xact_lock($2::bigint)"

_PREVIOUS_REQUEST = f"""
SELECT r.namespace AS request_namespace, r.name AS request_name,
       l.lease_id IS NOT NULL AND l.released_at IS NULL AND l.expires_at > clock_timestamp() AS live,
       {", ".join("l." + c for c in _LEASE_COLUMNS.split(", "))}
FROM memory.lease_requests r LEFT JOIN memory.leases l ON l.lease_id = r.lease_id
WHERE r.owner = $1 AND r.request_id = $2
"""

# One statement decides and grants, after the locks: the snapshot it reads is taken once they are held.
# nextval() runs only for a row that passes the WHERE, and the ON CONFLICT condition repeats the liveness check
# against the row itself. The request id is recorded in the same transaction as the grant.
_GRANT = f"""
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now),
held AS (
    SELECT l.holder, l.fencing_token, l.expires_at, extract(epoch FROM l.expires_at - c.now)::float8 AS remaining
    FROM memory.leases l, clock c
    WHERE l.namespace = $1 AND l.name = $2 AND l.released_at IS NULL AND l.expires_at > c.now
),
quota AS (
    SELECT count(*) AS live FROM memory.leases l, clock c
    WHERE l.owner = $6 AND l.released_at IS NULL AND l.expires_at > c.now
),
granted AS (
    INSERT INTO memory.leases AS l
        (namespace, name, lock_key, lease_id, holder, owner, fencing_token, ttl, acquired_at, renewed_at, expires_at)
    SELECT $1, $2, $3, $4, $5, $6, nextval('memory.fencing_tokens'), $7, c.now, c.now, c.now + $7::interval
    FROM clock c, quota q
    WHERE q.live < $8 AND NOT EXISTS (SELECT FROM held)
    ON CONFLICT (namespace, name) DO UPDATE SET
        lock_key = EXCLUDED.lock_key, lease_id = EXCLUDED.lease_id, holder = EXCLUDED.holder,
        owner = EXCLUDED.owner, fencing_token = EXCLUDED.fencing_token, ttl = EXCLUDED.ttl,
        acquired_at = EXCLUDED.acquired_at, renewed_at = EXCLUDED.renewed_at, expires_at = EXCLUDED.expires_at,
        released_at = NULL
    WHERE l.released_at IS NOT NULL OR l.expires_at <= EXCLUDED.acquired_at
    RETURNING {_LEASE_COLUMNS}
),
recorded AS (
    INSERT INTO memory.lease_requests (owner, request_id, lease_id, namespace, name)
    SELECT g.owner, $9, g.lease_id, g.namespace, g.name FROM granted g WHERE $9::text IS NOT NULL
)
SELECT g.*, h.holder AS held_by, h.fencing_token AS held_token, h.expires_at AS held_until,
       h.remaining AS held_remaining, q.live
FROM quota q LEFT JOIN granted g ON true LEFT JOIN held h ON true
"""

_LOCK_BY_ID = "SELECT pg_advisory_xact_lock(lock_key) FROM memory.leases WHERE lease_id = $1"

# greatest(): a renew never shortens a lease, so the TTL already promised stays a lower bound.
_RENEW = f"""
UPDATE memory.leases l SET
    ttl = coalesce($2::interval, l.ttl),
    renewed_at = clock_timestamp(),
    expires_at = greatest(l.expires_at, clock_timestamp() + coalesce($2::interval, l.ttl))
WHERE l.lease_id = $1 AND l.released_at IS NULL AND l.expires_at > clock_timestamp()
RETURNING {_LEASE_COLUMNS}
"""

_RELEASE = """
UPDATE memory.leases SET released_at = clock_timestamp(), expires_at = least(expires_at, clock_timestamp())
WHERE lease_id = $1 AND released_at IS NULL AND expires_at > clock_timestamp()
RETURNING namespace, name
"""

_WHY_ENDED = """
SELECT released_at IS NOT NULL AS released, expires_at FROM memory.leases WHERE lease_id = $1
"""

_GET = f"""
SELECT {_LEASE_COLUMNS} FROM memory.leases
WHERE namespace = $1 AND name = $2 AND released_at IS NULL AND expires_at > clock_timestamp()
"""

_LIST = f"""
SELECT {_LEASE_COLUMNS} FROM memory.leases
WHERE ($1::text IS NULL OR namespace = $1)
  AND ($2::text IS NULL OR (namespace, name) > ($2, $3))
  AND released_at IS NULL AND expires_at > clock_timestamp()
ORDER BY namespace, name
LIMIT $4
"""

_COUNT_LIVE = "SELECT count(*) FROM memory.leases WHERE released_at IS NULL AND expires_at > clock_timestamp()"

# Ended rows and answered requests are kept for ``$1`` so fenced writes and retries still find them; a fenced
# write whose lease row is gone is refused, so purging never lets a stale holder through.
_PURGE_REQUESTS = """
DELETE FROM memory.lease_requests r
WHERE r.created_at < clock_timestamp() - $1::interval
  AND NOT EXISTS (
      SELECT FROM memory.leases l
      WHERE l.lease_id = r.lease_id AND l.released_at IS NULL AND l.expires_at > clock_timestamp())
"""
_PURGE_LEASES = """
DELETE FROM memory.leases WHERE coalesce(released_at, expires_at) < clock_timestamp() - $1::interval
"""


def _lease(row: asyncpg.Record) -> LeaseRow:
    return LeaseRow(
        namespace=row["namespace"],
        name=row["name"],
        lease_id=row["lease_id"],
        holder=row["holder"],
        owner=row["owner"],
        fencing_token=row["fencing_token"],
        ttl=row["ttl"],
        acquired_at=row["acquired_at"],
        renewed_at=row["renewed_at"],
        expires_at=row["expires_at"],
    )


async def acquire(
    conn: asyncpg.Connection,
    *,
    namespace: str,
    name: str,
    lock_key: int,
    owner_key: int,
    lease_id: uuid.UUID,
    holder: str,
    owner: str,
    ttl: timedelta,
    quota: int,
    request_id: str | None,
) -> AcquireResult:
    """Grant the name unless it is live; with a request id already answered, return that grant instead."""
    async with conn.transaction():
        await conn.execute(_LOCK_NAME_AND_OWNER, lock_key, owner_key)
        if request_id is not None:
            previous = await conn.fetchrow(_PREVIOUS_REQUEST, owner, request_id)
            if previous is not None:
                if (previous["request_namespace"], previous["request_name"]) != (namespace, name):
                    raise InvalidArgument(
                        "request_id",
                        f"{request_id!r} was already used to acquire "
                        f"{previous['request_namespace']}/{previous['request_name']}; use a new request id",
                    )
                if previous["live"]:
                    return AcquireResult(outcome=Outcome.REPLAYED, lease=_lease(previous))
                return AcquireResult(outcome=Outcome.REPLAY_ENDED)
        try:
            row = await conn.fetchrow(
                _GRANT, namespace, name, lock_key, lease_id, holder, owner, ttl, quota, request_id
            )
        except asyncpg.UniqueViolationError as exc:
            # Only lease_requests can collide: the same request id raced for two different names.
            raise InvalidArgument("request_id", f"{request_id!r} is being used for another lease") from exc
    assert row is not None
    if row["lease_id"] is not None:
        return AcquireResult(outcome=Outcome.GRANTED, lease=_lease(row), live_count=row["live"] + 1)
    if row["held_by"] is not None:
        holder_row = HolderRow(
            holder=row["held_by"],
            fencing_token=row["held_token"],
            expires_at=row["held_until"],
            remaining=row["held_remaining"],
        )
        return AcquireResult(outcome=Outcome.HELD, holder=holder_row, live_count=row["live"])
    return AcquireResult(outcome=Outcome.OVER_QUOTA, live_count=row["live"])


async def renew(conn: asyncpg.Connection, lease_id: uuid.UUID, ttl: timedelta | None) -> LeaseRow | str:
    """The renewed lease, or why it cannot be renewed (it is never revived)."""
    async with conn.transaction():
        locked = await conn.fetchrow(_LOCK_BY_ID, lease_id)
        if locked is None:
            return "it passed to a newer holder (or never existed)"
        row = await conn.fetchrow(_RENEW, lease_id, ttl)
        if row is not None:
            return _lease(row)
        ended = await conn.fetchrow(_WHY_ENDED, lease_id)
    if ended is None:
        return "it passed to a newer holder"
    if ended["released"]:
        return "it was released"
    return f"it expired at {ended['expires_at'].isoformat()}"


async def release(conn: asyncpg.Connection, lease_id: uuid.UUID) -> tuple[str, str] | None:
    """End the grant ``lease_id`` if it is still live and return its (namespace, name); None if it had ended.

    A newer holder's grant has another id and is untouched.
    """
    async with conn.transaction():
        locked = await conn.fetchrow(_LOCK_BY_ID, lease_id)
        if locked is None:
            return None
        row = await conn.fetchrow(_RELEASE, lease_id)
    return None if row is None else (row["namespace"], row["name"])


async def get(conn: asyncpg.Connection, namespace: str, name: str) -> LeaseRow | None:
    row = await conn.fetchrow(_GET, namespace, name)
    return None if row is None else _lease(row)


async def list_live(
    conn: asyncpg.Connection, *, namespace: str | None, after: tuple[str, str] | None, limit: int
) -> list[LeaseRow]:
    """Live leases in (namespace, name) order, starting after ``after``."""
    after_namespace, after_name = after if after is not None else (None, None)
    rows = await conn.fetch(_LIST, namespace, after_namespace, after_name, limit)
    return [_lease(row) for row in rows]


async def count_live(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(_COUNT_LIVE))


async def purge(conn: asyncpg.Connection, retention: timedelta) -> tuple[int, int]:
    """Delete ended leases and answered requests older than ``retention``; return how many of each."""
    requests = await conn.execute(_PURGE_REQUESTS, retention)
    leases = await conn.execute(_PURGE_LEASES, retention)
    return int(leases.split()[-1]), int(requests.split()[-1])
