"""All lease SQL: each acquire, renew and release is one statement, so one short transaction, under a transaction-level
advisory lock.

The writes are the functions memory.lease_acquire / lease_renew / lease_release (migrations/0003_leases.sql). Each
takes ``pg_advisory_xact_lock(lock_key)``, where ``lock_key`` is a stable 64-bit hash of (namespace, name) computed
by the caller, and the statement's implicit transaction releases it: never held across calls or across a network
round trip, so a pool reset (``pg_advisory_unlock_all()``), a killed backend or a transaction-mode pooler can
neither leave it behind nor drop it early. The row is the truth: every check runs against the row and
``clock_timestamp()``, so two names whose hashes collide only wait for each other.

Functions here take a pooled connection that is not inside a transaction.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from datetime import timedelta

import asyncpg

from memory_service.errors import InvalidArgument
from memory_service.leases.types import Holder, Lease
from memory_service.storage.command_tag import rows_affected


class Outcome(enum.Enum):
    """What an acquire found; the values are the outcomes memory.lease_acquire() returns."""

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
    lease: Lease | None = None
    holder: Holder | None = None
    live_count: int = 0


_LEASE_COLUMNS = "namespace, name, lease_id, holder, owner, fencing_token, ttl, acquired_at, renewed_at, expires_at"

# The three writes are functions in migrations/0003_leases.sql, each called as a statement of its own (never inside
# an explicit transaction): the advisory lock lives exactly as long as that statement, one round trip.
_ACQUIRE = "SELECT outcome, lease, remaining, live FROM memory.lease_acquire($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
_RENEW = "SELECT outcome, lease FROM memory.lease_renew($1, $2)"
_RELEASE = "SELECT released_namespace, released_name FROM memory.lease_release($1)"

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


def _lease(row: asyncpg.Record) -> Lease:
    """A lease from a row of memory.leases, or from the composite value the lease functions return."""
    return Lease(
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
    try:
        row = await conn.fetchrow(
            _ACQUIRE, namespace, name, lock_key, owner_key, lease_id, holder, owner, ttl, quota, request_id
        )
    except asyncpg.UniqueViolationError as exc:
        # Only lease_requests can collide: the same request id raced for two different names.
        raise InvalidArgument("request_id", f"{request_id!r} is being used for another lease") from exc
    outcome, lease = row["outcome"], row["lease"]
    if outcome == "request_mismatch":
        raise InvalidArgument(
            "request_id",
            f"{request_id!r} was already used to acquire {lease['namespace']}/{lease['name']}; use a new request id",
        )
    if outcome == "held":
        holder_row = Holder(
            holder=lease["holder"],
            fencing_token=lease["fencing_token"],
            expires_at=lease["expires_at"],
            remaining=row["remaining"],
        )
        return AcquireResult(outcome=Outcome.HELD, holder=holder_row)
    if outcome in ("granted", "replayed"):
        return AcquireResult(outcome=Outcome(outcome), lease=_lease(lease), live_count=row["live"] or 0)
    return AcquireResult(outcome=Outcome(outcome), live_count=row["live"] or 0)


async def renew(conn: asyncpg.Connection, lease_id: uuid.UUID, ttl: timedelta | None) -> Lease | str:
    """The renewed lease, or why it cannot be renewed (it is never revived)."""
    row = await conn.fetchrow(_RENEW, lease_id, ttl)
    outcome, lease = row["outcome"], row["lease"]
    if outcome == "renewed":
        return _lease(lease)
    if outcome == "released":
        return "it was released"
    if outcome == "expired":
        return f"it expired at {lease['expires_at'].isoformat()}"
    return "it passed to a newer holder (or never existed)"


async def release(conn: asyncpg.Connection, lease_id: uuid.UUID) -> tuple[str, str] | None:
    """End the grant ``lease_id`` if it is still live and return its (namespace, name); None if it had ended.

    A newer holder's grant has another id and is untouched.
    """
    row = await conn.fetchrow(_RELEASE, lease_id)
    if row["released_namespace"] is None:
        return None
    return row["released_namespace"], row["released_name"]


async def get(conn: asyncpg.Connection, namespace: str, name: str) -> Lease | None:
    row = await conn.fetchrow(_GET, namespace, name)
    return None if row is None else _lease(row)


async def list_live(
    conn: asyncpg.Connection, *, namespace: str | None, after: tuple[str, str] | None, limit: int
) -> list[Lease]:
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
    return rows_affected(leases), rows_affected(requests)


async def namespace_of(conn: asyncpg.Connection, lease_id: uuid.UUID) -> str | None:
    """The namespace of grant ``lease_id`` (live or ended), or None when the table has no such grant."""
    namespace: str | None = await conn.fetchval("SELECT namespace FROM memory.leases WHERE lease_id = $1", lease_id)
    return namespace
